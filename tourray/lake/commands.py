"""The lake's commands: `sql`, `verify`, `runs`, `optimize`, `repair`."""

from __future__ import annotations

import argparse

from tourray.config import add_storage_options_flag
from tourray.errors import UserError

SQL_EXAMPLES = """examples:
  tourray sql --lake lake "SELECT run, count(*) FROM samples GROUP BY run"
  tourray sql --lake lake --query layer_similarity --param run=demo --format csv"""


def add_lake_flags(p: argparse.ArgumentParser) -> None:
    """--lake and --storage-options of a command that is not config-backed (open with `open_lake`)."""
    p.add_argument("--lake", default="lake", help="Lake root, a folder or a URI (default: lake).")
    add_storage_options_flag(p)


def open_lake(args: argparse.Namespace):
    """--lake opened with --storage-options (`add_lake_flags`)."""
    from tourray.lake.tables import Lake

    return Lake(args.lake, args.storage_options)


def cmd_sql(args) -> int:
    from tourray.lake.sql import connect, header, print_result, query_file

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


def cmd_verify(args) -> int:
    from tourray.lake.verify import verify_lake

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
    from tourray.lake.runs import describe_run, list_runs

    lake = open_lake(args)
    print(describe_run(lake, args.run) if args.run else list_runs(lake))
    return 0


def add_commands(command) -> None:
    """`command(name, fn, help, epilog=None)` adds one subcommand (see `tourray.cli.parser`)."""
    from tourray.lake import optimize, repair

    p = command("sql", cmd_sql, "Run DuckDB SQL over the lake (every table is a view).", SQL_EXAMPLES)
    p.add_argument("sql", nargs="?", help="The SQL to run.")
    add_lake_flags(p)
    p.add_argument("--query", help="Run a packaged query (tourray/lake/queries/NAME.sql) or a .sql path instead of a SQL string.")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="Named parameter ($KEY), repeatable.")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="Output format (default: table).")

    p = command("verify", cmd_verify, "Check every committed sample is complete, unduplicated and intact (every stored "
                "layer x site and token row once, activation and token checksums, readable data files); name each "
                "problem (exit 1).", "example:\n  tourray verify --lake lake --run demo")
    add_lake_flags(p)
    p.add_argument("--run", help="Only this run.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")

    p = command("runs", cmd_runs, "List runs, or show one run's manifest.",
                "examples:\n  tourray runs --lake lake\n  tourray runs --lake lake --run demo")
    add_lake_flags(p)
    p.add_argument("--run", help="Show this run's manifest: model, tokenizer, texts, prompt, code, captures.")

    optimize.add_parser(command)
    p = repair.add_parser(command)
    add_storage_options_flag(p)  # run_repair takes a Lake as well as a root: hand it the opened one
    p.set_defaults(fn=lambda args: repair.cmd_repair(argparse.Namespace(**{**vars(args), "lake": open_lake(args)})))
