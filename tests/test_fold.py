"""tourray fold: the folded checkpoint computes the original's function (logits against the
original model itself), inverses restore the weights, and every unfoldable spec is refused."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, needs_smollm2, project_residual

from tourray.errors import UserError
from tourray.fold import Layout, Surgery, apply_surgery, read_layout

IDS = [[5, 17, 42, 99, 3, 250, 77, 12, 8, 140, 33, 64], [9, 1, 300, 45, 45, 2, 18, 27, 200, 11, 6, 91]]


def load(folder, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype)).eval()


def logits(folder, dtype="float32", ids=IDS):
    import torch

    with torch.no_grad():
        return load(folder, dtype)(torch.tensor(ids)).logits.double().numpy()


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@contextlib.contextmanager
def float64_norms():
    """transformers' RMSNorms compute in float32 even in a float64 model (~1e-7 relative): for the
    float64 checks both the original and the folded model use an RMSNorm computed in its input dtype,
    so that the comparison measures the fold's algebra, not that cast."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3 import modeling_qwen3

    def forward(self, h):
        return self.weight * (h * (h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon).rsqrt())

    saved = [(c, c.forward) for c in (modeling_llama.LlamaRMSNorm, modeling_qwen3.Qwen3RMSNorm)]
    for c, _ in saved:
        c.forward = forward
    try:
        yield
    finally:
        for c, f in saved:
            c.forward = f


def rotation(d: int, seed: int = 0) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]


def layout(folder) -> Layout:
    return read_layout(folder)


def all_transforms(lay: Layout, seed: int = 0) -> Surgery:
    """A rotation, every block's neurons permuted, heads permuted within groups and (when there are
    several) whole groups reordered."""
    rng = np.random.default_rng(seed)
    s = Surgery(residual=rotation(lay.hidden, seed))
    for i in range(lay.layers):
        s.neurons[i] = rng.permutation(lay.ffn)
        groups = rng.permutation(lay.kv_heads)
        s.heads[i] = np.concatenate([g * lay.group + rng.permutation(lay.group) for g in groups])
    return s


@pytest.fixture(scope="module")
def gqa_qwen3(tmp_path_factory):
    """A 2-block Qwen3 with 4 query heads over 2 key/value heads, non-trivial norms, untied head, large eps."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    cfg = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
                      rms_norm_eps=0.05)  # large: slicing must rescale it exactly, q_norm / k_norm included
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("gqa") / "m"
    model.save_pretrained(out)
    return out


def as_float64(folder, tmp_path) -> Path:
    out = tmp_path / "f64"
    load(folder, "float64").save_pretrained(out)
    return out


# -- function preserved ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen3_model", "llama_model", "gqa_qwen3"])
def test_fold_preserves_logits_float32(name, request, tmp_path):
    src = request.getfixturevalue(name)
    s = all_transforms(layout(src))
    apply_surgery(src, tmp_path / "out", s, {})
    assert rel(logits(tmp_path / "out"), logits(src)) < 1e-5


@pytest.mark.parametrize("name", ["qwen3_model", "llama_model", "gqa_qwen3"])
def test_fold_preserves_logits_float64(name, request, tmp_path):
    src = as_float64(request.getfixturevalue(name), tmp_path)
    s = all_transforms(layout(src), seed=1)
    apply_surgery(src, tmp_path / "out", s, {})
    with float64_norms():
        a, b = logits(tmp_path / "out", "float64"), logits(src, "float64")
    assert rel(a, b) < 1e-10


@needs_smollm2
def test_fold_preserves_smollm2(smollm2_model, tmp_path):
    """The real checkpoint: tied embeddings (untied by the fold), 9 query heads over 3 key/value heads."""
    lay = layout(smollm2_model)
    assert lay.tied and lay.kv_heads == 3 and lay.group == 3
    apply_surgery(smollm2_model, tmp_path / "out", all_transforms(lay, seed=2), {})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    ids = [[1, 504, 3458, 314, 260, 1345, 28, 2114, 1001, 30, 7, 99]]
    assert rel(logits(tmp_path / "out", ids=ids), logits(smollm2_model, ids=ids)) < 1e-5


def test_rotation_is_really_applied(qwen3_model, tmp_path):
    """Not a no-op: the folded embedding is E diag(1) Q, and the residual stream is h Q."""
    import torch

    q = rotation(128)
    apply_surgery(qwen3_model, tmp_path / "out", Surgery(residual=q), {})
    a, b = load(qwen3_model), load(tmp_path / "out")
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ha = a(ids, output_hidden_states=True).hidden_states[1].double().numpy()
        hb = b(ids, output_hidden_states=True).hidden_states[1].double().numpy()
    assert rel(hb, ha @ q) < 1e-5 and rel(hb, ha) > 0.5


@pytest.mark.parametrize("name", ["gqa_qwen3", "llama_model"])
def test_slicing_is_the_projected_original(name, request, tmp_path):
    """A semi-orthogonal Q (d x K): the sliced model equals the original with its residual stream
    projected onto Q's columns, the RMSNorm over K channels corrected (eps d/K, sqrt(d/K) folded; on
    Qwen3 q_norm / k_norm, which share that eps, see inputs scaled to match)."""
    import torch

    src = request.getfixturevalue(name)
    lay = layout(src)
    k = lay.hidden * 3 // 4
    q = rotation(lay.hidden, 5)[:, :k]
    apply_surgery(src, tmp_path / "out", Surgery(residual=q), {})
    orig = load(src)
    project_residual(orig, torch.from_numpy(q))
    with torch.no_grad():
        want = orig(torch.tensor(IDS)).logits.double().numpy()
    assert rel(logits(tmp_path / "out"), want) < 1e-5


# -- inverses -------------------------------------------------------------------------------------
def _weights(folder):
    from safetensors.torch import load_file

    return {k: v.double().numpy() for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}


def test_inverse_transforms_restore_the_weights(gqa_qwen3, tmp_path):
    """Permutations then their inverses give back the exact weights; a rotation then Q^T gives the
    original with its norm weights absorbed (the identity fold: the only part a rotation cannot undo)."""
    lay = layout(gqa_qwen3)
    s = all_transforms(lay, seed=4)
    perms = Surgery(neurons=s.neurons, heads=s.heads)
    apply_surgery(gqa_qwen3, tmp_path / "p", perms, {})
    inv = Surgery(neurons={i: np.argsort(p) for i, p in s.neurons.items()},
                  heads={i: np.argsort(p) for i, p in s.heads.items()})
    apply_surgery(tmp_path / "p", tmp_path / "pp", inv, {})
    orig, back = _weights(gqa_qwen3), _weights(tmp_path / "pp")
    assert orig.keys() == back.keys() and all(np.array_equal(orig[k], back[k]) for k in orig)
    assert any(not np.array_equal(orig[k], v) for k, v in _weights(tmp_path / "p").items())

    src = as_float64(gqa_qwen3, tmp_path)
    apply_surgery(src, tmp_path / "r", Surgery(residual=s.residual), {})
    apply_surgery(tmp_path / "r", tmp_path / "rr", Surgery(residual=s.residual.T), {})
    apply_surgery(src, tmp_path / "i", Surgery(residual=np.eye(lay.hidden)), {})
    ident, rr = _weights(tmp_path / "i"), _weights(tmp_path / "rr")
    assert ident.keys() == rr.keys() and max(np.abs(ident[k] - rr[k]).max() for k in ident) < 1e-12


# -- refusals -----------------------------------------------------------------------------------------
def cli(*args):
    return subprocess.run([sys.executable, "-m", "tourray.cli", "fold", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def write_spec(tmp_path, spec: dict, q: np.ndarray | None = None) -> Path:
    if q is not None:
        np.save(tmp_path / "Q.npy", q)
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(spec))
    return p


def test_cli_folds_a_spec(gqa_qwen3, tmp_path):
    spec = write_spec(tmp_path, {"residual_rotation": "Q.npy", "layers": {"1": {"neuron_permutation": list(
        np.random.default_rng(0).permutation(96).tolist()), "head_permutation": [3, 2, 1, 0]}}}, rotation(64))
    r = cli("--model", gqa_qwen3, "--spec", spec, "--out", tmp_path / "out", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert rel(logits(tmp_path / "out"), logits(gqa_qwen3)) < 1e-5
    prov = json.loads((tmp_path / "out" / "tourray_fold.json").read_text())
    assert prov["surgery"]["residual"] == [64, 64] and prov["source_revision"]


BAD = {
    "not orthogonal": ({"residual_rotation": "Q.npy"}, "scaled", "not orthogonal"),
    "wrong shape": ({"residual_rotation": "Q.npy"}, "short", "is 64 x 32"),
    "per-layer rotation": ({"layers": {"0": {"rotation": "Q.npy"}}}, None, "rotation per layer is not a fold"),
    "head splits a group": ({"layers": {"0": {"head_permutation": [0, 2, 1, 3]}}}, None, "must stay with its key/value head"),
    "not a permutation": ({"layers": {"0": {"neuron_permutation": [0] * 96}}}, None, "not a permutation"),
    "layer out of range": ({"layers": {"7": {"neuron_permutation": list(range(96))}}}, None, "0..1"),
    "unknown key": ({"residual_rotaton": "Q.npy"}, None, "residual_rotaton"),
    "nothing": ({}, None, "nothing to fold"),
    "missing matrix": ({"residual_rotation": "nope.npy"}, None, "cannot load"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_refuses(case, gqa_qwen3, tmp_path):
    spec, q, message = BAD[case]
    mat = {"scaled": 1.01 * rotation(64), "short": rotation(64)[:, :32], None: None}[q]
    r = cli("--model", gqa_qwen3, "--spec", write_spec(tmp_path, spec, mat), "--out", tmp_path / "out")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bad_files_and_families(gqa_qwen3, tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    for args, message in (((gqa_qwen3, tmp_path / "missing.json"), "cannot read"),
                          ((gqa_qwen3, tmp_path / "broken.json"), "not JSON"),
                          ((tmp_path, write_spec(tmp_path, {})), "no config.json")):
        r = cli("--model", args[0], "--spec", args[1], "--out", tmp_path / "out")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(UserError, match="sandwich norms"):
        apply_surgery(gemma, tmp_path / "out", Surgery(residual=np.eye(4)), {})
    assert not (tmp_path / "out").exists()


def test_stray_weight_files_are_not_copied(qwen3_model, tmp_path):
    """Weights the surgery does not rewrite (a consolidated copy, pickles, a GGUF) would ship the
    unfolded model beside the folded one: only the tokenizer and other small files travel."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(qwen3_model, src)
    for name in ("consolidated.safetensors", "pytorch_model.bin", "weights.pt", "model.Q4.gguf", "extra.gguf"):
        (src / name).write_bytes(b"stale")
    apply_surgery(src, tmp_path / "out", Surgery(residual=rotation(128)), {})
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not names & {"consolidated.safetensors", "pytorch_model.bin", "weights.pt", "model.Q4.gguf", "extra.gguf"}
    assert {"config.json", "tokenizer.json", "tourray_fold.json"} <= names
