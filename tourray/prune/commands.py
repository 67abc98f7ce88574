"""Pruning's commands: `prune plan | apply | verdict | width | sweep`."""

from __future__ import annotations

import argparse
import json

from tourray.config import add_config_flags, config_from_args

PLAN_HELP = ("evidence-guided block-influence (ShortGPT), angular (Gromov et al., contiguous span), u-chop, "
             "entropy-weighted, magnitude, variance; blind reverse, alternating, random (seeded). Definitions: "
             "tourray/prune/plan.py.")
EXAMPLES = {
    "plan": """examples:
  tourray prune plan --lake lake --run smol --method block-influence --remove 6 --out plans/bi6.json
  tourray prune plan --lake lake --run smol --method random --seed 3 --keep 24 --protect 0,-1""",
    "apply": """examples:
  tourray prune apply --model .cache/smollm2-135m-instruct --plan plans/bi6.json --out ckpt/smol-bi6
  tourray prune apply --model .cache/smollm2-135m-instruct --plan plans/ang6.json --patch lstsq --out ckpt/smol-ang6-lstsq""",
    "width": """examples:
  tourray capture --model .cache/smollm2-135m-instruct --samples samples --run smol-w --stats units --store none
  tourray prune width --model .cache/smollm2-135m-instruct --run smol-w --keep-neurons 0.75 --keep-heads 0.67 --out ckpt/smol-w
  tourray prune width --model .cache/smollm2-135m-instruct --run smol --hidden 512 --out ckpt/smol-sliced   # needs stored resid_post""",
    "sweep": """examples:
  python jobs/prune_sweep.py --config jobs/configs/prune_sweep.yaml         # the full sweep on SmolLM2
  tourray prune sweep --model .cache/smollm2-135m-instruct --run smol --methods angular,reverse --removed 4,8
  (verdict criteria: key `criteria:` of a --config YAML)""",
}


def cmd_prune_plan(args) -> int:
    from tourray.prune.plan import PlanConfig, make_plan, write_plan

    cfg = config_from_args(PlanConfig, args)
    plan = make_plan(cfg)
    if cfg.out:
        print(f"{write_plan(plan, cfg.out)}: {plan['method']} removes blocks {plan['removed']} of {plan['num_layers']}")
    else:
        print(json.dumps(plan, indent=1))
    return 0


def cmd_prune_apply(args) -> int:
    from tourray.prune.apply import ApplyConfig, run_apply

    s = run_apply(config_from_args(ApplyConfig, args))
    print(f"{s['out']}: {s['num_layers']} blocks ({s['parameters'] / 1e6:.1f}M parameters), removed {s['removed']}")
    for p in s["patches"]:
        print(f"  patch {p['first']}-{p['last']} -> {p['fold_into']}: mean cosine {p['mean_cos_unpatched']:.4f} "
              f"unpatched, {p['mean_cos_patched']:.4f} patched ({p['tokens']:,} tokens)")
    return 0


def cmd_prune_width(args) -> int:
    from tourray.prune.width import WidthConfig, run_width

    s = run_width(config_from_args(WidthConfig, args), progress=not args.no_progress)
    print(f"{s['out']}: {s['parameters'] / 1e6:.2f}M parameters ({100 * s['parameters'] / s['parameters_before']:.1f}% "
          f"of {s['parameters_before'] / 1e6:.2f}M); config changes: {s['config_changes']}")
    return 0


def cmd_prune_sweep(args) -> int:
    from tourray.prune.sweep import SweepConfig, run_sweep

    s = run_sweep(config_from_args(SweepConfig, args), progress=not args.no_progress)
    passed = sum(v["verdict"]["passed"] for v in s["variants"])
    print(f"{len(s['variants'])} variants ({passed} PASS) in {s['seconds']:.0f} s; the evidence predicted the cliff at "
          f"{s['prediction']['predicted_cliff']} blocks removed. Report: {s['report']}")
    return 0


def add_commands(command) -> None:
    from tourray.prune.apply import ApplyConfig
    from tourray.prune.plan import PlanConfig
    from tourray.prune.sweep import SweepConfig
    from tourray.prune.verdict import add_verdict_parser
    from tourray.prune.width import WidthConfig

    p = command("prune", None, "Depth and width pruning: plan which blocks to delete from lake evidence, write the pruned "
                               "checkpoint (optionally patched), judge it against the original.")
    psub = p.add_subparsers(dest="prune_command", required=True, metavar="SUBCOMMAND")

    def prune_command(name, fn, help):
        sp = psub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    add_config_flags(prune_command("plan", cmd_prune_plan, "Choose the blocks to delete: " + PLAN_HELP), PlanConfig)
    add_config_flags(prune_command("apply", cmd_prune_apply, "Write the pruned checkpoint of a plan (kept blocks "
                                   "renumbered, config, tokenizer, provenance), optionally with the linear patch."),
                     ApplyConfig)
    add_verdict_parser(psub)
    sp = prune_command("width", cmd_prune_width, "Width pruning from the lake: the same fraction of FFN neurons and "
                       "query heads kept in every block (inline --stats units scores), optionally the residual width "
                       "sliced (SliceGPT, --hidden); a standard checkpoint.")
    add_config_flags(sp, WidthConfig)
    sp.add_argument("--no-progress", action="store_true", help="No progress bar.")
    sp = prune_command("sweep", cmd_prune_sweep, "Plan, write, capture and judge many variants (methods x blocks "
                       "removed x patch, random over seeds), one Ray task per variant; write reports/prune_<run>.md.")
    add_config_flags(sp, SweepConfig)
    sp.add_argument("--no-progress", action="store_true", help="No progress bar.")
