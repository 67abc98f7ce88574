"""make demo: the main job, end to end, offline, on the embedded default.

    python jobs/demo.py --config jobs/configs/demo.yaml [--run NAME]

1. train (or reuse) the demo model; 2. capture samples/ into the lake through Ray, with inline
statistics; 3. verify the lake; 4. per-layer similarity and per-category perplexity through SQL,
printed and plotted; 5. layer statistics: effective rank per layer, all-pairs CKA heatmap and the
angular-distance curve.
"""

import argparse
import sys

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
from pathlib import Path

from tourray.capture import run_capture
from tourray.cli import guarded, print_result
from tourray.demo_model import DemoConfig, build_demo_model
from tourray.report import angular_distance_plot, cka_heatmap, layer_similarity_plot, perplexity_plot
from tourray.sql import connect, query_file, run_query
from tourray.stats.tasks import run_stats
from tourray.verify import verify


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/demo.yaml", help="Demo config (default: %(default)s).")
    p.add_argument("--run", help="Override the capture's run name.")
    args = p.parse_args(argv)
    cfg = DemoConfig.from_yaml(args.config)
    if args.run:
        cfg.capture.run = cfg.stats.run = args.run
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

    print(f"== 5. layer statistics (tourray stats --run {run} --pairs all)")
    st = run_stats(cfg.stats, progress=False)["sites"]["resid_post"]
    con = connect(lake)  # a connection sees the table versions of when it was opened: reopen
    print(f"{len(st['layers'])} layers, {st['pairs']} pairs: {st['reused_layers']} layers and {st['reused_pairs']} pairs "
          f"reused from the capture's inline statistics, {st['tiles']} Ray task(s)")
    latest = "QUALIFY row_number() OVER (PARTITION BY {k} ORDER BY created_at DESC) = 1"
    sel = "run = $run AND site = 'resid_post' AND selection = $sel"
    params = {"run": run, "sel": cfg.stats.selection.key()}
    print_result(con, f"SELECT layer, n_tokens, round(effective_rank, 2) AS effective_rank, round(rms, 4) AS rms, "
                      f"round(explained[16], 3) AS explained_by_16 FROM layer_stats WHERE {sel} "
                      f"{latest.format(k='layer')} ORDER BY layer", params, "table")
    pairs = run_query(con, f"SELECT layer_a, layer_b, cka, mean_angular FROM pair_stats WHERE {sel} "
                           f"{latest.format(k='layer_a, layer_b')} ORDER BY layer_a, layer_b", params).to_arrow_table()
    print(f"plot: {cka_heatmap(pairs, reports / f'{run}_cka.png', f'linear CKA, all layer pairs: run {run}')}")
    consecutive = pairs.filter(pa.compute.equal(pairs["layer_b"], pa.compute.add(pairs["layer_a"], 1)))
    print(f"plot: {angular_distance_plot(consecutive, reports / f'{run}_angular.png', f'consecutive layers: run {run}')}")

    print(f"\nOutputs: lake {Path(lake).resolve()} (tables: {', '.join(t.stem for t in sorted(Path(lake).glob('*.lance')))}); "
          f"plots in {reports.resolve()}.\nExplore: tourray runs --lake {lake} --run {run}; tourray sql --lake {lake} \"SELECT ...\"")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(guarded(main))
