#!/usr/bin/env python
"""A capture of a real model through Ray against its plain forward, in one process: steady state, end
to end and with inline statistics (issue 27's targets: >= 0.85x, >= 0.6x end to end, >= 0.8x with
`units`).

On SmolLM2-135M-Instruct (make demo's import at .cache/smollm2-135m-instruct), every layer, both sites,
float16 store, the first N train texts behind the system prompt, in the order a, b, b+units, a:

  (a)        the model's batched forward over the capture's exact padded batches (bench_capture.encode_batches)
  (b)        run_capture through embedded Ray (the first run starts Ray): steady = groups 2..G as the
             actor wrote them; end to end = tokens / the whole call, Ray start included
  (b+units)  the same with inline `units` statistics (a second run in the same lake, Ray already up;
             with --units-first it runs first and starts Ray)

The steady ratio compares the groups in the steady window with the plain forward over *those*
groups' batches (timed group by group, matched by token count): texts differ in length, and a group
with one long text pads its batch (its forward can take twice a typical group's), so a mean rate over
all groups would flatter or punish a run by which group fell outside its window.
With --memory, the capture actor's peak memory at 1x and 4x the texts (the same texts repeated, so
the batches are alike): `tourray capture` subprocesses, bench_capture.capture_subprocess_memory.

Usage:  .venv/bin/python bench/capture_steady.py [--model DIR] [-n 48] [--group-size 8]
Prints a table; writes <out>/capture_steady.json; the lake stays in <out> (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_capture as bc  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / ".cache/smollm2-135m-instruct", help="Checkpoint folder (default: %(default)s).")
    p.add_argument("-n", "--num-samples", type=int, default=48, help="Train texts (default %(default)s).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8, help="Samples per group (default %(default)s).")
    p.add_argument("--sites", default="resid_post,resid_mid")
    p.add_argument("--samples", type=Path, default=REPO / "samples" / "train")
    p.add_argument("--system-prompt", type=Path, default=REPO / "samples" / "system_prompt.md")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "steady")
    p.add_argument("--memory", type=int, default=0, metavar="N",
                   help="Also measure the actor's peak memory on the first N texts at 1x and 4x (0: skip).")
    p.add_argument("--mem-interval", type=float, default=0.3, help="RSS sampling interval, s (default %(default)s).")
    p.add_argument("--units-first", action="store_true",
                   help="Run (b+units) before (b): the first capture starts Ray, and its window may share the CPU "
                        "with Ray's own start-up work; swapping the order shows how much that weighs.")
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no checkpoint (make demo imports SmolLM2 there)")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    files = bc.copy_samples(args.samples, args.num_samples, out / "samples")
    batches, tokens = bc.encode_batches(args.model, out / "samples", args.system_prompt, args.batch_size, args.group_size)
    res = dict(environment=bc.environment(), model=str(args.model), samples=len(files), tokens=tokens,
               settings=dict(batch_size=args.batch_size, group_size=args.group_size, sites=args.sites,
                             store_dtype="float16", layers="all", torch_threads=torch.get_num_threads()))
    bc.log(f"{len(files)} texts, {tokens:,} tokens, {len(batches)} batches; load {bc.load1()}")
    model = bc.load_model(args.model)
    per_group = args.group_size // args.batch_size
    groups = [batches[g : g + per_group] for g in range(0, len(batches), per_group)]
    plain = [bc.bench_plain(model, batches, tokens)]
    group_s = [plain_by_group(model, groups)]
    bc.log(f"(a) {plain[-1]['tokens_per_s']:,.0f} tokens/s")
    runs = {}
    order = (("b", []), ("b+units", ["units"]))
    for name, stats in order[::-1] if args.units_first else order:
        args.stats = stats
        runs[name] = bc.bench_capture(args, args.model, out / "samples", out / "lake", name.replace("+", "-"))
        bc.log(f"({name}) steady {runs[name].get('steady_tokens_per_s')} tokens/s, wall {runs[name]['wall_seconds']} s")
    import ray

    ray.shutdown()
    plain.append(bc.bench_plain(model, batches, tokens))
    group_s.append(plain_by_group(model, groups))
    bc.log(f"(a) {plain[-1]['tokens_per_s']:,.0f} tokens/s")
    a = sum(x["tokens_per_s"] for x in plain) / len(plain)
    # plain seconds per group (mean of the two passes), keyed by the group's token count
    by_tokens = {}
    for g, (t0, t1) in zip(groups, zip(*group_s)):
        by_tokens.setdefault(sum(sum(b["n"]) for b in g), []).append((t0 + t1) / 2)
    for r in runs.values():
        window = r["group_tokens_written_order"][1:]
        if all(len(by_tokens.get(t, [])) == 1 for t in window) and r.get("steady_seconds"):
            r["plain_seconds_same_groups"] = round(sum(by_tokens[t][0] for t in window), 3)
            r["steady_ratio_same_groups"] = round(r["plain_seconds_same_groups"] / r["steady_seconds"], 3)
    first = next(iter(runs))  # the run that started Ray
    res.update(plain_runs=plain, plain_group_seconds=group_s, plain_tokens_per_s=round(a, 1), capture=runs, ratios={
        "(b)/(a) steady, same groups": runs["b"].get("steady_ratio_same_groups"),
        "(b+units)/(a) steady, same groups": runs["b+units"].get("steady_ratio_same_groups"),
        "(b)/(a) steady, mean rates": bc.ratio(runs["b"].get("steady_tokens_per_s"), a),
        f"({first})/(a) end to end, Ray start included": bc.ratio(runs[first]["wall_tokens_per_s"], a),
        f"({first})/(a) capture_seconds (actor start + model load included)": bc.ratio(runs[first]["summary_tokens_per_s"], a),
        "(b+units)/(a) steady, mean rates": bc.ratio(runs["b+units"].get("steady_tokens_per_s"), a),
    })
    if args.memory:
        res["memory"] = memory(args, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_steady.json").write_text(json.dumps(res, indent=1, default=str))
    print(bc.RULE)
    bc_rows = [("(a) plain forward, tokens/s (mean of 2)", a, ",.0f")]
    for name, r in runs.items():
        bc_rows += [(f"({name}) steady tokens/s, groups 2..{r['groups']} [actor cpu util {r.get('steady_actor_cpu_util')}]",
                     r.get("steady_tokens_per_s"), ",.0f"),
                    (f"({name}) wall s (whole call)", r["wall_seconds"], ".1f"),
                    (f"({name}) start-up s (first group beyond its tokens' time)", r.get("startup_overhead_seconds"), ".1f")]
    for label, v, spec in bc_rows:
        print(bc.fmt_row(label, v, spec))
    print(bc.RULE)
    for k, v in res["ratios"].items():
        print(bc.fmt_row(k, v, ".3f"))
    print(f"\nwritten {out / 'capture_steady.json'}")
    return 0


def plain_by_group(model, groups) -> list[float]:
    """Seconds of the plain forward over each group's batches."""
    import time

    import torch

    out = []
    with torch.inference_mode():
        for g in groups:
            t0 = time.perf_counter()
            for b in g:
                model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False).logits
            out.append(time.perf_counter() - t0)
    return out


def memory(args, out: Path) -> dict:
    """The capture actor's peak memory at 1x and 4x the first `args.memory` texts (repeated, so
    every batch is alike), in fresh `tourray capture` subprocesses, both sites, float16."""
    res = {}
    for factor in (1, 4):
        sdir = out / f"samples_mem_{factor}x"
        bc.copy_samples(args.samples, args.memory, sdir, repeat=factor)
        m = bc.capture_subprocess_memory(args, args.model, sdir, out / f"lake_mem_{factor}x", f"mem{factor}x",
                                         out / f"capture_mem_{factor}x.log")
        res[f"{factor}x"] = m
        bc.log(f"memory {factor}x: {m['samples']} texts, {m['tokens']:,} tokens, actor peak RSS "
               f"{m['actor_peak_rss'] / 2**30:.2f} GiB, driver {m['driver_peak_rss'] / 2**30:.2f} GiB")
    res["actor_4x_over_1x"] = round(res["4x"]["actor_peak_rss"] / res["1x"]["actor_peak_rss"], 3)
    return res


if __name__ == "__main__":
    sys.exit(main())
