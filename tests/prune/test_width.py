"""`prune width`: the narrower checkpoint computes exactly the original with the dropped units zeroed
(or its residual stream projected, for --hidden), its scores are the lake's statistics, and bad
input is refused with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import lake_snapshot, project_residual
from tourray.errors import UserError
from tourray.surgery.fold import read_layout
from tourray.prune.width import WidthConfig, run_width

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 77, 12, 8, 140, 33, 64, 7], [9, 1, 300, 45, 45, 2, 18, 27, 200, 11, 6, 91, 4]])


@pytest.fixture(scope="module")
def width_lake(qwen3_model, llama_model, corpus_dir, tmp_path_factory, ray_session):
    """Both tiny models captured with inline per-unit statistics (Qwen3 with every layer's moments too,
    Llama with the units alone) and stored resid_post vectors."""
    from tourray.capture import CaptureConfig, run_capture

    root = tmp_path_factory.mktemp("width_lake")
    for run, model, stats in (("q", qwen3_model, "moments"), ("l", llama_model, "units")):
        run_capture(CaptureConfig(model=str(model), samples=str(corpus_dir), lake=str(root), run=run, store_dtype="float32",
                                  batch_size=2, group_size=3, stats=[stats]), progress=False, executor="local")
    return root


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def masked_logits(folder, neurons: dict, heads: dict, head_dim: int):
    """The ORIGINAL model with every dropped neuron's activation and dropped head's output zeroed
    (pre-hooks on down_proj / o_proj): what the pruned model must compute."""
    model = load(folder)
    for i, block in enumerate(model.model.layers):
        def zero(keep, per):
            def hook(mod, args):
                x = args[0].clone()
                mask = torch.zeros(x.shape[-1] // per, dtype=torch.bool)
                mask[torch.as_tensor(keep)] = True
                x[..., ~mask.repeat_interleave(per)] = 0
                return (x,)
            return hook
        if i in neurons:
            block.mlp.down_proj.register_forward_pre_hook(zero(neurons[i], 1))
        if i in heads:
            block.self_attn.o_proj.register_forward_pre_hook(zero(heads[i], head_dim))
    with torch.no_grad():
        return model(IDS).logits


def test_neurons_and_query_heads(width_lake, qwen3_model, tmp_path):
    s = run_width(WidthConfig(model=str(qwen3_model), lake=str(width_lake), run="q", keep_neurons=0.5, keep_heads=0.5,
                              method="magnitude", out=str(tmp_path / "w")), progress=False)
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["intermediate_size"] == 128 and cfg["num_attention_heads"] == 1 and cfg["num_key_value_heads"] == 1
    pruned = load(tmp_path / "w")
    assert sum(p.numel() for p in pruned.parameters()) == s["parameters"] < s["parameters_before"]
    with torch.device("meta"):  # the config alone describes the checkpoint: a standard model
        fresh = type(pruned)(pruned.config)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}

    # which units were kept: recompute the magnitude scores from the model itself on the lake's tokens
    from tourray.lake.tables import Lake

    lake = Lake(str(width_lake))
    spans = {r["sample_id"]: (r["text_start"], r["text_end"]) for r in lake.read("samples", filter="run = 'q'").to_pylist()}
    toks = lake.read("tokens", ["sample_id", "pos", "token_id"], filter="run = 'q'").to_pandas().sort_values(["sample_id", "pos"])
    orig = load(qwen3_model)
    acts = {i: [] for i in range(3)}
    heads_ = {i: [] for i in range(3)}
    for i, b in enumerate(orig.model.layers):
        b.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: acts[i].append(a[0][0]))
        b.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: heads_[i].append(a[0][0]))
    for sid, g in toks.groupby("sample_id"):
        with torch.no_grad():
            orig(torch.tensor([g.token_id.tolist()]))
        a, e = spans[sid]
        for i in range(3):
            acts[i][-1], heads_[i][-1] = acts[i][-1][a:e], heads_[i][-1][a:e]
    neurons, heads = {}, {}
    for i in range(3):
        x = torch.cat(acts[i]).double()
        neurons[i] = np.sort(np.argsort(-x.abs().mean(0).numpy(), kind="stable")[:128])
        hn = torch.cat(heads_[i]).double().reshape(x.shape[0], 2, 64).norm(dim=-1).mean(0).numpy()
        heads[i] = [int(np.argmax(hn))]
    w_pruned = pruned.model.layers[0].mlp.down_proj.weight
    w_orig = orig.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w_pruned, w_orig[:, torch.as_tensor(neurons[0])])
    assert rel(pruned(IDS).logits.detach(), masked_logits(qwen3_model, neurons, heads, 64)) < 1e-5


def test_whole_groups_and_activation_norm(width_lake, llama_model, tmp_path):
    s = run_width(WidthConfig(model=str(llama_model), lake=str(width_lake), run="l", keep_heads=0.5, keep_neurons=0.75,
                              head_unit="group", out=str(tmp_path / "w")), progress=False)
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 1 and cfg["num_attention_heads"] == 1 and cfg["head_dim"] == 64
    assert cfg["intermediate_size"] == 192 and s["config_changes"]["intermediate_size"] == 192
    pruned, orig = load(tmp_path / "w"), load(llama_model)
    neurons, heads = {}, {}
    for i, (bp, bo) in enumerate(zip(pruned.model.layers, orig.model.layers)):
        wo, wp = bo.mlp.down_proj.weight, bp.mlp.down_proj.weight
        neurons[i] = [int((wo - wp[:, j:j + 1]).abs().sum(0).argmin()) for j in range(wp.shape[1])]
        qo, qp = bo.self_attn.q_proj.weight.reshape(2, 64, -1), bp.self_attn.q_proj.weight.reshape(1, 64, -1)
        heads[i] = [int((qo - qp[0]).abs().sum((1, 2)).argmin())]
        assert neurons[i] == sorted(neurons[i]) and len(set(neurons[i])) == 192
    assert rel(pruned(IDS).logits.detach(), masked_logits(llama_model, neurons, heads, 64)) < 1e-5


@pytest.mark.parametrize("run,model", [("q", "qwen3_model"), ("l", "llama_model")])
def test_hidden_slicing_is_the_projected_original(run, model, width_lake, request, tmp_path):
    """The sliced model equals the original whose residual stream is projected onto the kept basis
    after the embedding and every block write (RMSNorm over the narrower width corrected; on Qwen3
    q_norm / k_norm share the rescaled eps and stay exact)."""
    src = request.getfixturevalue(model)
    s = run_width(WidthConfig(model=str(src), lake=str(width_lake), run=run, hidden=96, out=str(tmp_path / "w")),
                  progress=False)
    sl = s["evidence"]["slicing"]
    assert s["config_changes"]["hidden_size"] == 96 and 0 < min(sl["kept_energy"].values()) <= 1
    lay = read_layout(src)
    assert s["config_changes"]["rms_norm_eps"] == pytest.approx(lay.eps * 128 / 96)
    sliced, orig = load(tmp_path / "w"), load(src)
    q = sliced.model.embed_tokens.weight.double()  # E Q: recover Q by least squares from E
    e = orig.model.embed_tokens.weight.double()
    basis = torch.linalg.lstsq(e, q).solution.detach()  # [128, 96], orthonormal columns
    assert float((basis.T @ basis - torch.eye(96, dtype=torch.float64)).abs().max()) < 1e-6
    project_residual(orig, basis)
    with torch.no_grad():
        assert rel(sliced(IDS).logits, orig(IDS).logits) < 1e-5


def test_hidden_uses_the_stored_blocks_of_a_partly_stored_run(qwen3_model, corpus_dir, tmp_path):
    """A run that hooked every block but stored only some (--store embed,0,2; the rest feed inline
    statistics): --hidden slices from the stored blocks (it asked `tourray stats` for every block and
    was refused with a --layers flag `prune width` does not have)."""
    from tourray.capture import CaptureConfig, run_capture

    lake = tmp_path / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="p",
                              store="embed,0,2", stats=["units"], store_dtype="float32", batch_size=3, group_size=3),
                progress=False, executor="local")
    s = run_width(WidthConfig(model=str(qwen3_model), lake=str(lake), run="p", hidden=96, out=str(tmp_path / "w")),
                  progress=False)
    sl = s["evidence"]["slicing"]
    assert sl["layers"] == [0, 2] and sorted(sl["kept_energy"]) == [0, 2]
    assert s["config_changes"]["hidden_size"] == 96


def test_slicing_basis_is_the_numpy_eigenbasis(width_lake):
    """The kept subspace is the top eigenspace of the trace-normalised uncentred second moments of the
    stored blocks, over all tokens (numpy on the activations table)."""
    from tourray.lake.tables import Lake, arrow_to_numpy
    from tourray.prune.width import slicing_basis

    q, info = slicing_basis(Lake(str(width_lake)), "q", 40, 128)
    t = Lake(str(width_lake)).read("activations", ["layer", "h"], filter="run = 'q' AND site = 'resid_post' AND layer >= 0")
    h, layer = arrow_to_numpy(t.column("h"), np.float64), t.column("layer").to_numpy()
    total = sum((c := h[layer == l].T @ h[layer == l] / (layer == l).sum()) / np.trace(c) for l in info["layers"])
    v = np.linalg.eigh(total)[1][:, ::-1][:, :40]
    assert np.abs(q @ q.T - v @ v.T).max() < 1e-8


BAD = [
    (dict(keep_neurons=0), "--keep-neurons"),
    (dict(keep_heads=1.5), "--keep-heads"),
    (dict(keep_heads=0.6, head_unit="group"), "keeps all 1 key/value groups once rounded"),  # not silently all
    (dict(), "nothing to prune"),
    (dict(hidden=128), "must be below"),
    (dict(hidden=95), "not a multiple of the 2 attention heads"),
    (dict(keep_neurons=0.5, run="nope"), "no run 'nope'"),
    (dict(keep_neurons=0.5, model="llama_model"), "width scores must come from this model"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_refusals(extra, message, width_lake, qwen3_model, request, tmp_path):
    before = lake_snapshot(width_lake)
    args = dict(model=str(qwen3_model), lake=str(width_lake), run="q", out=str(tmp_path / "w")) | extra
    if args["model"] == "llama_model":
        args["model"] = str(request.getfixturevalue("llama_model"))
    with pytest.raises(UserError, match=message):
        run_width(WidthConfig.parse(args), progress=False)
    assert lake_snapshot(width_lake) == before and not (tmp_path / "w").exists()


def test_run_without_inline_statistics_is_refused(prune_lake, qwen3_model, tmp_path):
    with pytest.raises(UserError, match="--stats units"):
        run_width(WidthConfig(model=str(qwen3_model), lake=str(prune_lake), run="full", keep_neurons=0.5,
                              out=str(tmp_path / "w")), progress=False)


def test_cli_refusal_is_one_line(width_lake, qwen3_model, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    p = subprocess.run([sys.executable, "-m", "tourray.cli", "prune", "width", "--model", str(qwen3_model), "--lake",
                        str(width_lake), "--run", "q", "--keep-neurons", "1.5", "--out", str(tmp_path / "w")],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "--keep-neurons" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error:") and not (tmp_path / "w").exists()
