"""The full depth-pruning sweep on SmolLM2-135M-Instruct (what `make demo` runs a named subset of).

    python jobs/prune_sweep.py --config jobs/configs/prune_sweep.yaml
    ray job submit --working-dir . -- python jobs/prune_sweep.py --config my_sweep.yaml   # lake: an absolute path or s3://

1. import the model (reused); 2. capture the evidence run (resumed: the same run as `make demo`'s
when the capture section matches) and its layer statistics; 3. the sweep: every method x blocks removed x patch, random over
seeds, each variant judged on all eval texts; report in reports/prune_<run>.md.
"""

import argparse
import sys

from tourray.capture import run_capture
from tourray.config import guarded
from tourray.recipes import DemoConfig
from tourray.prune.report import summary_lines
from tourray.prune.sweep import run_sweep
from tourray.stats.tasks import run_stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/prune_sweep.yaml", help="Job config (default: %(default)s).")
    p.add_argument("--workers", type=int, choices=range(1, 65), metavar="N", help="Variants evaluated at once (Ray tasks in flight).")
    args = p.parse_args(argv)
    cfg = DemoConfig.from_yaml(args.config)
    if cfg.sweep is None:
        p.error(f"{args.config} has no sweep section")
    if args.workers:
        cfg.sweep.workers = args.workers
    print(f"== 1. model: {cfg.resolve_model()}")
    s = run_capture(cfg.capture)
    print(f"== 2. evidence run {cfg.capture.run}: {s['samples']} samples ({s['already_done']} already committed)")
    if cfg.stats is not None:  # --method variance reads layer_stats (reused when already computed)
        run_stats(cfg.stats, progress=False)
    out = run_sweep(cfg.sweep)
    print("== 3. sweep\n" + "\n".join(summary_lines(out)) + f"\nreport: {out['report']} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
