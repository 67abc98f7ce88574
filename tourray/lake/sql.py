"""DuckDB over the lake: every table is a view; `activations.h` is always FLOAT[hidden_size].

Per-sample tables (`repair.SAMPLE_TABLES`: tokens, activations, token_layers, block_sums, blocks,
logits) show only complete samples: rows whose sample has a `samples` row (the capture commits it
last). `raw_<table>` shows every row.

DuckDB cannot read Arrow half floats (and Lance's bfloat16 reaches it as blobs), so each table is
exposed through `LakeView`, a LanceDataset whose schema shows float32 vectors and whose scanner
converts them batch by batch. DuckDB hands its projection and filters to that scanner, so they run
inside Lance: a query over one layer never reads the vectors of the others.

Queries in `queries/*.sql` start with a header of `-- key: value` lines (purpose, inputs, params);
parameters are DuckDB named parameters (`$run`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import lance
import pyarrow as pa

from tourray.errors import UserError
from tourray.lake.tables import TABLES, Lake, arrow_to_numpy, schema_or_empty
from tourray.lake.repair import SAMPLE_TABLES

QUERY_DIR = Path(__file__).resolve().parent / "queries"  # package data: tourray/lake/queries/*.sql
#: `block_sums`' float64 sums (after run, sample_id, layer, site, text_tokens), as its schema declares them.
BLOCK_SUMS = tuple(f.name for f in schema_or_empty("block_sums", None).schema if pa.types.is_float64(f.type))
#: Tables a lake written before them lacks, read as empty (layer_similarity.sql then sums token_layers).
READ_AS_EMPTY = ("block_sums",)


class _CastingScanner:
    """What DuckDB reads from `LakeView.scanner`: a reader whose vector columns are float32."""

    def __init__(self, inner: lance.LanceScanner, schema: pa.Schema):
        self.inner, self.projected_schema = inner, schema

    def to_reader(self) -> pa.RecordBatchReader:
        schema = self.projected_schema

        def batches():
            for b in self.inner.to_batches():
                yield pa.RecordBatch.from_arrays(
                    [_as_float32(c) if pa.types.is_fixed_size_list(c.type) else c for c in b.columns], schema=schema)

        return pa.RecordBatchReader.from_batches(schema, batches())


def _as_float32(col: pa.FixedSizeListArray) -> pa.FixedSizeListArray:
    if pa.types.is_float32(col.type.value_type):
        return col
    return pa.FixedSizeListArray.from_arrays(pa.array(arrow_to_numpy(col, "float32").reshape(-1)), col.type.list_size)


class LakeView(lance.LanceDataset):
    """A Lance table as DuckDB should see it (float32 vectors, pushdown intact)."""

    def __init__(self, base: lance.LanceDataset):  # noqa: D107 - adopt an opened dataset
        self.__dict__.update(base.__dict__)

    @property
    def schema(self) -> pa.Schema:
        s = super().schema
        for i, f in enumerate(s):
            if pa.types.is_fixed_size_list(f.type):
                s = s.set(i, pa.field(f.name, pa.list_(pa.float32(), f.type.list_size), f.nullable))
        return s

    def scanner(self, columns=None, filter=None, **kwargs):
        inner = super().scanner(columns=columns, filter=filter, **kwargs)
        full = self.schema
        names = columns if columns is not None else full.names
        return _CastingScanner(inner, pa.schema([full.field(c) for c in names]))


def connect(lake: str | Lake, database: str = ":memory:"):
    """A DuckDB connection with one view per lake table. Each view reads the table version current
    when the connection was opened (a consistent snapshot): open a new one to see later commits."""
    import duckdb

    lake = lake if isinstance(lake, Lake) else Lake(lake)
    opened = {t: ds for t in TABLES if (ds := lake._open(t)) is not None}  # each table opened once
    if not opened:
        raise UserError(f"--lake: no tourray tables under {lake.root}")
    for t in set(READ_AS_EMPTY) - opened.keys():
        opened[t] = schema_or_empty(t, None)
    con = _duckdb(database)
    tables = list(opened)
    for t in sorted(tables, key=lambda t: t != "samples"):  # samples first: the per-sample views join it
        ds = opened[t]
        # only tables with vectors need the converting view; the others are scanned by DuckDB's own
        # Arrow dataset scan (no Python in the loop: token_layers, tokens, samples read ~1.5x faster)
        source = LakeView(ds) if any(_needs_view(f.type) for f in ds.schema) else ds
        if t not in SAMPLE_TABLES or "samples" not in tables:
            con.register(t, source)
            continue
        # per-sample rows count only once their sample is complete (its samples row, committed last,
        # exists): a killed capture's leftovers stay visible as raw_<table> for inspection only
        con.register(f"raw_{t}", source)
        con.execute(f"CREATE TEMP VIEW {t} AS SELECT x.* FROM raw_{t} AS x SEMI JOIN samples AS s "
                    "ON x.run = s.run AND x.sample_id = s.sample_id")
    return con


#: `block_sums` recomputed from the complete samples' `token_layers` (each row joined to layer l-1's
#: resid_post row at its position) and `tokens` (next-token entropy) rows of one run: every stored
#: block, 0 text tokens included; optionally only samples with no block_sums rows yet ({missing}).
_BLOCK_SUMS_SQL = """
WITH t AS (
    SELECT t.*, s.text_start, s.text_end
    FROM raw_token_layers AS t JOIN samples AS s ON s.run = t.run AND s.sample_id = t.sample_id
    WHERE t.run = $run AND s.run = $run {missing}
),
k AS (SELECT sample_id, pos, lead(entropy) OVER (PARTITION BY sample_id ORDER BY pos) AS e FROM raw_tokens WHERE run = $run),
x AS (
    SELECT t.run, t.sample_id, t.layer, t.site, t.cos_prev::DOUBLE AS c, k.e::DOUBLE AS e,
           sqrt(greatest(t.norm::DOUBLE * t.norm + p.norm::DOUBLE * p.norm - 2 * p.norm::DOUBLE * t.norm * t.cos_prev, 0)) AS u,
           p.norm::DOUBLE AS na,
           t.cos_prev IS NOT NULL AND t.pos >= t.text_start AND t.pos < t.text_end AS counted
    FROM t
    LEFT JOIN t AS p ON p.sample_id = t.sample_id AND p.pos = t.pos AND p.layer = t.layer - 1 AND p.site = 'resid_post'
    LEFT JOIN k ON k.sample_id = t.sample_id AND k.pos = t.pos
)
SELECT run, sample_id, layer, site,
       count(*) FILTER (counted)::INTEGER AS text_tokens,
       coalesce(sum(c) FILTER (counted), 0) AS cos_sum,
       coalesce(sum(acos(CASE WHEN isnan(c) THEN c ELSE least(greatest(c, -1.0), 1.0) END) / pi()) FILTER (counted), 0)
           AS angle_sum,
       coalesce(sum(e) FILTER (counted), 0) AS entropy_sum,
       coalesce(sum(e * c) FILTER (counted), 0) AS entropy_cos_sum,
       coalesce(sum(u) FILTER (counted), 0) AS update_sum,
       coalesce(sum(u / na) FILTER (counted), 0) AS rel_update_sum
FROM x
GROUP BY ALL
ORDER BY sample_id, layer, site
"""
# (greatest() skips a NULL: `counted`, not the clamp, keeps the embedding's missing cosines out; and
# DuckDB orders NaN above 1, so a NaN cosine (a zero vector) is kept NaN as numpy's arccos keeps it)


def block_sums_from_rows(con, run: str, missing_only: bool = False) -> pa.Table:
    """`block_sums` rows of `run` computed from its `token_layers` (on a `connect()` connection): what
    `tourray verify` compares with the stored rows, and what `tourray optimize` writes for samples
    captured before the table existed (`missing_only`)."""
    missing = "AND t.sample_id NOT IN (SELECT sample_id FROM raw_block_sums WHERE run = $run)" if missing_only else ""
    got = con.sql(_BLOCK_SUMS_SQL.format(missing=missing), params=dict(run=run)).to_arrow_table()
    return got.cast(schema_or_empty("block_sums", None).schema)


def _duckdb(database: str):
    """A new DuckDB connection. In memory, a cursor on one database per process: starting a DuckDB
    database takes 12-25 ms (a quarter of a `layer_similarity` query), a cursor nothing. A cursor has
    its own registrations and temp views, so connections stay apart; settings (`SET ...`) and
    tables a query creates are the process's."""
    import duckdb

    return _memory_database().cursor() if database == ":memory:" else duckdb.connect(database)


@functools.cache
def _memory_database():
    import duckdb

    return duckdb.connect(":memory:")


def _needs_view(t: pa.DataType) -> bool:
    """Types DuckDB cannot read from Arrow (half floats, Lance's bfloat16) or that tourray always
    shows as FLOAT[d] (fixed-size lists)."""
    return pa.types.is_fixed_size_list(t) or pa.types.is_float16(t) or isinstance(t, pa.ExtensionType)


def query_file(name: str) -> Path:
    """`queries/<name>.sql` (name may also be a path to any .sql file)."""
    p = Path(name)
    if p.suffix == ".sql" and p.exists():
        return p
    p = QUERY_DIR / f"{name}.sql"
    if not p.exists():
        known = ", ".join(sorted(q.stem for q in QUERY_DIR.glob("*.sql")))
        raise UserError(f"no query {name!r}; known: {known}")
    return p


def header(path: Path) -> dict[str, str]:
    """The `-- key: value` lines at the top of a query file."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("--"):
            break
        if m := re.match(r"--\s*(\w+):\s*(.*)", line):
            out[m[1]] = m[2].strip()
    return out


def run_query(con, sql: str, params: dict | None = None):
    """Run `sql` and return a DuckDB relation (None for statements without rows); DuckDB errors
    (syntax, unknown column, missing parameter) become UserErrors."""
    import duckdb

    try:
        return con.sql(sql, params=params or None)
    except duckdb.Error as e:
        raise UserError(f"SQL error: {e}") from None


def print_result(con, sql: str, params: dict, fmt: str) -> None:
    """Run `sql` and print its rows as a table, CSV or JSON (`tourray sql --format`)."""
    import json
    import sys

    rel = run_query(con, sql, params)
    if rel is None:
        return
    if fmt == "table":
        rel.show(max_rows=10_000, max_width=10_000)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(rel.to_arrow_table(), sys.stdout.buffer)
    else:
        print(json.dumps(rel.to_arrow_table().to_pylist(), default=str, indent=1))
