#!/usr/bin/env python
"""Eval benchmark: judging sweep (or QA) variants with the original's distribution read from the lake
(`kl_top_k`, the default) against running the original beside every variant (`kl_top_k: 0`).

One invocation, both modes, so the ratio compares figures taken under the same machine load. It runs
jobs/configs/prune_sweep.yaml's sweep (SmolLM2-135M-Instruct, its 12 held-out texts) on a subset of its
variants, twice, each on its own copy of the lake (the evidence run is shared; every derived sweep run is
dropped from the copies first, so both modes capture the original's eval run and every variant afresh):

  before kl_top_k 0 and hf.prefix_cache off: each variant's eval capture loads and runs the original as
         --reference, every text's system prompt forwarded again (what every sweep did before).
  exact  kl_top_k 0, the shared prompt prefix run once per model (hf.prefix_cache, the default).
  lake   kl_top_k K and the prefix cache: the original's eval run stores its top-K distribution (--logits K) and each variant's
         capture reads it (--reference-run): no second model.

Reported: seconds per variant (apply + eval capture + judge) in each mode and the ratios to `before`, the whole
sweep's seconds, whether every verdict is identical, and the error of the stored-distribution KL (a lower
bound) against the exact one, per variant and pooled.

With --qa the same three modes judge the QA report's variants instead (the config's qa section, by default
jobs/configs/demo.yaml's: base, a rotated fold, width, a combined compression). Each mode captures its own
original eval run (<run>.qa-<name>.base; a configured base_run is not used, its settings would differ
between modes), and a QA variant's seconds also hold its in-process passes (hidden-state agreement, timing
over repeats), which the modes do not change.

Usage:  .venv/bin/python bench/bench_eval.py [--config jobs/configs/prune_sweep.yaml] [--top-k 1024]
        .venv/bin/python bench/bench_eval.py --qa [--config jobs/configs/demo.yaml]
Needs the evidence run of the config in its lake (`python jobs/prune_sweep.py` or `make demo` makes it).
Writes bench/out/eval/results.json (results_qa.json with --qa) and prints a table.
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


def summarize(res: dict) -> None:
    """Ratios, verdict identity and KL error of the three modes; printed, and added to `res`."""
    bf, ex, lk = (res["modes"][m]["variants"] for m in ("before", "exact", "lake"))
    names = list(ex)
    # the same PASS/FAIL and the same failing criterion (its message quotes ratios to 8 digits)
    res["verdicts_identical"] = all(len({(m[n]["passed"], m[n]["reason"].split(":")[0]) for m in (bf, ex, lk)}) == 1
                                    for n in names)
    res["perplexity_max_rel_diff"] = max(abs(a / b - 1) for n in names for m in (ex, lk)
                                         for a, b in zip(m[n]["ppl"], bf[n]["ppl"]))
    res["seconds_per_variant"] = {m: sum(res["modes"][m]["variants"][n]["seconds"] for n in names) / len(names)
                                  for m in ("before", "exact", "lake")}
    res["ratio_lake_over_before"] = res["seconds_per_variant"]["lake"] / res["seconds_per_variant"]["before"]
    res["ratio_exact_over_before"] = res["seconds_per_variant"]["exact"] / res["seconds_per_variant"]["before"]
    judged = [n for n in names if ex[n]["kl"]]  # (the QA's base variant is the original itself: no KL)
    res["kl_rel_error_max"] = max((ex[n]["kl"] - lk[n]["kl"]) / ex[n]["kl"] for n in judged)
    # a lower bound up to float32 rounding: 1e-6 relative, and 1e-6 nats absolute for a function-preserving
    # variant (a rotated fold's KL is ~5e-8, rounding noise either way)
    res["kl_bound_holds"] = all(lk[n]["kl"] <= ex[n]["kl"] * (1 + 1e-6) + 1e-6 for n in judged)
    print(f"{'variant':28} {'before s':>8} {'exact s':>8} {'lake s':>8} {'KL exact':>9} {'KL lake':>9} {'rel err':>8}  verdict")
    for n in names:
        kx, kl = ex[n]["kl"] or 0.0, lk[n]["kl"] or 0.0
        print(f"{n:28} {bf[n]['seconds']:8.1f} {ex[n]['seconds']:8.1f} {lk[n]['seconds']:8.1f} {kx:9.4f} {kl:9.4f} "
              f"{(kx - kl) / kx if kx else 0:8.2e}  {'PASS' if ex[n]['passed'] else 'FAIL'}/"
              f"{'PASS' if lk[n]['passed'] else 'FAIL'}")
    spv = res["seconds_per_variant"]
    print(f"per variant: before {spv['before']:.1f} s, exact {spv['exact']:.1f} s ({res['ratio_exact_over_before']:.2f}x), "
          f"lake {spv['lake']:.1f} s ({res['ratio_lake_over_before']:.2f}x); whole job: "
          + ", ".join(f"{m} {res['modes'][m]['seconds']:.0f} s" for m in res["modes"])
          + f"; verdicts identical: {res['verdicts_identical']}, perplexities within "
          f"{res['perplexity_max_rel_diff']:.1e} (relative); KL bound holds: {res['kl_bound_holds']}, "
          f"largest relative KL error {res['kl_rel_error_max']:.2e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="Job config with a sweep section (default: jobs/configs/prune_sweep.yaml), "
                                                  "or with --qa a qa section (default: jobs/configs/demo.yaml).")
    p.add_argument("--qa", action="store_true", help="Judge the config's QA variants instead of its sweep's.")
    p.add_argument("--top-k", type=int, default=1024, help="kl_top_k of the lake mode (default: %(default)s).")
    p.add_argument("--methods", default="block-influence,reverse,random", help="Sweep methods (subset of the config's).")
    p.add_argument("--removed", default="2,4", help="Blocks removed (subset of the config's).")
    p.add_argument("--seeds", type=int, default=2, help="Random seeds.")
    args = p.parse_args()
    args.config = args.config or str(REPO / "jobs/configs" / ("demo.yaml" if args.qa else "prune_sweep.yaml"))
    os.chdir(REPO)  # the config's relative paths
    import torch

    from tourray.recipes import DemoConfig

    if args.qa:
        from tourray.qa.job import run_qa as run

        cfg = DemoConfig.from_yaml(args.config).qa
        base, prefix = cfg.model_copy(update=dict(base_run=None)), f"{cfg.run}.qa-{cfg.name}"
    else:
        from tourray.prune.sweep import run_sweep as run

        cfg = DemoConfig.from_yaml(args.config).sweep
        base, prefix = cfg.model_copy(update=dict(
            methods=args.methods.split(","), removed=[int(x) for x in args.removed.split(",")], seeds=args.seeds,
            patch_methods=[m for m in cfg.patch_methods or [] if m in args.methods], generate_prompts=None, workers=1)), cfg.run
    OUT.mkdir(parents=True, exist_ok=True)
    res = dict(machine=f"{platform.machine()} {os.cpu_count()} cores", python=sys.version.split()[0],
               torch=torch.__version__, config=args.config, section="qa" if args.qa else "sweep", top_k=args.top_k, modes={})
    tag = "qa-" if args.qa else ""
    for mode, k, cached in (("before", 0, False), ("exact", 0, True), ("lake", args.top_k, True)):
        lake = fresh_lake(REPO / cfg.lake, OUT / f"lake-{tag}{mode}", prefix)
        t0 = time.perf_counter()
        s = run(base.model_copy(update=dict(lake=str(lake), kl_top_k=k, workdir=str(OUT / f"work-{tag}{mode}"),
                                            hf=base.hf.model_copy(update=dict(prefix_cache=cached)),
                                            reports=str(OUT / f"reports-{tag}{mode}"))), progress=False)
        res["modes"][mode] = dict(seconds=time.perf_counter() - t0, variants={
            v["variant"]: dict(seconds=v["seconds"], passed=v["verdict"]["passed"], reason=v["verdict"]["reason"],
                               kl=v["comparison"][-1]["mean_kl"],
                               ppl=[c["variant_perplexity"] for c in v["comparison"]]) for v in s["variants"]})
        print(f"{mode}: {len(s['variants'])} variants, {res['modes'][mode]['seconds']:.0f} s", flush=True)
    try:
        summarize(res)
    finally:  # the raw figures are kept even if the summary fails
        (OUT / ("results_qa.json" if args.qa else "results.json")).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
