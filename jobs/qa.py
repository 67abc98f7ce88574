"""The full QA toggle report on SmolLM2-135M-Instruct (what `make demo` runs three variants of).

    python jobs/qa.py --config jobs/configs/qa.yaml
    tourray qa --config my_qa.yaml            # the qa section alone, over an existing evidence run

1. import the model (reused); 2. capture the evidence run (resumed: the same run as `make demo`'s when
the capture section matches); 3. the QA matrix: base, folds, slicing, width and depth pruning, combined
compressions, each judged on the eval texts; report in reports/qa_<name>.md.
"""

import argparse
import sys

from tourray.capture import run_capture
from tourray.config import guarded
from tourray.recipes import DemoConfig
from tourray.qa.job import run_qa, summary_line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/qa.yaml", help="Job config (default: %(default)s).")
    args = p.parse_args(argv)
    cfg = DemoConfig.from_yaml(args.config)
    if cfg.qa is None:
        p.error(f"{args.config} has no qa section")
    print(f"== 1. model: {cfg.resolve_model()}")
    s = run_capture(cfg.capture)
    print(f"== 2. evidence run {cfg.capture.run}: {s['samples']} samples ({s['already_done']} already committed)")
    out = run_qa(cfg.qa)
    print("== 3. qa")
    for r in out["variants"]:
        print(f"{r['variant']:34} {summary_line(r, cfg.qa.criteria.seen_category)}")
    print(f"report: {out['report']} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
