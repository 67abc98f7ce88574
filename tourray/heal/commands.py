"""Healing's commands: `heal`, `soup` and `compress`."""

from __future__ import annotations

import json
import logging

from tourray.config import add_config_flags, config_from_args

log = logging.getLogger("tourray")

EXAMPLES = {
    "heal": """examples:
  tourray capture --model .cache/smollm2-135m-instruct --samples samples --include 'train/*' --run teach \\
      --layers none --logits 64 --system-prompt samples/system_prompt.md
  tourray heal --student ckpt/smol-ffn75 --teacher-run teach --out ckpt/smol-ffn75-healed --max-steps 100
  tourray heal --student ckpt/smol-ffn75 --teacher-run s3://b/lake:teach --out ckpt/h --lora-rank 16 --workers 2
  tourray heal --config jobs/configs/heal.yaml ...   (re-running with the same --out resumes)""",
    "soup": """examples:
  tourray soup --models ckpt/h-seed0,ckpt/h-seed1,ckpt/h-seed2 --out ckpt/h-soup
  tourray soup --models ckpt/h-seed0,ckpt/h-seed1,ckpt/h-seed2 --out ckpt/h-greedy --greedy --teacher-run teach""",
    "compress": """examples:
  tourray compress --config jobs/configs/compress.yaml
  tourray compress --config jobs/configs/compress.yaml --target 0.6 --heal-max-steps 60
  tourray compress --model .cache/smollm2-135m-instruct --teacher-run smol.teach --name ffn --target 0.7 \\
      --steps '[{keep_neurons: 0.85}]' --samples samples --include 'train/rome__*' --system-prompt samples/system_prompt.md
  (re-running with the same --name skips the finished rounds; steps: [{keep_neurons: 0.85}],
   [{method: block-influence, remove: 1, patch: lstsq}], [{remove: 1, patch: lstsq, target: 0.85}], ...)""",
}


def cmd_heal(args) -> int:
    from tourray.heal.config import HealConfig
    from tourray.heal.train import run_heal

    cfg = config_from_args(HealConfig, args)
    log.info("heal config: %s", json.dumps(cfg.model_dump(mode="json")))
    s = run_heal(cfg, progress=not args.no_progress)
    if s["already_done"]:
        print(f"{s['out']}: already healed ({s['steps']} steps); nothing to do")
        return 0
    print(f"{s['out']}: {s['steps']} steps, {s['tokens']:,} text tokens, {s['seconds']:.0f} s; held-out KL "
          f"{s['val_kl_before']:.4f} -> {s['val_kl_best']:.4f} (best at step {s['best_step']}"
          f"{', stopped early' if s['stopped_early'] else ''}); metrics: heal_log run {s['heal_run']}")
    return 0


def cmd_soup(args) -> int:
    from tourray.heal.config import SoupConfig
    from tourray.heal.soup import run_soup

    s = run_soup(config_from_args(SoupConfig, args))
    kl = f"; held-out KL {s['soup_held_out_kl']:.5f}" if s["soup_held_out_kl"] is not None else ""
    print(f"{s['out']}: {s['method']} soup of {len(s['members'])} of {len(s['candidates'])} checkpoints{kl}")
    return 0


def cmd_compress(args) -> int:
    from tourray.heal.compress import run_compress, summary_line
    from tourray.heal.config import CompressConfig

    cfg = config_from_args(CompressConfig, args)
    log.info("compress config: %s", json.dumps(cfg.model_dump(mode="json")))
    s = run_compress(cfg, progress=not args.no_progress)
    for r in s["rounds"]:
        print(summary_line(r, cfg.criteria.seen_category))
    res = s["result"]
    print(f"stopped: {s['stopped']}")
    if res["round"]:
        print(f"result: {res['checkpoint']} (round {res['round']}, {100 * res['parameter_fraction']:.1f}% of the "
              f"parameters; the last round that passed the verdict)")
    else:
        print(f"result: the original {res['checkpoint']} (no round passed the verdict)")
    print(f"report: {s['report']} ({s['seconds']:.0f} s)")
    return 0


def add_commands(command) -> None:
    from tourray.heal.config import CompressConfig, HealConfig, SoupConfig

    p = command("heal", cmd_heal, "Distil a (pruned) student toward a teacher run's stored distribution, on Ray Train.",
                EXAMPLES["heal"])
    add_config_flags(p, HealConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p = command("soup", cmd_soup, "Average checkpoints of identical shapes (uniform, or greedy by held-out KL).",
                EXAMPLES["soup"])
    add_config_flags(p, SoupConfig)
    p = command("compress", cmd_compress, "Iterative compression to a parameter target: capture, prune, heal, judge, "
                "repeat until the target or a failed verdict; reports/compress_<name>.md.", EXAMPLES["compress"])
    add_config_flags(p, CompressConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
