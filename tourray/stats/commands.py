"""The statistics' commands: `stats`, `solve`, `transport`."""

from __future__ import annotations

from tourray.config import add_config_flags, config_from_args

STATS_EXAMPLES = """examples:
  tourray stats --lake lake --run demo                          # every stored layer + consecutive pairs
  tourray stats --lake lake --run demo --pairs all --workers 2  # all-pairs CKA, two Ray tasks at once
  tourray stats --lake lake --run demo --where "category = 'seen_cities'" --weight entropy"""
SOLVE_EXAMPLES = """examples:
  tourray solve pca --lake lake --from demo:3 --k 16 --out pca3.npy
  tourray solve procrustes --lake lake --from demo:2 --to demo:3 --whiten --ridge 1e-3
  tourray solve lstsq --lake lake --from demo:2 --to demo:4 --ridge 1e-2 --heldout 0.2   # linear patch for blocks 3-4"""


def cmd_stats(args) -> int:
    from tourray.lake.sql import connect, print_result
    from tourray.lake.tables import Lake
    from tourray.stats.tasks import StatsConfig, run_stats

    cfg = config_from_args(StatsConfig, args)
    s = run_stats(cfg, progress=not args.no_progress)
    for site, info in s["sites"].items():
        print(f"run {cfg.run} {site}: {len(info['layers'])} layers, {info['pairs']} pairs "
              f"({info['reused_layers']} layers and {info['reused_pairs']} pairs reused from the lake, "
              f"{info['tiles']} task(s))")
    con, params = connect(Lake(s["lake"], cfg.storage_options)), {"run": cfg.run, "sel": cfg.selection.key()}
    latest = "WHERE run = $run AND selection = $sel QUALIFY row_number() OVER (PARTITION BY {k}, site ORDER BY created_at DESC) = 1"
    print("layer_stats:")
    print_result(con, "SELECT layer, site, n_tokens, round(mean_norm, 3) AS mean_norm, round(rms, 4) AS rms, "
                      "round(effective_rank, 2) AS effective_rank FROM layer_stats " + latest.format(k="layer")
                 + " ORDER BY site, layer", params, "table")
    if any(info["pairs"] for info in s["sites"].values()):
        print("pair_stats:")
        print_result(con, "SELECT layer_a, layer_b, site, n_tokens, round(mean_cos, 4) AS mean_cos, round(mean_angular, 4) "
                          "AS angular, round(cka, 4) AS cka, round(rel_rms_diff, 4) AS rel_rms_diff FROM pair_stats "
                     + latest.format(k="layer_a, layer_b") + " ORDER BY site, layer_a, layer_b", params, "table")
    print(f"in {s['seconds']:.1f} s; tables layer_stats, pair_stats, moments in {s['lake']}")
    return 0


def cmd_solve(args) -> int:
    from tourray.stats.solves import SolveConfig, report, run_solve

    cfg = config_from_args(SolveConfig, args)
    print(report(run_solve(args.kind, cfg, progress=not args.no_progress)))
    return 0


def add_commands(command) -> None:
    from tourray.stats import transport
    from tourray.stats.solves import DESCRIPTION, KINDS, SolveConfig
    from tourray.stats.tasks import StatsConfig

    p = command("stats", cmd_stats, "Layer and layer-pair statistics of a run (moments, PCA spectrum, cosine, angular "
                "distance, CKA), one Ray task per tile of layers.", STATS_EXAMPLES)
    add_config_flags(p, StatsConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    p = command("solve", cmd_solve, "PCA of a layer, or an orthogonal Procrustes / least-squares map between two layers "
                "(row vectors: y ~ x @ W + b), from merged moments, judged on held-out tokens.", SOLVE_EXAMPLES)
    p.description = DESCRIPTION
    p.add_argument("kind", choices=KINDS, help="pca | procrustes | lstsq.")
    add_config_flags(p, SolveConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    transport.add_parser(command)
