"""Start cost of a capture as a run grows: finding a killed capture's incomplete rows.

Every capture start deletes rows of samples whose group never committed its `samples` rows. Read
naively that means the sample id of every `tokens` and `blocks` row of the run (for Qwen3-32B over a
large corpus, billions of rows); `repair.delete_incomplete(since=clean_marks)` reads only fragments
committed after the run was last known clean. This builds runs of N groups (bench_commit's synthetic
groups through the driver's write/commit path), leaves one killed group (tokens and blocks committed,
no samples), and times both reads at each N, in this process, median of 3.

    .venv/bin/python bench/bench_start.py --at 100,1000,4000 --out bench/results/start.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_commit import SAMPLES, TABLES, TOKENS, commit_group, group_tables, this_machine, write_markdown  # noqa: E402

from tourray.lake.tables import Lake, schema  # noqa: E402
from tourray.lake.repair import clean_marks, delete_incomplete, started_samples  # noqa: E402


def timed(fn, repeat: int = 3) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--at", default="100,1000,4000", help="Run sizes (groups) at which to measure.")
    ap.add_argument("--out", default=None, help="Write a markdown table here.")
    args = ap.parse_args()
    at = sorted(int(x) for x in args.at.split(","))
    schemas = {t: schema(t, store_dtype="float16", hidden_size=64) for t in TABLES}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(tmp + "/lake")
        for t in TABLES:
            lake.ensure(t, schemas[t])
        g = 0
        for n in at:
            while g < n:
                g += 1
                commit_group(lake, g, schemas)
            complete = set(lake.read("samples", ["sample_id"]).column(0).to_pylist())
            marks = clean_marks(lake, len(complete))  # the run was clean here (its last capture finished)
            killed = group_tables(10**6 + n, schemas)  # then a capture killed after blocks + tokens
            for t in ("blocks", "tokens"):
                lake.commit(t, lake.write_fragments(t, killed[t], schemas[t]))
            full = timed(lambda: started_samples(lake, "b") - complete)
            since = timed(lambda: started_samples(lake, "b", marks) - complete)
            assert started_samples(lake, "b", marks) - complete == started_samples(lake, "b") - complete
            rows.append((n, lake.dataset("tokens").count_rows(), full, since))
            print(rows[-1], flush=True)
            delete_incomplete(lake, "b", complete, since=marks)  # clean again for the next size
    machine = this_machine()
    lines = [f"# Start cost: finding a killed capture's incomplete rows ({machine})", "",
             f"bench/bench_start.py --at {args.at}: groups of {SAMPLES} samples x {TOKENS} tokens (bench_commit's), "
             "one killed group on top; seconds = median of 3 of reading the run's started sample ids "
             "(what delete_incomplete does before deleting), full read vs since the run's clean marks.", "",
             "| groups | tokens rows | full read (s) | since clean marks (s) | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {n:,} | {t:,} | {a:.4f} | {b:.4f} | {a / b:.1f}x |" for n, t, a, b in rows]
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
