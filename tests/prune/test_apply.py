"""`prune apply` end to end (plan file -> patched checkpoint whose block before the span computes
y + m T) and its refusals, through the API and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import lake_snapshot
from tourray.errors import UserError
from tourray.lake.tables import Lake
from tourray.prune.apply import ApplyConfig, run_apply
from tourray.prune.patch import solve_span
from tourray.prune.plan import PlanConfig, make_plan, write_plan


def test_apply_lstsq_folds_the_patch(prune_lake, qwen3_model, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = make_plan(PlanConfig(lake=str(prune_lake), run="full", method="reverse", remove=1))  # block 1
    p = write_plan(plan, tmp_path / "plan.json")
    s = run_apply(ApplyConfig(model=str(qwen3_model), plan=str(p), out=str(tmp_path / "ckpt"), patch="lstsq"))
    assert s["num_layers"] == 2 and s["removed"] == [1] and s["patches"][0]["fold_into"] == 0
    prov = json.loads((tmp_path / "ckpt" / "tourray_prune.json").read_text())
    assert prov["removed"] == [1] and prov["plan"]["method"] == "reverse" and prov["patch"] == "lstsq"
    t = solve_span(Lake(str(prune_lake)), "full", 1, 1).matrix
    orig = AutoModelForCausalLM.from_pretrained(qwen3_model, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    ids = torch.randint(0, orig.config.vocab_size, (1, 17))
    keep = {}
    orig.model.layers[0].post_attention_layernorm.register_forward_pre_hook(lambda m, a: keep.update(y=a[0]))
    orig.model.layers[0].mlp.register_forward_hook(lambda m, a, o: keep.update(m=o))
    pruned.model.layers[0].register_forward_hook(lambda m, a, o: keep.update(out=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        orig(input_ids=ids)
        pruned(input_ids=ids)
    want = keep["y"][0].double().numpy() + keep["m"][0].double().numpy() @ t
    got = keep["out"][0].double().numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5  # float32 model, float64 reference


def test_apply_refusals_write_nothing(prune_lake, qwen3_model, llama_model, tmp_path):
    plan = write_plan(make_plan(PlanConfig(lake=str(prune_lake), run="bare", method="reverse", remove=1)), tmp_path / "p.json")
    before = lake_snapshot(prune_lake)
    with pytest.raises(UserError, match="capture the unpruned model with --sites resid_post,resid_mid"):
        run_apply(ApplyConfig(model=str(qwen3_model), plan=str(plan), out=str(tmp_path / "a"), patch="lstsq"))
    with pytest.raises(UserError, match="is for a model of 3 blocks"):
        run_apply(ApplyConfig(model=str(llama_model), plan=str(plan), out=str(tmp_path / "b")))
    (tmp_path / "p2.json").write_text(json.dumps({"removed": [0, 1, 2], "num_layers": 3}))
    with pytest.raises(UserError, match="cannot remove every block"):
        run_apply(ApplyConfig(model=str(qwen3_model), plan=str(tmp_path / "p2.json"), out=str(tmp_path / "c")))
    assert not any((tmp_path / d).exists() for d in "abc") and lake_snapshot(prune_lake) == before


@pytest.mark.parametrize("argv, msg", [
    (["prune", "plan", "--run", "full", "--method", "reverse", "--remove", "3"], "must remove at least 1 and keep at least 1"),
    (["prune", "plan", "--run", "full", "--method", "sideways", "--remove", "1"], "method"),
    (["prune", "plan", "--run", "full", "--method", "reverse"], "exactly one of --remove N and --keep K"),
    (["prune", "apply", "--plan", "{bad_plan}", "--out", "{out}"], "removes block -1, the embedding"),
    (["prune", "apply", "--plan", "{range_plan}", "--out", "{out}"], "out of range"),
])
def test_cli_bad_input_is_one_error(prune_lake, qwen3_model, tmp_path, capsys, argv, msg):
    from tourray.cli import main

    (tmp_path / "bad.json").write_text(json.dumps({"removed": [-1, 1]}))
    (tmp_path / "range.json").write_text(json.dumps({"removed": [1, 7]}))
    fill = dict(bad_plan=str(tmp_path / "bad.json"), range_plan=str(tmp_path / "range.json"), out=str(tmp_path / "out"))
    argv = [a.format(**fill) for a in argv] + (["--lake", str(prune_lake)] if argv[1] == "plan" else ["--model", str(qwen3_model)])
    before = lake_snapshot(prune_lake)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and msg in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2  # one line; a flag validation names the field on the next
    assert not (tmp_path / "out").exists() and lake_snapshot(prune_lake) == before
