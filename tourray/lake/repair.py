"""`tourray repair`: remove what killed writers leave behind, without touching live writers' work.

Two kinds of debris: rows of samples that never got their `samples` row (a driver killed between a
group's table commits), and fragment files written by processes whose commit never came (no
version's manifest references them; they cost storage and nothing else). Repair holds a lake-wide
lease of kind "repair" for its whole run (so `tourray optimize` waits for it), deletes a run's rows
only while it also holds that run's lease, and removes a file only when it is older than the oldest
live lease of any kind (`tables.removable_before`: every writer holds a lease from before its first
file until its last commit, so a live writer's files are younger) and than `--min-age`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Iterable

import pyarrow.fs as pafs

from tourray.lake import tables as lk
from tourray.errors import UserError

log = logging.getLogger("tourray")

#: Tables whose rows belong to one sample of a run (deleted when the sample is not complete), in the
#: order deletions go: STARTED_TABLES last, so an interrupted deletion still shows which samples to redo.
SAMPLE_TABLES = ("activations", "token_layers", "block_sums", "logits", "tokens", "blocks")

#: Tables whose rows show a group was started: blocks and tokens are committed first (COMMIT_ORDER).
STARTED_TABLES = ("blocks", "tokens")


def clean_marks(lake: lk.Lake, n_samples: int) -> dict[str, int]:
    """The newest fragment id of blocks, tokens and moments (the groups' partial statistics), and
    `n_samples`, the run's `samples` rows at that point. Recorded in the run's manifest when none of
    its rows up to those fragments is incomplete (see `delete_incomplete`'s `since`); fewer samples
    rows later means some were deleted behind the capture's back (their other rows may sit in old
    fragments), and the next start reads everything."""
    return dict({t: lake.last_fragment(t) for t in (*STARTED_TABLES, "moments")}, samples=n_samples)


def started_samples(lake: lk.Lake, run: str, since: dict[str, int] | None = None) -> set[str]:
    """Ids of `run`'s samples with rows in STARTED_TABLES, in fragments after `since` (all fragments
    without it): the read whose cost `since` keeps to what is new."""
    q, since = f"run = {lk.sql_quote(run)}", since or {}
    return {s for t in STARTED_TABLES
            for s in lake.read(t, ["sample_id"], filter=q, after_fragment=since.get(t)).column(0).unique().to_pylist()}


def incomplete_parts(lake: lk.Lake, run: str, done: set[str], after_fragment: int | None = None) -> list[str]:
    """Group keys of partial rows whose group has a sample without its `samples` row (killed), in
    fragments after `after_fragment` (see `Lake.read`)."""
    if not lake.exists("moments"):
        return []
    rows = lake.read("moments", ["source", "sources"], filter=f"run = {lk.sql_quote(run)} AND kind LIKE '%_part'",
                     after_fragment=after_fragment).to_pylist()
    return sorted({r["source"] for r in rows if not set(json.loads(r["sources"])["group"]) <= done})


def delete_incomplete(lake: lk.Lake, run: str, complete: set[str] | None = None,
                      since: dict[str, int] | None = None, committed: set[str] | None = None) -> list[str]:
    """Delete every row of `run`'s samples that are not `complete` (default: those with a `samples`
    row; a resuming capture passes the samples of its complete groups) and the partial inline
    statistics of groups that never completed; return the ids removed. The caller holds the lease.
    `since` (`clean_marks` recorded when the run had no incomplete rows): look only at fragments
    committed after them, so a start costs what the last, interrupted capture wrote, not the run."""
    q = f"run = {lk.sql_quote(run)}"
    since = since or {}
    if committed is None:  # the run's samples ids (a caller that has read them already passes them)
        committed = set(lake.read("samples", ["sample_id"], filter=q).column(0).to_pylist())
    complete = committed if complete is None else complete
    if committed - complete or len(committed) < since.get("samples", 0):
        since = {}  # samples rows deleted, or a group with only some of them: not what captures leave
    orphans = sorted((committed | started_samples(lake, run, since)) - complete)
    if orphans:
        log.warning("run %s: removing rows of %d sample(s) whose group was not completely committed", run, len(orphans))
        ids = ", ".join(lk.sql_quote(s) for s in orphans)
        for table in (*SAMPLE_TABLES, "samples"):
            if lake.exists(table):
                lake.delete(table, f"{q} AND sample_id IN ({ids})")
    if parts := incomplete_parts(lake, run, complete, since.get("moments")):
        log.warning("run %s: removing partial statistics of %d interrupted group(s)", run, len(parts))
        lake.delete("moments", f"{q} AND source IN ({', '.join(lk.sql_quote(p) for p in parts)})")
    return orphans


def referenced_files(lake: lk.Lake, table: str) -> set[str]:
    """Data file names (under data/) referenced by any version of `table` (time travel keeps old ones)."""
    ds = lake.dataset(table)
    out = set()
    for v in ds.versions():
        for frag in lake.dataset(table, version=v["version"]).get_fragments():
            out |= {d.path for d in frag.data_files()}
    return out


def unreferenced_files(lake: lk.Lake, table: str, min_age_s: float) -> list[str]:
    """Full paths of `table`'s data files that no version references, older than `min_age_s` (no
    lease considered: see `remove_unreferenced`)."""
    infos = data_files(lake, table, min_age_s)
    keep = referenced_files(lake, table)  # listed after the files: a file committed meanwhile is kept
    return [i.path for i in infos if i.base_name not in keep]


def data_files(lake: lk.Lake, table: str, min_age_s: float) -> list[pafs.FileInfo]:
    """`table`'s data files (under data/), older than `min_age_s` by the store's clock."""
    if not lake.exists(table):
        return []
    fs, root = lake.filesystem(table)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/data", allow_not_found=True))
    now = time.time()
    return [i for i in infos if i.type == pafs.FileType.File and i.mtime is not None
            and now - i.mtime.timestamp() >= min_age_s]


#: Never-committed files of `leases` younger than this are kept whatever --min-age says: a lease's
#: first row is written before the lease exists (its commit takes moments, never this long).
LEASES_MIN_AGE_S = 60.0


def remove_unreferenced(lake: lk.Lake, own: Iterable[str] = frozenset(), min_age_s: float | None = None,
                        tables: Iterable[str] | None = None) -> dict[str, int]:
    """Remove never-committed data files of every table (or of `tables`): files no version
    references, older than `min_age_s` (default: a lease's lifetime) and older than the oldest live
    lease of any kind (`own`: the caller's holder ids; see `tables.removable_before`): a live writer's
    in-flight files look exactly like debris, but are younger than its lease."""
    return {t: n for t, (n, _) in remove_unreferenced_sized(lake, own, min_age_s, tables).items()}


def remove_unreferenced_sized(lake: lk.Lake, own: Iterable[str] = frozenset(), min_age_s: float | None = None,
                              tables: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """`remove_unreferenced`, returning table -> (files, bytes) removed."""
    age = lk.LEASE_TTL_S if min_age_s is None else min_age_s
    # order matters: list the files, then read the leases, then what versions reference (see removable_before)
    listed = {t: data_files(lake, t, max(age, LEASES_MIN_AGE_S) if t == "leases" else age)
              for t in (lake.tables() if tables is None else tables)}
    bound = lk.removable_before(lake, own)
    removed, spared = {}, 0
    for table, infos in listed.items():
        if not infos:
            continue
        keep = referenced_files(lake, table)
        debris = [i for i in infos if i.base_name not in keep]
        files = [i for i in debris if bound is None or i.mtime < bound]
        spared += len(debris) - len(files)
        if files:
            fs, _ = lake.filesystem(table)
            for i in files:
                fs.delete_file(i.path)
            removed[table] = (len(files), sum(i.size or 0 for i in files))
            log.info("repair: %s: removed %d never-committed fragment file(s)", table, len(files))
    if spared:
        live = lk.live_leases(lake)
        log.info("repair: kept %d unreferenced file(s) younger than the oldest live lease (%s)", spared,
                 ", ".join(sorted({f"{r.get('kind') or 'capture'} {r['run'] or ''}".strip() for r in live})) or "ended since")
    return removed


def run_repair(lake_root: str | lk.Lake, run: str | None = None, min_age_s: float | None = None) -> dict:
    """Repair `run` (or every run): orphan rows of runs whose lease this process can take, then files.
    Holds a lake-wide "repair" lease throughout, and each repaired run's lease while it deletes rows."""
    lake = lake_root if isinstance(lake_root, lk.Lake) else lk.Lake(lake_root)
    if not lake.exists("runs"):
        raise UserError(f"--lake {lake.root}: no lake here (no runs table)")
    runs = sorted(set(lake.read("runs", ["run"]).column(0).to_pylist()))
    if run is not None and run not in runs:
        raise UserError(f"--run {run!r}: no such run in {lake.root} (runs: {', '.join(runs) or 'none'})")
    out = dict(rows={}, busy=[], files={})
    with lake.lease("repair") as whole:
        leases = [whole]
        try:
            for r in [run] if run else runs:
                try:
                    leases.append(lease := lake.lease("repair", run=r).acquire())
                except UserError:
                    out["busy"].append(r)
                    log.warning("repair: run %s is being written by another process; left alone", r)
                    continue
                lease.check()  # the fence: this run is still ours right before its deletes
                out["rows"][r] = len(delete_incomplete(lake, r))
            whole.check()
            out["files"] = remove_unreferenced(lake, {l.holder for l in leases}, min_age_s)
        finally:
            for l in leases[1:]:
                l.release()
    return out


def cmd_repair(args) -> int:
    s = run_repair(args.lake, args.run, args.min_age)
    rows = sum(s["rows"].values())
    print(f"repaired {len(s['rows'])} run(s): {rows} incomplete sample(s) removed, "
          f"{sum(s['files'].values())} never-committed file(s) removed"
          + (f"; busy (left alone): {', '.join(s['busy'])}" if s["busy"] else ""))
    return 0


def add_parser(command) -> argparse.ArgumentParser:
    """Add `tourray repair`; `command(name, fn, help)` is `tourray.cli.parser`'s helper."""
    p = command("repair", cmd_repair, "Remove rows of incomplete samples and never-committed fragment files "
                                      "(what killed captures leave); runs being captured are left alone.")
    p.add_argument("--lake", default="lake", help="Lake root (folder or URI).")
    p.add_argument("--run", help="Only this run's rows (files are shared by all runs).")
    p.add_argument("--min-age", type=float, default=None,
                   help=f"Only remove files older than this many seconds (default: the lease lifetime, {lk.LEASE_TTL_S:.0f}); "
                        "files younger than a live lease (a capture's, an optimize's) are never removed.")
    return p
