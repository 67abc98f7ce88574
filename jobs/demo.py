"""make demo: the main job, end to end, offline, on the embedded default.

    python jobs/demo.py --config jobs/configs/demo.yaml [--run NAME]

1. import SmolLM2-135M-Instruct (or build the demo Qwen3: `model: demo`); 2. capture a named subset
of the corpus into the lake through Ray, with inline statistics: the evidence; 3. verify the lake;
4. per-layer similarity through SQL, printed and plotted; 5. layer statistics: effective rank per
layer, the angular-distance curve (and, with `pairs: all`, the all-pairs CKA heatmap); 6. the pruning sweep: plans from the
evidence, pruned (and patched) checkpoints, each judged on held-out texts against the original,
the verdict table, plots and generations in reports/prune_<run>.md; 7. the QA toggle report: a fold
check (a rotation and permutations folded in, the logit difference printed), a width-pruned and a
combined (depth + patch + width) variant, in reports/qa_demo.md; 8. a short heal: the teacher's
next-token distribution captured on the training texts (--logits), one failing variant healed for a
few steps on Ray Train, KL and perplexity before and after, in reports/heal_demo.md.
"""

import argparse
import os
import shlex
import sys
import time

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
from pathlib import Path

from tourray.capture import run_capture
from tourray.config import guarded
from tourray.lake.sql import print_result
from tourray.recipes import DemoConfig
from tourray.lake.tables import Lake
from tourray.plots import angular_distance_plot, cka_heatmap, layer_similarity_plot, perplexity_plot
from tourray.lake.sql import connect, query_file, run_query
from tourray.stats.tasks import run_stats
from tourray.lake.verify import verify_lake


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/demo.yaml", help="Demo config (default: %(default)s).")
    p.add_argument("--run", help="Override the capture's run name.")
    args = p.parse_args(argv)
    cfg = DemoConfig.from_yaml(args.config)
    if args.run:
        cfg.capture.run = args.run
        for section in (cfg.stats, cfg.sweep, cfg.qa):
            if section is not None:
                section.run = args.run
        if cfg.qa is not None and cfg.qa.base_run and cfg.sweep is not None:
            cfg.qa.base_run = f"{args.run}.original"  # the sweep's capture of the original
    run, reports = cfg.capture.run, Path(cfg.reports)
    lake = Lake(cfg.capture.lake, cfg.capture.storage_options)  # a local folder or a URI (s3://...)
    t0 = time.perf_counter()

    def step(title: str) -> None:
        print(f"== {title}   [{time.perf_counter() - t0:.0f} s]", flush=True)

    step(f"1. model ({cfg.model})")
    print(cfg.resolve_model())

    step(f"2. capture {cfg.capture.samples} {cfg.capture.include or ''} -> {lake.root} (run {run}, inline {cfg.capture.stats or 'no'} statistics)")
    s = run_capture(cfg.capture)
    print(f"captured {s['captured']} samples, {s['tokens']:,} tokens ({s['already_done']} already committed)")

    step("3. verify")
    verified = verify_lake(lake, run)
    print(f"{verified.blocks} blocks, {verified.samples} samples, {verified.token_rows:,} token rows checked (activation "
          f"and token checksums, completeness): {'all match' if not verified.problems else verified.problems}")

    con = connect(lake)
    queries = [("layer_similarity", layer_similarity_plot)] + [("perplexity_by_category", perplexity_plot)] * (cfg.sweep is None)
    for name, plot in queries:
        sql = query_file(name).read_text()
        step(f"4. {name} (tourray/lake/queries/{name}.sql)")
        print_result(con, sql, {"run": run}, "table")
        png = plot(run_query(con, sql, {"run": run}).to_arrow_table(), reports / f"{run}_{name}.png", f"{name.replace('_', ' ')}: run {run}")
        print(f"plot: {png}")

    if cfg.stats is not None:
        step(f"5. layer statistics (tourray stats --run {run} --pairs {cfg.stats.pairs})")
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
        if cfg.stats.pairs == "all":
            print(f"plot: {cka_heatmap(pairs, reports / f'{run}_cka.png', f'linear CKA, all layer pairs: run {run}')}")
        consecutive = pairs.filter(pa.compute.equal(pairs["layer_b"], pa.compute.add(pairs["layer_a"], 1)))
        print(f"plot: {angular_distance_plot(consecutive, reports / f'{run}_angular.png', f'consecutive layers: run {run}')}")

    if cfg.sweep is not None:
        from tourray.prune.report import summary_lines
        from tourray.prune.sweep import run_sweep

        sw = cfg.sweep
        step(f"6. pruning sweep (tourray prune sweep --run {run}): {', '.join(sw.methods)} x removed {sw.removed} "
             f"x patch {sw.patch}, judged on {len(sw.eval_include or []) or 'all'} texts of {sw.eval_samples}")
        out = run_sweep(sw)
        print("\n".join(summary_lines(out)))
        print(f"report: {out['report']}")

    if cfg.qa is not None:
        from tourray.qa.job import run_qa, summary_line

        step(f"7. QA toggle report (tourray qa --run {run}): folds, width pruning, a combined compression")
        qa = run_qa(cfg.qa)
        for r in qa["variants"]:
            print(f"{r['variant']:28} {summary_line(r, cfg.qa.criteria.seen_category)}")
        for r in (r for r in qa["variants"] if r["family"] == "fold"):
            print(f"fold check ({r['variant']}: a random rotation and permutations folded in): max |log-prob difference| "
                  f"{r['max_logprob_diff']:.2e}, mean KL {r['comparison'][-1]['mean_kl']:.2e} nats/token")
        print(f"report: {qa['report']}")

    if cfg.heal is not None and cfg.teacher is not None:
        from tourray.heal.job import run_study, summary_line as heal_line

        h = cfg.heal
        step(f"8. heal (tourray capture --logits {cfg.teacher.logits} --run {cfg.teacher.run}; tourray heal, "
             f"{h.heal.max_steps} steps of {h.heal.batch_size} texts)")
        t = run_capture(cfg.teacher)
        print(f"teacher run {cfg.teacher.run}: {t['samples']} texts ({t['already_done']} already committed)")
        out = run_study(h)
        for r in out["variants"]:
            print(f"{r['variant']:28} {heal_line(r, h.criteria.seen_category)}")
        print(f"report: {out['report']}")

    step("done")
    tourray, root = shlex.quote(tourray_command()), shlex.quote(lake.root)
    print(f"Outputs: lake {lake.root} (tables: {', '.join(lake.tables())}); "
          f"plots and reports in {reports.resolve()}.\nExplore: {tourray} runs --lake {root} --run {shlex.quote(run)}; "
          f"{tourray} sql --lake {root} \"SELECT ...\"")
    return 0 if not verified.problems else 1


def tourray_command() -> str:
    """How to run the `tourray` command from the current directory: the console script beside this
    interpreter (.venv/bin/tourray after `make setup`, which is not on PATH), else `tourray`."""
    script = Path(sys.executable).parent / "tourray"
    if not script.is_file():
        return "tourray"
    try:
        rel = os.path.relpath(script, Path.cwd())
    except ValueError:  # another drive
        return str(script)
    return rel if not rel.startswith("..") else str(script)


if __name__ == "__main__":
    sys.exit(guarded(main))
