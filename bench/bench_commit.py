"""Commit cost and manifest size as a lake grows group by group, before and after `optimize`.

A capture commits each group as one Lance Append per table (blocks, tokens, activations,
token_layers, samples: ~4-5 commits a group), so after N groups each table has N fragments and N
versions. This writes N small groups of synthetic rows with the lake's real schemas through
`Lake.write_fragments` + `Lake.commit` (the driver's path; no model), and records at chosen groups
the seconds its commits took and the bytes of each table's latest manifest; then it runs
`tourray.lake.optimize` and measures one more group.

    .venv/bin/python bench/bench_commit.py --groups 1000 --out bench/results/commit.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from tourray.lake.tables import Lake, schema, vectors_to_arrow
from tourray.lake.optimize import optimize

TABLES = ("blocks", "tokens", "activations", "samples")  # the capture's COMMIT_ORDER, minus optional tables
D, LAYERS, SAMPLES, TOKENS = 64, (-1, 0), 2, 16


def group_tables(g: int, schemas: dict) -> dict[str, pa.Table]:
    """One group's rows: SAMPLES samples of TOKENS tokens, LAYERS layers of D-wide float16 vectors."""
    sids = [f"{g:08d}{i:08d}" for i in range(SAMPLES)]
    rng = np.random.default_rng(g)
    n = SAMPLES * TOKENS
    sid_tok = [s for s in sids for _ in range(TOKENS)]
    pos = list(range(TOKENS)) * SAMPLES
    act_sid = [s for s in sids for _ in LAYERS for _ in range(TOKENS)]
    act_layer = [l for _ in sids for l in LAYERS for _ in range(TOKENS)]
    cols = {
        "samples": dict(run=["b"] * SAMPLES, sample_id=sids, source=[f"s/{s}.txt" for s in sids], category=["c"] * SAMPLES,
                        text=["t" * 80] * SAMPLES, sha256=["0" * 64] * SAMPLES, n_tokens=[TOKENS] * SAMPLES,
                        truncated=[False] * SAMPLES, text_start=[0] * SAMPLES, text_end=[TOKENS] * SAMPLES,
                        tokens_sha256=["0" * 64] * SAMPLES),
        "tokens": dict(run=["b"] * n, sample_id=sid_tok, pos=pos, token_id=pos, token=["x"] * n, char_start=pos,
                       char_end=pos, segment=["text"] * n, surprisal=[1.0] * n, entropy=[1.0] * n,
                       token_class=["word"] * n, kl_ref=[None] * n),
        "blocks": dict(run=["b"] * SAMPLES * len(LAYERS), sample_id=[s for s in sids for _ in LAYERS],
                       layer=[l for _ in sids for l in LAYERS], site=["resid_post"] * SAMPLES * len(LAYERS),
                       pos_start=[0] * SAMPLES * len(LAYERS), pos_end=[TOKENS] * SAMPLES * len(LAYERS),
                       sha256=["0" * 64] * SAMPLES * len(LAYERS)),
        "activations": dict(run=["b"] * len(act_sid), sample_id=act_sid, pos=pos * len(LAYERS), layer=act_layer,
                            site=["resid_post"] * len(act_sid)),
    }
    out = {}
    for t, c in cols.items():
        s = schemas[t]
        arrays = []
        for f in s:
            if f.name == "h":
                arrays.append(vectors_to_arrow(rng.standard_normal((len(act_sid), D)).astype(np.float16), "float16"))
            else:
                arrays.append(pa.array(c[f.name], f.type))
        out[t] = pa.Table.from_arrays(arrays, schema=s)
    return out


def manifest_bytes(lake: Lake) -> tuple[int, int]:
    """(bytes of every table's latest manifest, bytes of all their _versions folders)."""
    latest = total = 0
    for t in TABLES:
        files = list((Path(lake.root) / f"{t}.lance" / "_versions").glob("*.manifest"))
        latest += max(files, key=lambda p: p.stat().st_mtime_ns).stat().st_size
        total += sum(p.stat().st_size for p in files)
    return latest, total


def commit_group(lake: Lake, g: int, schemas: dict) -> float:
    """Write one group's fragments (not timed) and commit them table by table; seconds committing."""
    frags = {t: lake.write_fragments(t, tbl, schemas[t]) for t, tbl in group_tables(g, schemas).items()}
    t0 = time.perf_counter()
    for t in TABLES:
        lake.commit(t, frags[t])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--at", default="1,100,500,1000", help="Groups at which to record figures.")
    ap.add_argument("--window", type=int, default=5, help="Groups averaged around each recorded group.")
    ap.add_argument("--out", default=None, help="Write a markdown table here.")
    args = ap.parse_args()
    at = [int(x) for x in args.at.split(",")]
    schemas = {t: schema(t, store_dtype="float16", hidden_size=D) for t in TABLES}
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(tmp + "/lake")
        for t in TABLES:
            lake.ensure(t, schemas[t])
        rows, times, t_start = [], {}, time.perf_counter()
        for g in range(1, args.groups + 1):
            times[g] = commit_group(lake, g, schemas)
            if g in at:
                lo = [times[i] for i in range(max(1, g - args.window + 1), g + 1)]
                latest, total = manifest_bytes(lake)
                frags = len(lake.dataset("activations").get_fragments())
                rows.append((f"group {g}", statistics.median(lo), latest, total, frags))
                print(rows[-1], flush=True)
        build_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        optimize(lake, older_than=dt.timedelta(0))
        opt_s = time.perf_counter() - t0
        latest, total = manifest_bytes(lake)
        rows.append(("after optimize (no new group)", float("nan"), latest, total,
                     len(lake.dataset("activations").get_fragments())))
        after = [commit_group(lake, args.groups + i, schemas) for i in range(1, args.window + 1)]
        latest, total = manifest_bytes(lake)
        rows.append((f"after optimize, +{args.window} groups", statistics.median(after), latest, total,
                     len(lake.dataset("activations").get_fragments())))
        print(rows[-2:], f"optimize {opt_s:.2f} s", flush=True)
    machine = this_machine()
    lines = [f"# Commit cost and manifest size by lake size ({machine})", "",
             f"bench/bench_commit.py --groups {args.groups}: per group {len(TABLES)} commits ({', '.join(TABLES)}), "
             f"{SAMPLES} samples x {TOKENS} tokens x {len(LAYERS)} layers, d={D} float16; "
             f"commit seconds = median over the last {args.window} groups of the time of one group's {len(TABLES)} "
             "commits (fragment writing not included); manifest bytes = the latest manifest of each table, summed; "
             "all manifests = every version's manifest kept on disk.", "",
             "| point | commit s / group | latest manifests (bytes) | all manifests (bytes) | activations fragments |",
             "|---|---|---|---|---|"]
    for name, s, latest, total, frags in rows:
        lines.append(f"| {name} | {'-' if s != s else f'{s:.4f}'} | {latest:,} | {total:,} | {frags} |")
    lines += ["", f"Building {args.groups} groups took {build_s:.0f} s; `optimize --older-than 0s` took {opt_s:.1f} s."]
    write_markdown(lines, args.out)


def this_machine() -> str:
    return (f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"{platform.machine()}, no GPU")


def write_markdown(lines: list[str], out: str | None) -> None:
    """Print the results table and write it to `out` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
