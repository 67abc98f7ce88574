#!/usr/bin/env python
"""Eval benchmark: judging sweep variants with the original's distribution read from the lake
(`kl_top_k`, the default) against running the original beside every variant (`kl_top_k: 0`).

One invocation, both modes, so the ratio compares figures taken under the same machine load. It runs
jobs/configs/prune_sweep.yaml's sweep (SmolLM2-135M-Instruct, its 12 held-out texts) on a subset of its
variants, twice, each on its own copy of the lake (the evidence run is shared; every derived sweep run is
dropped from the copies first, so both modes capture the original's eval run and every variant afresh):

  exact  kl_top_k 0: each variant's eval capture loads and runs the original as --reference.
  lake   kl_top_k K: the original's eval run stores its top-K distribution (--logits K) and each variant's
         capture reads it (--reference-run): no second model.

Reported: seconds per variant (apply + eval capture + judge) in each mode and their ratio, the whole
sweep's seconds, whether every verdict is identical, and the error of the stored-distribution KL (a lower
bound) against the exact one, per variant and pooled.

Usage:  .venv/bin/python bench/bench_eval.py [--config jobs/configs/prune_sweep.yaml] [--top-k 1024]
Needs the evidence run of the config in its lake (`python jobs/prune_sweep.py` or `make demo` makes it).
Writes bench/out/eval/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "eval"


def fresh_lake(src: Path, dst: Path, prefix: str) -> Path:
    """A copy of the lake without the sweep's derived runs (`<run>.*`)."""
    from tourray.lake.runs import drop_run
    from tourray.lake.tables import Lake

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    lake = Lake(str(dst))
    for run in lake.read("runs", ["run"]).column(0).to_pylist():
        if run.startswith(prefix + "."):
            drop_run(lake, run)
    return dst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "jobs/configs/prune_sweep.yaml"), help="Job config with a sweep section.")
    p.add_argument("--top-k", type=int, default=1024, help="kl_top_k of the lake mode (default: %(default)s).")
    p.add_argument("--methods", default="block-influence,reverse,random", help="Sweep methods (subset of the config's).")
    p.add_argument("--removed", default="2,4", help="Blocks removed (subset of the config's).")
    p.add_argument("--seeds", type=int, default=2, help="Random seeds.")
    args = p.parse_args()
    os.chdir(REPO)  # the config's relative paths
    import torch

    from tourray.prune.sweep import run_sweep
    from tourray.recipes import DemoConfig

    cfg = DemoConfig.from_yaml(args.config).sweep
    base = cfg.model_copy(update=dict(methods=args.methods.split(","), removed=[int(x) for x in args.removed.split(",")],
                                      seeds=args.seeds, patch_methods=[m for m in cfg.patch_methods or [] if m in args.methods],
                                      generate_prompts=None, workers=1))
    OUT.mkdir(parents=True, exist_ok=True)
    res = dict(machine=f"{platform.machine()} {os.cpu_count()} cores", python=sys.version.split()[0],
               torch=torch.__version__, config=args.config, top_k=args.top_k, modes={})
    for mode, k in (("exact", 0), ("lake", args.top_k)):
        lake = fresh_lake(REPO / cfg.lake, OUT / f"lake-{mode}", cfg.run)
        t0 = time.perf_counter()
        s = run_sweep(base.model_copy(update=dict(lake=str(lake), kl_top_k=k, workdir=str(OUT / f"work-{mode}"),
                                                  reports=str(OUT / f"reports-{mode}"))), progress=False)
        res["modes"][mode] = dict(seconds=time.perf_counter() - t0, variants={
            v["variant"]: dict(seconds=v["seconds"], passed=v["verdict"]["passed"], reason=v["verdict"]["reason"],
                               kl=v["comparison"][-1]["mean_kl"],
                               ppl=[c["variant_perplexity"] for c in v["comparison"]]) for v in s["variants"]})
        print(f"{mode}: {len(s['variants'])} variants, {res['modes'][mode]['seconds']:.0f} s", flush=True)
    ex, lk = res["modes"]["exact"]["variants"], res["modes"]["lake"]["variants"]
    names = list(ex)
    res["verdicts_identical"] = all(ex[n]["passed"] == lk[n]["passed"] and ex[n]["reason"] == lk[n]["reason"] for n in names)
    res["perplexities_identical"] = all(ex[n]["ppl"] == lk[n]["ppl"] for n in names)
    res["seconds_per_variant"] = {m: sum(res["modes"][m]["variants"][n]["seconds"] for n in names) / len(names)
                                  for m in ("exact", "lake")}
    res["ratio_lake_over_exact"] = res["seconds_per_variant"]["lake"] / res["seconds_per_variant"]["exact"]
    res["kl_rel_error_max"] = max((ex[n]["kl"] - lk[n]["kl"]) / ex[n]["kl"] for n in names)
    res["kl_bound_holds"] = all(lk[n]["kl"] <= ex[n]["kl"] * (1 + 1e-6) for n in names)
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    print(f"{'variant':28} {'exact s':>8} {'lake s':>8} {'KL exact':>9} {'KL lake':>9} {'rel err':>8}  verdict")
    for n in names:
        print(f"{n:28} {ex[n]['seconds']:8.1f} {lk[n]['seconds']:8.1f} {ex[n]['kl']:9.4f} {lk[n]['kl']:9.4f} "
              f"{(ex[n]['kl'] - lk[n]['kl']) / ex[n]['kl']:8.2e}  {'PASS' if ex[n]['passed'] else 'FAIL'}/"
              f"{'PASS' if lk[n]['passed'] else 'FAIL'}")
    print(f"per variant: exact {res['seconds_per_variant']['exact']:.1f} s, lake {res['seconds_per_variant']['lake']:.1f} s "
          f"(ratio {res['ratio_lake_over_exact']:.2f}); whole sweep: exact {res['modes']['exact']['seconds']:.0f} s, "
          f"lake {res['modes']['lake']['seconds']:.0f} s; verdicts identical: {res['verdicts_identical']}, "
          f"perplexities identical: {res['perplexities_identical']}; KL bound holds: {res['kl_bound_holds']}, "
          f"largest relative KL error {res['kl_rel_error_max']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
