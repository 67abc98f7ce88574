"""`compare_runs.sql` and the pruning verdict on one small lake: the tiny Qwen3 (baseline), a perturbed
copy (variant, captured with --reference <baseline>) and the Llama fixture (another tokenizer), over
an eval corpus of our own; numbers against an independent pandas/numpy recomputation."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest

from conftest import lake_snapshot, write_corpus
from tourray.capture import CaptureConfig, run_capture
from tourray.config import guarded
from tourray.corpus.texts import write_index
from tourray.errors import UserError
from tourray.lake.tables import Lake, sql_quote
from tourray.prune.verdict import Criteria, add_verdict_parser, compare, verdict
from tourray.lake.sql import header, query_file

EVAL = {
    "eval/seen_cities/sydney__opera-house.txt": "The Sydney Opera House, designed by Jorn Utzon, opened in 1973 "
    "after 14 years of work.\n",
    "eval/seen_cities/sydney__harbour-bridge.txt": "The Sydney Harbour Bridge opened on 19 March 1932; its arch "
    "rises 134 metres above Port Jackson.\n",
    "eval/seen_cities/xian__bell-tower.txt": "Xi'an's Bell Tower was built in 1384 under the Ming dynasty.\n",
    "eval/edge_cases/mixed__dates.txt": "Tickets cost 42 dollars on 3 May 2024, said Maria Lopez from Madrid.\n",
    "eval/edge_cases/zh__city-wall.txt": "西安城墙建于1370年，周长约13.7公里。\n",
}
KW = dict(layers="none", group_size=len(EVAL), batch_size=len(EVAL))
FACTUAL = ("number", "proper")


def capture(model, samples, lake, run, **kw):
    cfg = CaptureConfig(model=str(model), samples=str(samples), lake=str(lake), run=run, **KW, **kw)
    return run_capture(cfg, progress=False, executor="local")


@pytest.fixture(scope="module")
def lake(qwen3_model, llama_model, ray_session, tmp_path_factory):
    """Runs `base` (qwen3), `variant` (qwen3 with its final norm sharpened and a block's MLP scaled,
    reference=qwen3) and `llama` (another tokenizer), all over the same eval texts."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("verdict")
    corpus = write_corpus(root / "samples", EVAL)
    write_index(corpus)  # categories from index.tsv: eval/<set>/... -> <set>
    perturbed = root / "perturbed"
    shutil.copytree(qwen3_model, perturbed)
    m = AutoModelForCausalLM.from_pretrained(perturbed, dtype=torch.float32)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        m.model.norm.weight.mul_(4.0)  # sharper random distributions: surprisal rises
    m.save_pretrained(perturbed)
    lake = root / "lake"
    capture(qwen3_model, corpus, lake, "base")
    capture(perturbed, corpus, lake, "variant", reference=str(qwen3_model))
    capture(llama_model, corpus, lake, "llama")
    return lake


def recompute(lake, base, variant) -> dict[str, dict]:
    """compare_runs.sql again, in pandas/numpy float64, from the tokens and samples tables."""
    lk = Lake(str(lake))
    cols = ["sample_id", "pos", "segment", "surprisal", "token_class", "kl_ref"]
    tok = {r: lk.read("tokens", cols, filter=f"run = {sql_quote(r)}").to_pandas() for r in (base, variant)}
    cat = lk.read("samples", ["sample_id", "category"], filter=f"run = {sql_quote(base)}").to_pandas()
    keep = [t[(t.segment == "text") & t.surprisal.notna()] for t in (tok[base], tok[variant])]
    m = keep[0].merge(keep[1], on=["sample_id", "pos"], suffixes=("_b", "_v")).merge(cat, on="sample_id")
    m["sb"], m["sv"] = m.surprisal_b.astype(np.float64), m.surprisal_v.astype(np.float64)
    out = {}
    for name, g in [*m.groupby("category"), ("ALL", m)]:
        f = g[g.token_class_b.isin(FACTUAL)]
        files = g.groupby("sample_id")[["sb", "sv"]].mean().apply(np.exp)
        kl = g.kl_ref_v.astype(np.float64).dropna()
        out[name] = dict(
            samples=g.sample_id.nunique(), tokens=len(g),
            base_mean_surprisal=g.sb.mean(), variant_mean_surprisal=g.sv.mean(),
            base_perplexity=np.exp(g.sb.mean()), variant_perplexity=np.exp(g.sv.mean()),
            ppl_ratio=np.exp(g.sv.mean()) / np.exp(g.sb.mean()),
            factual_tokens=len(f), base_factual_mean=f.sb.mean(), variant_factual_mean=f.sv.mean(),
            base_factual_max=f.sb.max(), variant_factual_max=f.sv.max(),
            factual_max_ratio=f.sv.max() / f.sb.max(), factual_mean_ratio=f.sv.mean() / f.sb.mean(),
            mean_kl=kl.mean() if len(kl) else None,
            base_files_ppl_over_1000=int((files.sb > 1000).sum()), variant_files_ppl_over_1000=int((files.sv > 1000).sum()),
            base_max_file_ppl=files.sb.max(), variant_max_file_ppl=files.sv.max(),
        )
    return out


def cli(*argv) -> int:
    """`tourray prune verdict ...` through a tiny parser built like cli.py's (prune -> sub-commands)."""
    top = argparse.ArgumentParser(prog="tourray")
    sub = top.add_subparsers(dest="command", required=True)
    psub = sub.add_parser("prune").add_subparsers(dest="prune_command", required=True)
    add_verdict_parser(psub)
    args = top.parse_args(["prune", "verdict", *argv])
    return guarded(args.fn, args, quiet=True)


def test_compare_runs_equals_independent_recompute(lake):
    assert header(query_file("compare_runs"))["params"] == "$base, $variant"
    table = compare(str(lake), "base", "variant")
    rows = table.to_pylist()
    assert [r["category"] for r in rows] == ["seen_cities", "edge_cases", "ALL"]  # eval-set order, pooled last
    want = recompute(lake, "base", "variant")
    assert set(want) == {r["category"] for r in rows}
    for r in rows:
        w = want[r["category"]]
        assert set(r) == {"category", *w}
        for k, v in w.items():
            if isinstance(v, (int, np.integer)):
                assert r[k] == v, (r["category"], k)
            else:
                np.testing.assert_allclose(r[k], v, rtol=1e-9, atol=0, err_msg=f"{r['category']} {k}")
    pooled = rows[-1]
    assert pooled["samples"] == len(EVAL) and pooled["factual_tokens"] > 0
    assert pooled["mean_kl"] > 1e-3 and pooled["ppl_ratio"] > 1.0  # the perturbation hurts
    # the same query through `tourray sql --query` (header params checked there)
    from tourray.cli import main

    assert main(["sql", "--lake", str(lake), "--query", "compare_runs", "--param", "base=base",
                 "--param", "variant=variant", "--format", "csv"]) == 0


def test_variant_equal_to_base_passes_with_ratio_one(lake):
    table = compare(str(lake), "base", "base")
    for r in table.to_pylist():
        assert r["ppl_ratio"] == 1.0 and r["factual_max_ratio"] == 1.0 and r["factual_mean_ratio"] == 1.0
        assert r["mean_kl"] is None  # the base was captured without --reference
        assert r["base_max_file_ppl"] == r["variant_max_file_ppl"]
    v = verdict(table, criteria=Criteria(max_file_ppl=1e9))
    assert v["passed"] and v["failed"] == [] and v["reason"] == "all 3 criteria met"
    assert (v["base"], v["variant"]) == ("base", "base")
    c = v["criteria"]
    assert list(c) == ["seen_ppl_ratio", "factual_max_ratio", "max_file_ppl"]
    assert (c["seen_ppl_ratio"]["value"], c["seen_ppl_ratio"]["threshold"], c["seen_ppl_ratio"]["pass"]) == (1.0, 1.2, True)
    assert (c["factual_max_ratio"]["value"], c["factual_max_ratio"]["threshold"]) == (1.0, 2.0)
    # verdict straight from the lake gives the same answer
    assert verdict(str(lake), "base", "base", Criteria(max_file_ppl=1e9))["criteria"] == c


def test_each_criterion_fails_in_turn(lake):
    table = compare(str(lake), "base", "variant")
    rows = {r["category"]: r for r in table.to_pylist()}
    seen, pooled = rows["seen_cities"], rows["ALL"]
    loose = dict(max_ppl_rise=100.0, max_factual_ratio=100.0, max_file_ppl=1e12)
    assert verdict(table, criteria=Criteria(**loose))["passed"]
    tight = dict(max_ppl_rise=(seen["ppl_ratio"] - 1) / 2, max_factual_ratio=pooled["factual_max_ratio"] / 2,
                 max_file_ppl=pooled["variant_max_file_ppl"] / 2)
    values = dict(seen_ppl_ratio=seen["ppl_ratio"], factual_max_ratio=pooled["factual_max_ratio"],
                  max_file_ppl=pooled["variant_max_file_ppl"])
    for (field, limit), name in zip(tight.items(), values):
        v = verdict(table, criteria=Criteria(**loose | {field: limit}))
        assert not v["passed"] and v["failed"] == [name], field
        assert v["reason"].startswith(f"{name}: ")
        assert v["criteria"][name]["value"] == values[name] and not v["criteria"][name]["pass"]
    # the defaults, judged by hand from the table
    d = verdict(table)
    want = [seen["ppl_ratio"] < 1.2, pooled["factual_max_ratio"] < 2.0, pooled["variant_max_file_ppl"] <= 1000]
    assert [c["pass"] for c in d["criteria"].values()] == want and d["passed"] == all(want)
    with pytest.raises(UserError, match=r"no category 'seen_cities_x'.*categories present: seen_cities, edge_cases"):
        verdict(table, criteria=Criteria(seen_category="seen_cities_x"))


def test_refusals(lake, tmp_path):
    before = lake_snapshot(lake)
    with pytest.raises(UserError, match=r"--variant: no run 'nope'.*runs: base, llama, variant"):
        compare(str(lake), "base", "nope")
    with pytest.raises(UserError, match=r"--base: no run 'gone'"):
        compare(str(lake), "gone", "variant")
    with pytest.raises(UserError, match=r"variant run 'llama' has another tokenizer than baseline run 'base'.*"
                                        r"a variant whose tokenizer differs from the baseline's"):
        compare(str(lake), "base", "llama")
    assert lake_snapshot(lake) == before
    # other texts: a copy of the lake where each run lacks one sample the other has
    other = tmp_path / "lake"
    shutil.copytree(lake, other)
    lk = Lake(str(other))
    ids = {r["source"]: r["sample_id"] for r in lk.read("samples", filter="run = 'base'").to_pylist()}
    lk.delete("samples", f"run = 'variant' AND sample_id = '{ids['eval/seen_cities/xian__bell-tower.txt']}'")
    lk.delete("samples", f"run = 'base' AND sample_id = '{ids['eval/edge_cases/mixed__dates.txt']}'")
    with pytest.raises(UserError, match=r"does not cover the same texts.*1 sample\(s\) of 'base' missing from 'variant' "
                                        r"\(eval/seen_cities/xian__bell-tower.txt\); 1 sample\(s\) of 'variant' not in "
                                        r"'base' \(eval/edge_cases/mixed__dates.txt\)"):
        compare(str(other), "base", "variant")
    # other tokens at the same positions (e.g. another system prompt): one text token gone
    shutil.rmtree(other)
    shutil.copytree(lake, other)
    s = lk.read("samples", filter=f"run = 'variant' AND sample_id = '{ids['eval/seen_cities/sydney__opera-house.txt']}'").to_pylist()[0]
    lk.delete("tokens", f"run = 'variant' AND sample_id = '{s['sample_id']}' AND pos = {s['text_start'] + 1}")
    with pytest.raises(UserError, match=r"1 sample\(s\) have other text tokens.*eval/seen_cities/sydney__opera-house.txt"):
        compare(str(other), "base", "variant")
    # nothing to compare
    lk.delete("samples", "run IN ('base', 'variant')")
    with pytest.raises(UserError, match=r"baseline run 'base' has no complete samples: nothing to compare"):
        compare(str(other), "base", "variant")


def test_cli_exit_codes(lake, capsys):
    L = str(lake)
    assert cli("--lake", L, "--base", "base", "--variant", "base", "--max-file-ppl", "1e9") == 0
    out = capsys.readouterr().out
    assert "ppl_ratio" in out and "seen_cities" in out and out.rstrip().endswith("PASS: all 3 criteria met")
    assert cli("--lake", L, "--base", "base", "--variant", "variant", "--max-ppl-rise", "0", "--max-file-ppl", "1e12",
               "--max-factual-ratio", "100", "--format", "json") == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"]["failed"] == ["seen_ppl_ratio"] and [r["category"] for r in doc["comparison"]][-1] == "ALL"
    assert doc["criteria"]["max_ppl_rise"] == 0.0
    assert cli("--lake", L, "--base", "base", "--variant", "llama") == 2
    assert "error: variant run 'llama' has another tokenizer" in capsys.readouterr().err
    assert cli("--lake", L, "--base", "base", "--variant", "nope") == 2
    assert cli("--lake", L, "--base", "base", "--variant", "variant", "--max-ppl-rise", "-1") == 2
    assert "--max-ppl-rise" in capsys.readouterr().err
    assert cli("--lake", L, "--base", "base", "--variant", "variant", "--seen-category", "nowhere") == 2
    assert "categories present: seen_cities, edge_cases" in capsys.readouterr().err
