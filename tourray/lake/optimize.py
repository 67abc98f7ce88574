"""`tourray optimize`: compact a lake's small fragments and drop its old versions.

A capture commits once per table per group, so after N groups each table has ~N fragments and N
versions (a manifest each): planning, commits and every scan pay per fragment. Lance's own
compaction (`optimize.compact_files`, which keeps row order and rebases over concurrent appends)
merges them, and `cleanup_old_versions` deletes manifests and files no kept version needs.

What is kept: always each table's latest version (what a resumed run and new readers open), and
every version younger than `older_than` (a reader that opened an older snapshot, such as a stats
plan pinned to an activations version, keeps working if it finishes within that window).

Never while a capture holds the lake: its workers write data files before the driver commits
them, and a commit of a compaction racing orphan deletes, or a cleanup with `delete_unverified`,
would lose them: any unexpired row of the lake's `leases` table (`tourray.lake.tables.live_leases`, the
capture's lease) refuses the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
from dataclasses import dataclass

from tourray.config import add_storage_options_flag
from tourray.errors import UserError
from tourray.lake.tables import Lake, live_leases


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
    """Compact every table, then drop versions older than `older_than` (never the latest).

    `delete_unverified` also removes data files no version references that are younger than
    Lance's 7-day safety window: leftovers of a crashed writer, but also a live writer's
    not-yet-committed files, hence only with no capture running (the lease check)."""
    lake = lake if isinstance(lake, Lake) else Lake(lake)
    tables = lake.tables()
    if not tables:
        raise UserError(f"--lake: no tourray tables under {lake.root}")
    if held := live_leases(lake):
        who = ", ".join(str(r.get("run") or r.get("holder") or r) for r in held[:3])
        raise UserError(f"--lake {lake.root} is held by a running capture ({len(held)} live lease(s): {who}); "
                        "optimize after it finishes")
    out = []
    for t in tables:
        ds = lake.dataset(t)
        frags, versions = len(ds.get_fragments()), len(ds.versions())
        if frags > 1 or ds.stats.dataset_stats()["num_deleted_rows"]:
            ds.optimize.compact_files(target_rows_per_fragment=target_rows_per_fragment)
        ds = lake.dataset(t)
        stats = ds.cleanup_old_versions(older_than=older_than, delete_unverified=delete_unverified)
        ds = lake.dataset(t)
        out.append(TableResult(t, frags, len(ds.get_fragments()), versions, len(ds.versions()), stats.bytes_removed))
    return out


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
                                          "(refused while a capture holds the lake).")
    p.description = __doc__.split("\n\n", 1)[1]
    p.epilog = "examples:\n  tourray optimize --lake lake\n  tourray optimize --lake lake --older-than 0s"
    p.add_argument("--lake", default="lake", help="Lake root (default: lake).")
    add_storage_options_flag(p)
    p.add_argument("--older-than", default="1h",
                   help="Drop versions older than this (s, m, h, d; default 1h); the latest is always kept.")
    p.add_argument("--delete-unverified", action="store_true",
                   help="Also delete unreferenced data files younger than 7 days (a crashed writer's leftovers).")
    p.add_argument("--target-rows", type=int, default=1 << 20, help="Rows per compacted fragment (default 1048576).")
    return p
