"""`tourray optimize`: compact a lake's small fragments and drop its old versions.

A capture commits once per table per group, so after N groups each table has ~N fragments and N
versions (a manifest each): planning, commits and every scan pay per fragment. Lance's own
compaction (`optimize.compact_files`, which keeps row order and rebases over concurrent appends)
merges them, and `cleanup_old_versions` deletes manifests and files no kept version needs. The
compacted fragments are put back under the table's zone map of `run` (`Lake.index_runs`). Samples
captured before `block_sums` existed get theirs first (`write_block_sums`).

What is kept: always each table's latest version (what a resumed run and new readers open), and
every version younger than `older_than` (a reader that opened an older snapshot, such as a stats
plan pinned to an activations version, keeps working if it finishes within that window).

Optimize holds a lake-wide lease (kind "optimize") for the whole command, from its check to its
last delete: its compaction writes new files before it commits them, and `tourray repair` or a
resuming capture removes an unreferenced file only when it is older than every live lease. It is
refused when another writer holds a lease at its start (a capture, a repair); a writer that
starts later is safe from it: `--delete-unverified` removes unreferenced files only when they are
older than the oldest live lease (its own included), never Lance's blanket cleanup of them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
from dataclasses import dataclass

from tourray.config import add_storage_options_flag
from tourray.errors import UserError
from tourray.lake.repair import remove_unreferenced_sized
from tourray.lake.sql import block_sums_from_rows, connect
from tourray.lake.tables import Lake, Lease, _retrying, live_leases, schema
from tourray.lake.verify import stored_keys

log = logging.getLogger("tourray")


@dataclass
class TableResult:
    table: str
    fragments_before: int
    fragments_after: int
    versions_before: int
    versions_after: int
    bytes_removed: int


def parse_age(text: str) -> dt.timedelta:
    """'0s', '90m', '1h', '7d' -> timedelta (how old a version must be to be dropped)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(text))
    if not m:
        raise UserError(f"--older-than {text!r}: give a number and a unit s, m, h or d (e.g. 1h, 0s)")
    return dt.timedelta(seconds=float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]])


def optimize(lake: str | Lake, older_than: dt.timedelta = dt.timedelta(hours=1), delete_unverified: bool = False,
             target_rows_per_fragment: int = 1 << 20) -> list[TableResult]:
    """Compact every table, then drop versions older than `older_than` (never the latest), all under
    a lake-wide lease of kind "optimize".

    `delete_unverified` also removes data files no version references that are younger than
    Lance's 7-day safety window (leftovers of a crashed writer), but only those older than the
    oldest live lease: a live writer's not-yet-committed files are younger than its lease."""
    lake = lake if isinstance(lake, Lake) else Lake(lake)
    if not lake.tables():
        raise UserError(f"--lake: no tourray tables under {lake.root}")
    with lake.lease("optimize") as lease:
        if held := [r for r in live_leases(lake) if r["holder"] != lease.holder]:
            kinds = " and ".join(sorted({r.get("kind") or "capture" for r in held}))
            who = ", ".join(str(r.get("run") or r.get("holder") or r) for r in held[:3])
            raise UserError(f"--lake {lake.root} is held by a running {kinds} ({len(held)} live lease(s): {who}); "
                            "optimize after it finishes")
        write_block_sums(lake, lease)
        out = []
        for t in lake.tables():
            ds = lake.dataset(t)
            frags, versions = len(ds.get_fragments()), len(ds.versions())
            if frags > 1 or ds.stats.dataset_stats()["num_deleted_rows"]:
                _retrying(lambda: compact(lake, t, lease, target_rows_per_fragment), tries=4)
            if t != "leases":  # compaction's new fragments are outside the zone map of `run` until indexed
                lease.check()
                lake.index_runs([t])
            ds = lake.dataset(t)
            stats = ds.cleanup_old_versions(older_than=older_than)  # files of dropped versions: never in flight
            ds = lake.dataset(t)
            out.append(TableResult(t, frags, len(ds.get_fragments()), versions, len(ds.versions()), stats.bytes_removed))
        if delete_unverified:
            lease.check()
            removed = remove_unreferenced_sized(lake, {lease.holder}, min_age_s=0)
            for r in out:
                r.bytes_removed += removed.get(r.table, (0, 0))[1]
    return out


def write_block_sums(lake: Lake, lease: Lease) -> int:
    """Write the `block_sums` rows of complete samples captured before the table existed (from their
    `token_layers` rows), so `layer_similarity.sql` reads sums for them too; return the rows written.

    Each run is done under its own exclusive lease (skipped when a capture or a drop holds it), with
    the samples read after taking it: a run dropped meanwhile must not get sums of samples it lost."""
    if not (lake.exists("token_layers") and lake.exists("samples")) or \
            "text_start" not in lake.dataset("samples").schema.names:  # no text spans: nothing to sum over
        return 0
    stores = {r["run"] for r in lake.read("runs").to_pylist() if stored_keys(r)}  # runs with vectors
    # runs with a complete sample that has no block_sums rows, from the two small tables: token_layers
    # (~10^3 rows per block_sums row) is read only for those runs
    todo = [run for (run,) in connect(lake).sql(
        "SELECT DISTINCT s.run FROM samples AS s ANTI JOIN raw_block_sums AS b "
        "ON b.run = s.run AND b.sample_id = s.sample_id ORDER BY s.run").fetchall() if run in stores]
    expected = schema("block_sums")
    written = 0
    for run in todo:
        run_lease = lake.lease("optimize", run=run)
        try:
            run_lease.acquire()
        except UserError as e:
            log.warning("optimize: block_sums of run %s not written: %s", run, e)
            continue
        try:
            rows = block_sums_from_rows(connect(lake), run, missing_only=True)
            if rows.num_rows:
                lake.ensure("block_sums", expected)
                lease.check()
                run_lease.check()
                lake.append("block_sums", rows, expected)
                log.info("optimize: block_sums of %d block(s) of run %s written from token_layers", rows.num_rows, run)
                written += rows.num_rows
        finally:
            run_lease.release()
    return written


def compact(lake: Lake, table: str, lease: Lease, target_rows_per_fragment: int) -> None:
    """Lance's compaction (`compact_files`) in its three steps: plan, write the merged fragments
    (files no version references yet), commit them; the lease is checked right before the commit
    (an optimize that stalled past its lease may have had those files removed as debris)."""
    from lance.optimize import Compaction

    ds = lake.dataset(table)
    plan = Compaction.plan(ds, dict(target_rows_per_fragment=target_rows_per_fragment))
    if not plan.num_tasks():
        return
    rewrites = [task.execute(ds) for task in plan.tasks]
    commit_compaction(lake, table, lease, ds, rewrites)


def commit_compaction(lake: Lake, table: str, lease: Lease, ds, rewrites) -> None:
    """Commit written compaction fragments (a seam: tests hold a compaction here, files written)."""
    from lance.optimize import Compaction

    lease.check()
    Compaction.commit(ds, rewrites)
    log.info("optimize: %s compacted", table)


def report(results: list[TableResult], root: str) -> str:
    lines = [f"optimized {root}:", "  table           fragments      versions    freed"]
    for r in results:
        lines.append(f"  {r.table:<14} {r.fragments_before:>5} -> {r.fragments_after:<5} {r.versions_before:>5} -> "
                     f"{r.versions_after:<5} {r.bytes_removed / 2**20:>7.1f} MiB")
    return "\n".join(lines)


def cmd_optimize(args) -> int:
    lake = Lake(args.lake, args.storage_options)
    print(report(optimize(lake, parse_age(args.older_than), args.delete_unverified, args.target_rows), lake.root))
    return 0


def add_parser(command) -> argparse.ArgumentParser:
    """Add `tourray optimize`; `command(name, fn, help)` is `tourray.cli.parser`'s helper."""
    p = command("optimize", cmd_optimize, "Compact the lake's fragments and drop old table versions "
                                          "(refused while a capture or repair holds a lease on the lake).")
    p.description = __doc__.split("\n\n", 1)[1]
    p.epilog = "examples:\n  tourray optimize --lake lake\n  tourray optimize --lake lake --older-than 0s"
    p.add_argument("--lake", default="lake", help="Lake root (default: lake).")
    add_storage_options_flag(p)
    p.add_argument("--older-than", default="1h",
                   help="Drop versions older than this (s, m, h, d; default 1h); the latest is always kept.")
    p.add_argument("--delete-unverified", action="store_true",
                   help="Also delete unreferenced data files younger than 7 days (a crashed writer's leftovers), "
                        "when older than every live lease.")
    p.add_argument("--target-rows", type=int, default=1 << 20, help="Rows per compacted fragment (default 1048576).")
    return p
