"""Does a pruned model pass? Compare its capture (the variant run) with the original's (the
baseline run) over the same texts, and apply the seeds' criteria.

The comparison is `tourray/lake/queries/compare_runs.sql`: per category and pooled (`ALL`), over text tokens
matched by (sample_id, pos), the two perplexities and their ratio, surprisal on factual tokens
(`token_class IN ('number', 'proper')`), mean KL(original || variant) and the files whose
perplexity exceeds 1000. Before it runs, `compare` refuses what cannot be compared token by
token: a missing run, another tokenizer, other texts, other tokens at the same positions.

The verdict is PASS only if all of:

- perplexity on the seen category rises less than `max_ppl_rise` (ratio < 1 + max_ppl_rise);
- the maximum surprisal on factual tokens, pooled over all categories, stays below
  `max_factual_ratio` times the baseline's;
- no file (sample) has a variant perplexity above `max_file_ppl`.

    tourray prune verdict --lake lake --base orig --variant cut-3-5
"""

from __future__ import annotations

import argparse
import json
import math

import pyarrow as pa
from pydantic import Field

from tourray.config import BaseConfig, add_storage_options_flag
from tourray.errors import UserError
from tourray.lake.tables import Lake

QUERY = "compare_runs"
#: files over this perplexity are counted by compare_runs.sql (its `*_files_ppl_over_1000` columns)
SQL_FILE_PPL = 1000.0
_FEW = 3  # how many sources an error names


class Criteria(BaseConfig):
    """The seeds' pass criteria for a pruned variant. Every field is also a flag."""

    seen_category: str = Field("seen_cities", description="Category whose perplexity rise is judged (the texts the guide was trained on).")
    max_ppl_rise: float = Field(0.20, ge=0, description="Largest allowed relative rise of the seen category's perplexity: PASS needs variant/base < 1 + this.")
    max_factual_ratio: float = Field(2.0, gt=0, description="PASS needs the variant's maximum surprisal on factual tokens (number, proper; all categories pooled) < this times the baseline's.")
    max_file_ppl: float = Field(1000.0, gt=0, description="PASS needs every file's (sample's) variant perplexity <= this.")


# -- comparison --------------------------------------------------------------------------------
def compare(lake: str | Lake, base: str, variant: str) -> pa.Table:
    """`tourray/lake/queries/compare_runs.sql` for two runs of one lake, after checking they can be compared.

    One row per category (the four eval sets in their usual order, then any others by name) and a
    pooled `ALL` row last. The table's schema metadata holds `base` and `variant`. Raises UserError
    for a missing run, a variant with another tokenizer, other texts, other tokens, or nothing
    to compare."""
    from tourray.lake.sql import connect, query_file, run_query

    con = connect(lake)
    params = {"base": base, "variant": variant}
    root = lake.root if isinstance(lake, Lake) else lake
    _check_tables(con, root)
    _check_runs(con, root, base, variant)
    _check_texts(con, base, variant)
    _check_tokens(con, base, variant)
    table = run_query(con, query_file(QUERY).read_text(), params).to_arrow_table()
    if table.num_rows == 0:
        raise UserError(f"runs {base!r} and {variant!r} share no text tokens with a surprisal: nothing to compare")
    return table.replace_schema_metadata({"base": base, "variant": variant})


def _rows(con, sql: str, params: dict) -> list[tuple]:
    from tourray.lake.sql import run_query

    return run_query(con, sql, params).fetchall()


def _check_tables(con, root) -> None:
    have = {r[0] for r in con.sql("SELECT view_name FROM duckdb_views() UNION SELECT table_name FROM duckdb_tables()").fetchall()}
    missing = [t for t in ("runs", "samples", "tokens") if t not in have]
    if missing:
        raise UserError(f"--lake {root}: no {', '.join(missing)} table(s); capture the baseline and the variant first")


def _check_runs(con, root, base: str, variant: str) -> None:
    rows = dict(_rows(con, "SELECT run, tokenizer_sha256 FROM runs", {}))
    for flag, run in (("--base", base), ("--variant", variant)):
        if run not in rows:
            known = ", ".join(sorted(rows)) or "none"
            raise UserError(f"{flag}: no run {run!r} in {root} (runs: {known})")
    if rows[base] != rows[variant]:
        raise UserError(
            f"variant run {variant!r} has another tokenizer than baseline run {base!r} (tokenizer_sha256 "
            f"{rows[variant][:12]} vs {rows[base][:12]}): a variant whose tokenizer differs from the baseline's "
            f"cannot be compared token by token; capture it with the baseline's tokenizer")


def _check_texts(con, base: str, variant: str) -> None:
    """Both runs hold the same complete samples (sample ids: source path + text hash)."""
    got = {run: dict(_rows(con, "SELECT sample_id, source FROM samples WHERE run = $run", {"run": run}))
           for run in (base, variant)}
    if not got[base]:
        raise UserError(f"baseline run {base!r} has no complete samples: nothing to compare")
    only_base = sorted(got[base][s] for s in got[base].keys() - got[variant].keys())
    only_variant = sorted(got[variant][s] for s in got[variant].keys() - got[base].keys())
    if only_base or only_variant:
        parts = []
        if only_base:
            parts.append(f"{len(only_base)} sample(s) of {base!r} missing from {variant!r} ({_few(only_base)})")
        if only_variant:
            parts.append(f"{len(only_variant)} sample(s) of {variant!r} not in {base!r} ({_few(only_variant)})")
        raise UserError(f"variant {variant!r} does not cover the same texts as baseline {base!r}: " + "; ".join(parts)
                        + ". Capture both over the same samples folder (complete the capture, or re-run it).")


def _check_tokens(con, base: str, variant: str) -> None:
    """Text tokens agree position by position (else a system prompt, template or --max-length differs)."""
    sql = """
        WITH b AS (SELECT sample_id, pos, token_id FROM tokens WHERE run = $base AND segment = 'text'),
             v AS (SELECT sample_id, pos, token_id FROM tokens WHERE run = $variant AND segment = 'text'),
             differ AS (
                 SELECT DISTINCT coalesce(b.sample_id, v.sample_id) AS sample_id
                 FROM b FULL JOIN v ON v.sample_id = b.sample_id AND v.pos = b.pos
                 WHERE b.token_id IS DISTINCT FROM v.token_id)
        SELECT s.source FROM differ JOIN samples AS s ON s.run = $base AND s.sample_id = differ.sample_id
        ORDER BY s.source"""
    bad = [r[0] for r in _rows(con, sql, {"base": base, "variant": variant})]
    if bad:
        raise UserError(f"{len(bad)} sample(s) have other text tokens (or other positions) in variant {variant!r} than in "
                        f"baseline {base!r} ({_few(bad)}): capture both with the same system prompt, chat template "
                        f"and --max-length")


def _few(sources: list[str]) -> str:
    return ", ".join(sources[:_FEW]) + (f", ... (+{len(sources) - _FEW})" if len(sources) > _FEW else "")


# -- verdict -----------------------------------------------------------------------------------
def verdict(result: pa.Table | str | Lake, base: str | None = None, variant: str | None = None,
            criteria: Criteria | None = None) -> dict:
    """Apply `criteria` to a `compare` table, or compare `base` and `variant` of lake `result` first.

    Returns {"base", "variant", "passed", "reason", "failed": [names], "criteria": {name: {"value",
    "threshold", "pass", "detail"}}} with the criteria, in this order:

    - `seen_ppl_ratio`: variant/base perplexity on the seen category; pass if < 1 + max_ppl_rise;
    - `factual_max_ratio`: variant/base maximum factual-token surprisal (ALL row); pass if < max_factual_ratio;
    - `max_file_ppl`: the variant's highest file perplexity (ALL row); pass if <= max_file_ppl.

    `reason` is one line: the first failure's name and detail, or "all 3 criteria met"."""
    criteria = criteria or Criteria()
    if isinstance(result, pa.Table):
        table = result
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        base, variant = base or meta.get("base"), variant or meta.get("variant")
    else:
        if not (base and variant):
            raise UserError("verdict over a lake needs base and variant run names")
        table = compare(result, base, variant)
    rows = table.to_pylist()
    if not rows or rows[-1]["category"] != "ALL":
        raise UserError("comparison table has no pooled ALL row last (not from compare_runs.sql?)")
    pooled, by_cat = rows[-1], {r["category"]: r for r in rows[:-1]}
    if criteria.seen_category not in by_cat:
        raise UserError(f"--seen-category: no category {criteria.seen_category!r} in the comparison of "
                        f"{base!r} and {variant!r}; categories present: {', '.join(by_cat) or 'none'}")
    seen = by_cat[criteria.seen_category]

    out: dict[str, dict] = {}
    ratio, limit = seen["ppl_ratio"], 1.0 + criteria.max_ppl_rise
    out["seen_ppl_ratio"] = _criterion(
        ratio, limit, ratio < limit,
        f"{criteria.seen_category} perplexity {seen['base_perplexity']:.4g} -> {seen['variant_perplexity']:.4g} "
        f"(x{ratio:.4f}, {'<' if ratio < limit else '>='} x{limit:.4f} allowed)")
    fr, flimit = pooled["factual_max_ratio"], criteria.max_factual_ratio
    if fr is None or math.isnan(fr):
        out["factual_max_ratio"] = _criterion(None, flimit, False, "no factual tokens (number, proper) with a "
                                              "nonzero baseline maximum surprisal to judge")
    else:
        out["factual_max_ratio"] = _criterion(
            fr, flimit, fr < flimit,
            f"factual-token max surprisal {pooled['base_factual_max']:.4g} -> {pooled['variant_factual_max']:.4g} nats "
            f"over {pooled['factual_tokens']} tokens, all categories (x{fr:.4f}, {'<' if fr < flimit else '>='} "
            f"x{flimit:g} allowed)")
    top, plimit = pooled["variant_max_file_ppl"], criteria.max_file_ppl
    over = f"; {pooled['variant_files_ppl_over_1000']} file(s) over 1000" if plimit == SQL_FILE_PPL else ""
    out["max_file_ppl"] = _criterion(
        top, plimit, top <= plimit,
        f"highest file perplexity {top:.4g} ({'<=' if top <= plimit else '>'} {plimit:g} allowed{over})")
    failed = [name for name, c in out.items() if not c["pass"]]
    reason = f"{failed[0]}: {out[failed[0]]['detail']}" if failed else f"all {len(out)} criteria met"
    return dict(base=base, variant=variant, passed=not failed, reason=reason, failed=failed, criteria=out)


def _criterion(value, threshold, ok: bool, detail: str) -> dict:
    return {"value": value, "threshold": threshold, "pass": bool(ok), "detail": detail}


# -- CLI ---------------------------------------------------------------------------------------
HELP = ("Compare a pruned variant's run with the baseline run over the same texts (perplexity per "
        "category, factual-token surprisal, KL, files over perplexity 1000) and judge it: exit 0 on PASS, 1 on FAIL.")
EXAMPLES = """examples:
  tourray prune verdict --lake lake --base orig --variant cut-3-5
  tourray prune verdict --lake lake --base orig --variant cut-3-5 --max-ppl-rise 0.1 --format json"""


def add_verdict_parser(psub) -> argparse.ArgumentParser:
    """Add `verdict` to the sub-parsers of `tourray prune` (an argparse _SubParsersAction)."""
    from tourray.config import add_config_flags

    p = psub.add_parser("verdict", help=HELP, description=HELP, epilog=EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=cmd_verdict)
    p.add_argument("--lake", default="lake", help="Lake root holding both runs (default: lake).")
    add_storage_options_flag(p)
    p.add_argument("--base", required=True, metavar="RUN", help="Baseline run (the original model's capture).")
    p.add_argument("--variant", required=True, metavar="RUN",
                   help="Variant run (the pruned model, captured with --layers none --reference <original>).")
    add_config_flags(p, Criteria)
    p.add_argument("--format", choices=("table", "json"), default="table", help="Output format (default: table).")
    return p


def cmd_verdict(args) -> int:
    from tourray.config import config_from_args

    criteria = config_from_args(Criteria, args)
    table = compare(Lake(args.lake, args.storage_options), args.base, args.variant)
    v = verdict(table, criteria=criteria)
    if args.format == "json":
        print(json.dumps(dict(comparison=table.to_pylist(), verdict=v, criteria=criteria.model_dump()),
                         indent=1, default=str))
    else:
        print(f"baseline {args.base!r} vs variant {args.variant!r} ({args.lake}):")
        print(format_table(table))
        print(format_verdict(v))
    return 0 if v["passed"] else 1


def format_table(table: pa.Table) -> str:
    """The comparison transposed: one line per measure, one column per category (it has ~20 measures)."""
    rows = table.to_pylist()
    lines = [["measure"] + [r["category"] for r in rows]]
    for name in table.column_names[1:]:
        lines.append([name] + [_fmt(r[name]) for r in rows])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


def format_verdict(v: dict) -> str:
    out = [f"  [{'pass' if c['pass'] else 'FAIL'}] {name}: {c['detail']}" for name, c in v["criteria"].items()]
    return "\n".join(out + [("PASS" if v["passed"] else "FAIL") + f": {v['reason']}"])


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)
