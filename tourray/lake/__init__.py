"""The lake: one Lance dataset per table under a root (a folder or an object-store URI).

`tables` (schemas, fragments, commits, scans, leases), `runs` (run records: the manifest, the text
snapshot, what a resume may not change), `checksum`, `verify`, `repair`, `optimize`, `sql` (DuckDB
over every table); `schemas/*.yaml` declare the tables, `queries/*.sql` are the packaged analyses.
The bottom of the pipeline: it imports nothing above the corpus.
"""

from tourray.lake.tables import Lake

__all__ = ["Lake"]
