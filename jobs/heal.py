"""Heal the compressed variants that fail today by distillation from the lake, on SmolLM2-135M-Instruct.

    python jobs/heal.py --config jobs/configs/heal.yaml

1. import the model (reused); 2. capture the evidence run (resumed: `make demo`'s when the capture
section matches; width and depth plans read it); 3. capture the teacher's next-token distribution on
the training texts (`tourray capture --logits 64`); 4. the study: each variant built as `tourray qa`
builds it, judged on the eval texts, healed with `tourray heal` (Ray Train), judged again; report in
reports/heal_<name>.md. Re-running resumes every step.
"""

import argparse
import sys

from tourray.capture import run_capture
from tourray.config import guarded
from tourray.heal.job import run_study, summary_line
from tourray.recipes import HealJobConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/heal.yaml", help="Job config (default: %(default)s).")
    args = p.parse_args(argv)
    cfg = HealJobConfig.from_yaml(args.config)
    print(f"== 1. model: {cfg.resolve_model()}", flush=True)
    s = run_capture(cfg.capture)
    print(f"== 2. evidence run {cfg.capture.run}: {s['samples']} samples ({s['already_done']} already committed)", flush=True)
    s = run_capture(cfg.teacher)
    print(f"== 3. teacher run {cfg.teacher.run} (--logits {cfg.teacher.logits}): {s['samples']} samples, "
          f"{s['already_done']} already committed", flush=True)
    out = run_study(cfg.study)
    print("== 4. heal study")
    for r in out["variants"]:
        print(f"{r['variant']:34} {summary_line(r, cfg.study.criteria.seen_category)}")
    print(f"report: {out['report']} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
