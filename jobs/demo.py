"""make demo: the main job, end to end, offline, on the embedded default.

    python jobs/demo.py --config jobs/configs/demo.yaml [--run NAME]

1. train (or reuse) the demo model; 2. capture samples/ into the lake through Ray; 3. verify the
lake; 4. per-layer similarity and per-category perplexity through SQL, printed and plotted.
"""

import argparse
import sys
from pathlib import Path

from tourray.capture import run_capture
from tourray.cli import guarded, print_result
from tourray.demo_model import DemoConfig, build_demo_model
from tourray.report import layer_similarity_plot, perplexity_plot
from tourray.sql import connect, query_file, run_query
from tourray.verify import verify


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/demo.yaml", help="Demo config (default: %(default)s).")
    p.add_argument("--run", help="Override the capture's run name.")
    args = p.parse_args(argv)
    cfg = DemoConfig.from_yaml(args.config)
    if args.run:
        cfg.capture.run = args.run
    run, lake = cfg.capture.run, cfg.capture.lake

    print("== 1. demo model")
    cfg.capture.model = str(build_demo_model(cfg.demo_model))

    print(f"== 2. capture {cfg.capture.samples} -> {lake} (run {run})")
    s = run_capture(cfg.capture)
    print(f"captured {s['captured']} samples, {s['tokens']:,} tokens ({s['already_done']} already committed)")

    print("== 3. verify")
    checked, problems = verify(lake, run)
    print(f"{checked} blocks checked: {'all match' if not problems else problems}")

    con = connect(lake)
    reports = Path(cfg.reports)
    for name, plot in (("layer_similarity", layer_similarity_plot), ("perplexity_by_category", perplexity_plot)):
        sql = query_file(name).read_text()
        print(f"== 4. {name} (queries/{name}.sql)")
        print_result(con, sql, {"run": run}, "table")
        png = plot(run_query(con, sql, {"run": run}).to_arrow_table(), reports / f"{run}_{name}.png", f"{name.replace('_', ' ')}: run {run}")
        print(f"plot: {png}")

    print(f"\nOutputs: lake {Path(lake).resolve()} (tables: {', '.join(t.stem for t in sorted(Path(lake).glob('*.lance')))}); "
          f"plots in {reports.resolve()}.\nExplore: tourray runs --lake {lake} --run {run}; tourray sql --lake {lake} \"SELECT ...\"")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(guarded(main))
