"""The capture's command: `capture`."""

from __future__ import annotations

import json
import logging

from tourray.config import add_config_flags, config_from_args

log = logging.getLogger("tourray")

EXAMPLES = """examples:
  tourray capture --model Qwen/Qwen3-0.6B --samples samples/ --run q06 --system-prompt samples/system_prompt.md
  tourray capture --config jobs/configs/capture.yaml --layers embed,0-3 --store-dtype float32
  tourray capture --model /ckpt/Qwen3-32B --samples s3://b/texts --lake s3://b/lake --run t32 \\
      --gpus-per-actor 1 --actors 8 --address auto"""


def cmd_capture(args) -> int:
    from tourray.capture import CaptureConfig, run_capture

    cfg = config_from_args(CaptureConfig, args)
    log.info("capture config: %s", json.dumps(cfg.model_dump(mode="json")))
    s = run_capture(cfg, progress=not args.no_progress)
    print(f"run {s['run']}: captured {s['captured']} samples ({s['tokens']:,} tokens, {s['bytes'] / 1e6:,.1f} MB of "
          f"vectors) in {s['seconds']:.1f} s; {s['already_done']} were already committed. Lake: {s['lake']}")
    if s["truncated"]:
        print(f"  {len(s['truncated'])} sample(s) truncated at --max-length {cfg.max_length}")
    if s["skipped_invalid"]:
        print(f"  {len(s['skipped_invalid'])} invalid file(s) skipped:\n    " + "\n    ".join(s["skipped_invalid"]))
    return 0


def add_commands(command) -> None:
    from tourray.capture.config import CaptureConfig

    p = command("capture", cmd_capture, "Capture activations, tokens and surprisal of a corpus into the lake.", EXAMPLES)
    add_config_flags(p, CaptureConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
