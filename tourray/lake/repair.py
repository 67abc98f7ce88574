"""`tourray repair`: remove what killed writers leave behind, without touching live writers' work.

Two kinds of debris: rows of samples that never got their `samples` row (a driver killed between a
group's table commits), and fragment files written by actors whose group was never committed (no
version's manifest references them; they cost storage and nothing else). A run's rows are only
deleted while this process holds the run's lease, and files only while no other lease in the lake is
live and the file is older than a lease's lifetime (a writer without a lease is still that fresh).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import pyarrow.fs as pafs

from tourray.lake import tables as lk
from tourray.errors import UserError

log = logging.getLogger("tourray")

#: Tables whose rows belong to one sample of a run (deleted when the sample is not complete).
SAMPLE_TABLES = ("activations", "token_layers", "tokens", "blocks")

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
    """Full paths of `table`'s data files that no version references, older than `min_age_s`."""
    if not lake.exists(table):
        return []
    fs, root = lake.filesystem(table)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/data", allow_not_found=True))
    keep = referenced_files(lake, table)  # listed after the files: a file committed meanwhile is kept
    now = time.time()
    return [i.path for i in infos if i.type == pafs.FileType.File and i.base_name not in keep
            and i.mtime is not None and now - i.mtime.timestamp() >= min_age_s]


def remove_unreferenced(lake: lk.Lake, own: set[str] = frozenset(), min_age_s: float | None = None) -> dict[str, int]:
    """Remove never-committed fragment files of every table, unless a lease other than `own`
    (holder ids) is live: that writer's in-flight fragments look exactly like debris."""
    others = [r for r in lk.live_leases(lake) if r["holder"] not in own]
    if others:
        log.info("repair: not removing unreferenced files: %d other driver(s) live (%s)", len(others),
                 ", ".join(sorted({r["run"] for r in others})))
        return {}
    age = lk.LEASE_TTL_S if min_age_s is None else min_age_s
    removed = {}
    for table in lake.tables():
        files = unreferenced_files(lake, table, age)
        if files:
            fs, _ = lake.filesystem(table)
            for f in files:
                fs.delete_file(f)
            removed[table] = len(files)
            log.info("repair: %s: removed %d never-committed fragment file(s)", table, len(files))
    return removed


def run_repair(lake_root: str | lk.Lake, run: str | None = None, min_age_s: float | None = None) -> dict:
    """Repair `run` (or every run): orphan rows of runs whose lease this process can take, then files."""
    lake = lake_root if isinstance(lake_root, lk.Lake) else lk.Lake(lake_root)
    if not lake.exists("runs"):
        raise UserError(f"--lake {lake.root}: no lake here (no runs table)")
    runs = sorted(set(lake.read("runs", ["run"]).column(0).to_pylist()))
    if run is not None and run not in runs:
        raise UserError(f"--run {run!r}: no such run in {lake.root} (runs: {', '.join(runs) or 'none'})")
    out = dict(rows={}, busy=[], files={})
    leases = []
    try:
        for r in [run] if run else runs:
            try:
                leases.append(lk.RunLease(lake, r).acquire())
            except UserError:
                out["busy"].append(r)
                log.warning("repair: run %s is being captured; left alone", r)
                continue
            out["rows"][r] = len(delete_incomplete(lake, r))
        out["files"] = remove_unreferenced(lake, {l.holder for l in leases}, min_age_s)
    finally:
        for l in leases:
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
                   help=f"Only remove files older than this many seconds (default: the lease lifetime, {lk.LEASE_TTL_S:.0f}).")
    return p
