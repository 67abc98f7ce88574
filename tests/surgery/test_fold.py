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
from tourray.surgery.fold import Layout, Surgery, apply_surgery, read_layout

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
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    def forward(self, h):
        return self.weight * (h * (h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon).rsqrt())

    saved = [(c, c.forward) for c in (modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm,
                                              modeling_qwen3.Qwen3RMSNorm)]
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
    model = randomized(Qwen3ForCausalLM(cfg))
    out = tmp_path_factory.mktemp("gqa") / "m"
    model.save_pretrained(out)
    return out


def randomized(model, bias_std: float = 0.2):
    """Non-trivial norm weights (uniform 0.5..1.5) and biases (normal, `bias_std`; transformers inits them at 0)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, bias_std)
    return model


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory):
    """A 2-block Qwen2: biases on q/k/v (none on o_proj), 6 query heads over 2 key/value heads (groups of 3)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    cfg = Qwen2Config(vocab_size=320, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=0.05)
    model = randomized(Qwen2ForCausalLM(cfg))
    assert model.model.layers[0].self_attn.q_proj.bias is not None and model.model.layers[0].self_attn.o_proj.bias is None
    out = tmp_path_factory.mktemp("qwen2") / "m"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory):
    """A 2-block Llama with attention_bias (q/k/v AND o_proj) and mlp_bias (gate/up AND down_proj), GQA 4:2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(6)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
                      attention_bias=True, mlp_bias=True, rms_norm_eps=0.05)
    model = randomized(LlamaForCausalLM(cfg))
    block = model.model.layers[0]
    assert block.self_attn.o_proj.bias is not None and block.mlp.down_proj.bias is not None
    out = tmp_path_factory.mktemp("llama_bias") / "m"
    model.save_pretrained(out)
    return out


def as_float64(folder, tmp_path) -> Path:
    out = tmp_path / "f64"
    load(folder, "float64").save_pretrained(out)
    return out


# -- function preserved ----------------------------------------------------------------------------
FOLDED = ["qwen3_model", "llama_model", "gqa_qwen3", "qwen2_model", "llama_bias"]


@pytest.mark.parametrize("name", FOLDED)
def test_fold_preserves_logits_float32(name, request, tmp_path):
    src = request.getfixturevalue(name)
    s = all_transforms(layout(src))
    apply_surgery(src, tmp_path / "out", s, {})
    assert rel(logits(tmp_path / "out"), logits(src)) < 1e-5


@pytest.mark.parametrize("name", FOLDED)
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


@pytest.mark.parametrize("name", ["gqa_qwen3", "llama_model", "qwen2_model", "llama_bias"])
def test_slicing_is_the_projected_original(name, request, tmp_path):
    """A semi-orthogonal Q (d x K): the sliced model equals the original with its residual stream
    projected onto Q's columns, the RMSNorm over K channels corrected (eps d/K, sqrt(d/K) folded; on
    Qwen3 q_norm / k_norm, which share that eps, see inputs scaled to match)."""
    import torch

    src = request.getfixturevalue(name)
    lay = layout(src)
    k = lay.hidden * 3 // 4  # a multiple of every fixture's head count
    q = rotation(lay.hidden, 5)[:, :k]
    apply_surgery(src, tmp_path / "out", Surgery(residual=q), {})
    orig = load(src)
    project_residual(orig, torch.from_numpy(q))
    with torch.no_grad():
        want = orig(torch.tensor(IDS)).logits.double().numpy()
    assert rel(logits(tmp_path / "out"), want) < 1e-5


def test_biases_follow_the_maths(llama_bias, tmp_path):
    """Llama with attention_bias + mlp_bias: a bias on a linear that writes the residual (o_proj,
    down_proj) rotates with it, b' = b Q (never re-indexed by heads / neurons); one on a linear that
    reads it (q/k/v, gate/up) moves with its rows (head / group / neuron order) and is otherwise unchanged.
    The logits tests above hold these models too; this pins each bias to its formula (float64, 1e-12)."""
    src = as_float64(llama_bias, tmp_path)
    lay = layout(src)
    s = all_transforms(lay, seed=7)
    s.heads = {i: np.array([3, 2, 1, 0]) for i in range(lay.layers)}  # both groups swapped, and heads within them
    apply_surgery(src, tmp_path / "out", s, {})
    a, b = _weights(src), _weights(tmp_path / "out")
    q, hd = s.residual, lay.head_dim
    rows = lambda idx, per: (np.asarray(idx)[:, None] * per + np.arange(per)).ravel()  # noqa: E731
    for i in range(lay.layers):
        p = f"model.layers.{i}."
        groups = s.heads[i][::lay.group] // lay.group  # the key/value groups, in their new order
        bias = lambda name: a[p + name + ".bias"]  # noqa: E731
        want = {"self_attn.o_proj": bias("self_attn.o_proj") @ q, "mlp.down_proj": bias("mlp.down_proj") @ q,
                "self_attn.q_proj": bias("self_attn.q_proj")[rows(s.heads[i], hd)],
                "self_attn.k_proj": bias("self_attn.k_proj")[rows(groups, hd)],
                "self_attn.v_proj": bias("self_attn.v_proj")[rows(groups, hd)],
                "mlp.gate_proj": bias("mlp.gate_proj")[s.neurons[i]], "mlp.up_proj": bias("mlp.up_proj")[s.neurons[i]]}
        for name, w in want.items():
            assert np.abs(b[p + name + ".bias"] - w).max() < 1e-12, name
            assert rel(w, bias(name)) > 0.1, name  # the formula moves it: not vacuous


# -- tied embeddings whose files also hold lm_head.weight ---------------------------------------------
@pytest.fixture(params=["one file", "lm_head in its own shard"])
def tied_with_head(request, qwen3_model, tmp_path):
    """The tied 3-block Qwen3 (tie_word_embeddings=True) re-saved with an explicit lm_head.weight equal
    to the embedding, as some exporters write it; once in model.safetensors, once sharded with the head
    in another shard than the embedding (an index)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "tied"
    shutil.copytree(qwen3_model, src)
    sd = load_file(src / "model.safetensors")
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] and "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    if request.param == "one file":
        save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    else:
        (src / "model.safetensors").unlink()
        second = {"lm_head.weight", "model.norm.weight"} | {k for k in sd if k.startswith("model.layers.2.")}
        shards = {"model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if k not in second},
                  "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if k in second}}
        for f, part in shards.items():
            save_file(part, src / f, metadata={"format": "pt"})
        (src / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}))
    return src


def _tensor_files(folder) -> dict[str, list[str]]:
    from safetensors import safe_open

    where: dict[str, list[str]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                where.setdefault(k, []).append(f.name)
    return where


def test_tied_checkpoint_that_also_stores_lm_head(tied_with_head, tmp_path):
    """The rotation unties the head (config tie_word_embeddings -> false) and writes lm_head.weight once
    (never in two shards): the folded checkpoint loads with transformers and its logits equal the
    original's (1e-5 relative, float32); permutations alone keep the tie and both tensors."""
    src = tied_with_head
    orig = load(src)
    assert orig.lm_head.weight is orig.model.embed_tokens.weight  # transformers ties the equal copies
    lay = layout(src)
    assert lay.tied
    want = logits(src)

    apply_surgery(src, tmp_path / "rot", all_transforms(lay, seed=8), {})
    cfg = json.loads((tmp_path / "rot" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    where = _tensor_files(tmp_path / "rot")
    assert all(len(v) == 1 for v in where.values()), {k: v for k, v in where.items() if len(v) > 1}
    assert where.keys() == _tensor_files(src).keys()
    if (tmp_path / "rot" / "model.safetensors.index.json").exists():
        index = json.loads((tmp_path / "rot" / "model.safetensors.index.json").read_text())["weight_map"]
        assert index == {k: v[0] for k, v in where.items()}
    folded = load(tmp_path / "rot")
    assert folded.lm_head.weight is not folded.model.embed_tokens.weight
    assert rel(logits(tmp_path / "rot"), want) < 1e-5

    s = all_transforms(lay, seed=8)
    apply_surgery(src, tmp_path / "perm", Surgery(neurons=s.neurons, heads=s.heads), {})
    assert json.loads((tmp_path / "perm" / "config.json").read_text())["tie_word_embeddings"] is True
    assert all(len(v) == 1 for v in _tensor_files(tmp_path / "perm").values())
    permuted = load(tmp_path / "perm")
    assert permuted.lm_head.weight is permuted.model.embed_tokens.weight
    assert rel(logits(tmp_path / "perm"), want) < 1e-5


# -- Surgery.check: every key/value group kept, only some query heads of each (prune width --head-unit query)
def masked_logits(folder, heads: dict, head_dim: int, basis=None):
    """The ORIGINAL model with every dropped query head's output zeroed (a pre-hook on o_proj), its
    residual stream projected onto `basis`'s columns when given: what a head-pruned (sliced) model computes."""
    import torch

    model = load(folder)
    for i, block in enumerate(model.model.layers):
        def zero(mod, args, keep=np.asarray(heads[i])):
            x = args[0].clone().unflatten(-1, (-1, head_dim))
            drop = np.setdiff1d(np.arange(x.shape[-2]), keep)
            x[..., torch.from_numpy(drop), :] = 0
            return (x.flatten(-2),)
        block.self_attn.o_proj.register_forward_pre_hook(zero)
    if basis is not None:
        project_residual(model, torch.from_numpy(basis))
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.double().numpy()


#: Qwen2 fixture: 6 query heads, key/value groups {0,1,2} and {3,4,5}. Block 0 keeps 2 heads of each group
#: in place; block 1 keeps 2 of each AND swaps the groups (its key/value heads must move with them).
SOME_HEADS = {0: np.array([0, 2, 4, 5]), 1: np.array([5, 3, 1, 0])}


def test_some_heads_of_every_group_are_kept(qwen2_model, tmp_path):
    """Documented (Surgery: 'a subset when pruning'; prune width --head-unit query): the same number of
    query heads kept in every group, every block. check() accepts it: num_attention_heads 4, the 2 key/value
    heads stay, head_dim is written explicitly (6 -> 4 heads would change the default hidden / heads);
    block 1's whole-group move becomes groups[1] = [1, 0]. The pruned checkpoint, with a rotation and
    neuron permutations on top, computes the original with the dropped heads zeroed (1e-5, float32)."""
    lay = layout(qwen2_model)
    assert (lay.heads, lay.kv_heads, lay.group, lay.head_dim) == (6, 2, 3, 8)
    perms = all_transforms(lay, seed=9)
    s = Surgery(residual=perms.residual, neurons=perms.neurons, heads={i: h.copy() for i, h in SOME_HEADS.items()})
    upd = s.check(lay)
    assert upd == {"hidden_size": 48, "intermediate_size": 80, "num_attention_heads": 4, "head_dim": 8}
    assert s.groups.keys() == {1} and s.groups[1].tolist() == [1, 0]

    s = Surgery(residual=perms.residual, neurons=perms.neurons, heads={i: h.copy() for i, h in SOME_HEADS.items()})
    apply_surgery(qwen2_model, tmp_path / "out", s, {})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 8)
    pruned = load(tmp_path / "out")
    assert pruned.model.layers[1].self_attn.k_proj.weight.shape == (16, 48)
    want = masked_logits(qwen2_model, SOME_HEADS, 8)
    assert rel(logits(tmp_path / "out"), want) < 1e-5
    assert rel(want, logits(qwen2_model)) > 1e-2  # the dropped heads mattered: the reference is not the original


REFUSED_HEADS = {
    "a group loses a head more": ({0: [0, 1, 2, 3], 1: [0, 1, 3, 4]},
                                  r"new heads 2\.\.3 come from key/value groups \[0, 1\]"),
    "uneven over the groups": ({0: [0, 1, 3, 4, 5], 1: [0, 1, 2, 3, 4]}, "5 query heads cannot be split evenly over 2"),
    "a group left out": ({0: [0, 1], 1: [0, 3]}, "each key/value group must be used exactly once"),
    "one block pruned": ({0: [0, 2, 4, 5]}, r"query heads: every block must keep the same number .*\[4\] over 1 of 2"),
    "blocks differ": ({0: [0, 2, 4, 5], 1: [0, 3]}, r"query heads: every block must keep the same number .*\[2, 4\]"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_HEADS))
def test_some_heads_refused(case, qwen2_model, tmp_path):
    """What the check refuses instead of writing a non-standard or wrong checkpoint, with its reason."""
    heads, message = REFUSED_HEADS[case]
    s = Surgery(heads={i: np.asarray(h) for i, h in heads.items()})
    with pytest.raises(UserError, match=message):
        s.check(layout(qwen2_model))
    with pytest.raises(UserError, match=message):
        apply_surgery(qwen2_model, tmp_path / "out", Surgery(heads={i: np.asarray(h) for i, h in heads.items()}), {})
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def llama_42(tmp_path_factory):
    """A 2-block Llama of hidden size 42 with 6 heads of head_dim 8 over 2 key/value heads: keeping 2 heads
    per group leaves 4, and LlamaConfig refuses a hidden size that is not a multiple of the heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(10)
    cfg = LlamaConfig(vocab_size=320, hidden_size=42, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("llama42") / "m"
    randomized(LlamaForCausalLM(cfg)).save_pretrained(out)
    return out


def test_pruned_heads_must_divide_the_width(llama_42, tmp_path):
    """The divisibility transformers checks is against the heads the checkpoint ENDS with: 42 over 4 kept
    heads is refused (a checkpoint transformers cannot load is never written), so is a slice to 30 (a
    multiple of the 6 original heads, not of the 4 kept); a slice to 40 with 4 heads is accepted and
    computes the projected original with the dropped heads zeroed (1e-5)."""
    lay = layout(llama_42)
    heads = {i: np.array([0, 1, 3, 4]) for i in range(lay.layers)}
    for q, message in ((None, r"hidden size \(42\) is not a multiple of the number of attention heads \(4\)"),
                       (rotation(42)[:, :30], "residual width 30: .* not a multiple of the 4 attention heads kept")):
        with pytest.raises(UserError, match=message):
            apply_surgery(llama_42, tmp_path / "out", Surgery(residual=q, heads=dict(heads)), {})
        assert not (tmp_path / "out").exists()
    q = rotation(42, 11)[:, :40]
    apply_surgery(llama_42, tmp_path / "out", Surgery(residual=q, heads=dict(heads)), {})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (40, 4, 2)
    assert rel(logits(tmp_path / "out"), masked_logits(llama_42, heads, 8, basis=q)) < 1e-5


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
