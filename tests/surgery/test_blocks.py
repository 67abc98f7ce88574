"""Depth-pruning surgery against an independent reference: the ORIGINAL model run with the same blocks
skipped by hooks (`skipping`), on the tiny Qwen3 (tied embeddings) and Llama (chat template) fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tourray.errors import UserError  # noqa: E402
from tourray.surgery.blocks import (  # noqa: E402
    PROVENANCE, check_out, fold_embedding_patch, fold_mlp_patch, remove_blocks, skipping, write_checkpoint)

#: Pruned checkpoint vs the original with blocks skipped: the same float32 ops in the same order, so
#: they agree far below this; a wrong block, mask or position would be off by O(1).
LOGITS_RTOL = 1e-5
TEXTS = ["The Sydney Opera House opened in 1973.", "Xi'an's Bell Tower was built in 1384 under the Ming."]


def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def padded_batch(path):
    """Two sequences of different lengths, left-padded (as for generation), with their attention mask."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    b = tok(TEXTS, return_tensors="pt", padding=True)
    assert (b["attention_mask"] == 0).any(), "the batch must contain padding"
    return tok, b


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def logits(model, batch):
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]  # real positions only (fully masked pad rows are arbitrary)


def generate(model, batch, tok, use_cache=True):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=use_cache,
                              pad_token_id=tok.pad_token_id)


def blocks_of(model):
    return model.model.layers


@pytest.mark.parametrize("fixture,removed", [("qwen3_model", [1]), ("qwen3_model", [0]), ("llama_model", [1]),
                                             ("llama_model", [0])])
def test_pruned_checkpoint_matches_skipping_reference(request, tmp_path, fixture, removed):
    src = request.getfixturevalue(fixture)
    tok, batch = padded_batch(src)
    orig = load(src)
    full = logits(orig, batch)
    with skipping(orig, removed):
        ref = logits(orig, batch)
        ref_gen = generate(orig, batch, tok)
    assert rel(logits(orig, batch), full) == 0, "skipping must restore the model on exit"
    assert rel(ref, full) > 1e-3, "skipping must change the output (else the comparison proves nothing)"

    model = load(src)
    n = len(blocks_of(model))
    remove_blocks(model, removed)
    for new, block in enumerate(blocks_of(model)):
        idx = {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")}
        assert idx == {new}, f"block {new} keeps layer_idx {idx}"
    # In memory too (a reload rebuilds the blocks with fresh indices; the model in hand has only the renumbering).
    assert rel(logits(model, batch), ref) <= LOGITS_RTOL
    assert torch.equal(generate(model, batch, tok), ref_gen)
    prov = {"source": str(src), "removed": removed}
    out = write_checkpoint(model, src, tmp_path / "pruned", prov)

    pruned = load(out)
    cfg = pruned.config
    assert cfg.num_hidden_layers == n - len(removed) == len(blocks_of(pruned))
    if getattr(cfg, "layer_types", None) is not None:
        assert len(cfg.layer_types) == n - len(removed)
    assert rel(logits(pruned, batch), ref) <= LOGITS_RTOL

    # Greedy decoding with the KV cache: a stale layer_idx writes past the cache or into another block's slot.
    gen = generate(pruned, batch, tok)
    assert torch.equal(gen, ref_gen)
    assert torch.equal(gen, generate(pruned, batch, tok, use_cache=False))

    assert json.loads((out / PROVENANCE).read_text()) == prov
    assert (out / "model.safetensors").is_file()
    from transformers import AutoTokenizer

    t2 = AutoTokenizer.from_pretrained(out)
    assert t2(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    assert t2.chat_template == AutoTokenizer.from_pretrained(src).chat_template
    if fixture == "llama_model":
        assert t2.chat_template and "messages" in t2.chat_template
    if (src / "generation_config.json").is_file():
        assert (out / "generation_config.json").read_text() == (src / "generation_config.json").read_text()


def test_skipping_keeps_the_cache_whole(qwen3_model):
    # Decoding step by step with the cache and no explicit positions: the model reads the cache length from
    # block 0's slot, which must still be filled when block 0 is the one skipped.
    model = load(qwen3_model)
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    with skipping(model, [0]), torch.no_grad():
        full = model(ids).logits[0, -1]
        first = model(ids[:, :-1], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        step = model(ids[:, -1:], cache=cache).logits[0, -1]
    assert rel(step, full) <= LOGITS_RTOL


class _TupleBlock(torch.nn.Module):
    """A block in the older transformers style: returns (hidden_states, attention weights)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, attention_mask=None):
        return (hidden_states + self.lin(hidden_states), "attn")


class _TupleModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": 3})()
        self.layers = torch.nn.ModuleList(_TupleBlock() for _ in range(3))

    def forward(self, x):
        outs = []
        for i, block in enumerate(self.layers):
            out = block(x) if i % 2 else block(hidden_states=x)  # positional and keyword calls
            x = out[0]
            outs.append(out[1])
        return x, outs


def test_skipping_handles_tuple_outputs():
    torch.manual_seed(5)
    model, x = _TupleModel(), torch.randn(2, 4)
    with torch.no_grad():
        with skipping(model, [0, 1]):
            y, extra = model(x)
        want = model.layers[2](x)[0]
    assert torch.equal(y, want) and extra == ["attn"] * 3


@pytest.fixture
def sliding_qwen3(qwen3_model, tmp_path):
    """A 3-block Qwen3 whose blocks 1 and 2 use a 3-token sliding window (max_window_layers=1)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(qwen3_model)
    torch.manual_seed(2)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, use_sliding_window=True,
                      sliding_window=3, max_window_layers=1, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    path = tmp_path / "sliding"
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("removed,types,window_layers", [
    ([0], ["sliding_attention", "sliding_attention"], 0),
    ([1], ["full_attention", "sliding_attention"], 1),
])
def test_sliding_window_layers_follow_their_blocks(sliding_qwen3, tmp_path, removed, types, window_layers):
    tok, batch = padded_batch(sliding_qwen3)
    assert batch["input_ids"].shape[1] > 3, "sequences must be longer than the window"
    orig = load(sliding_qwen3)
    with skipping(orig, removed):
        ref = logits(orig, batch)
    model = load(sliding_qwen3)
    remove_blocks(model, removed)
    pruned = load(write_checkpoint(model, sliding_qwen3, tmp_path / "pruned", {}))
    assert pruned.config.layer_types == types
    assert pruned.config.max_window_layers == window_layers
    assert [b.self_attn.sliding_window for b in blocks_of(pruned)] == [3 if t == "sliding_attention" else None
                                                                        for t in types]
    assert rel(logits(pruned, batch), ref) <= LOGITS_RTOL


def tiny_moe(**kw):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(3)
    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, num_experts=2, num_experts_per_tok=1, **kw)
    return Qwen2MoeForCausalLM(cfg).eval()


@pytest.mark.parametrize("removed,mlp_only", [([0], []), ([1], [0])])
def test_layer_index_lists_are_remapped(tmp_path, removed, mlp_only):
    model = tiny_moe(mlp_only_layers=[0])
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with skipping(model, removed), torch.no_grad():
        ref = model(ids).logits
    remove_blocks(model, removed)
    assert model.config.mlp_only_layers == mlp_only
    model.save_pretrained(tmp_path / "moe")
    reloaded = load(tmp_path / "moe")
    with torch.no_grad():
        assert rel(reloaded(ids).logits, ref) <= LOGITS_RTOL


def test_unknown_layer_count_dependency_is_refused():
    # Qwen2-MoE makes block i sparse when (i + 1) % decoder_sparse_step == 0: with step 2 only block 1 is;
    # after removing block 0 it would become block 0, which the unchanged step makes dense on reload.
    model = tiny_moe(decoder_sparse_step=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="another structure"):
        remove_blocks(model, [0])
    assert model.config.num_hidden_layers == 3 and len(blocks_of(model)) == 3
    assert len(model.config.layer_types) == 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _capture(module, store, key):
    def hook(mod, args, output):
        store[key] = (output if isinstance(output, torch.Tensor) else output[0]).detach().clone()

    return module.register_forward_hook(hook)


def _mlp_and_block(model, b, ids):
    store = {}
    block = blocks_of(model)[b]
    hs = [_capture(block.mlp, store, "m"), _capture(block, store, "y")]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    return store["m"], store["y"]


def random_patch(d, seed=0):
    rng = np.random.default_rng(seed)
    return np.eye(d) + 0.1 * rng.standard_normal((d, d))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fold_mlp_patch_maps_the_mlp_output(qwen3_model, dtype, tol):
    model = load(qwen3_model, dtype)
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    m0, y0 = _mlp_and_block(model, 1, ids)
    T = random_patch(m0.shape[-1])
    fold_mlp_patch(model, 1, T)
    assert blocks_of(model)[1].mlp.down_proj.weight.dtype == dtype
    m1, y1 = _mlp_and_block(model, 1, ids)
    t = torch.from_numpy(T)
    m0, y0 = m0.double(), y0.double()
    assert rel(m1, m0 @ t) <= tol
    # The block output is (input + attention) + m: only the MLP term changes.
    assert rel(y1, y0 - m0 + m0 @ t) <= tol


def test_fold_mlp_patch_maps_the_bias():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, mlp_bias=True)
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        blocks_of(model)[0].mlp.down_proj.bias.normal_()
    ids = torch.tensor([[1, 5, 9, 3]])
    m0, _ = _mlp_and_block(model, 0, ids)
    T = random_patch(32, seed=1)
    fold_mlp_patch(model, 0, T)
    m1, _ = _mlp_and_block(model, 0, ids)
    assert rel(m1, m0 @ torch.from_numpy(T)) <= 1e-10


def test_fold_embedding_patch_unties_the_head(qwen3_model, tmp_path):
    model = load(qwen3_model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight.data_ptr() == emb.weight.data_ptr(), "the fixture must have tied embeddings"
    E, H = emb.weight.detach().clone(), head.weight.detach().clone()
    T = random_patch(E.shape[1], seed=2)
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])

    fold_embedding_patch(model, T)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        e = emb(ids)
    assert rel(e, E[ids].double() @ torch.from_numpy(T)) <= 1e-5
    assert torch.equal(head.weight, H), "the LM head must keep the original weight"
    assert head.weight.data_ptr() != emb.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        folded_logits = model(ids).logits

    out = write_checkpoint(model, qwen3_model, tmp_path / "patched", {"patch": "embedding"})
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    back = load(out)
    assert torch.equal(back.get_output_embeddings().weight, H)
    assert torch.equal(back.get_input_embeddings().weight, emb.weight)
    assert back.config.tie_word_embeddings is False
    with torch.no_grad():
        assert rel(back(ids).logits, folded_logits) <= 1e-6


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("removed,msg", [
    ([0, 1, 2], "cannot remove every block"),
    ([3], r"block 3 is out of range: the model has 3 blocks, 0\.\.2"),
    ([-1], r"block -1 is out of range"),
    ([1, 1], "block 1 is listed more than once"),
    ([], "no blocks to remove"),
])
def test_remove_blocks_refusals_leave_the_model(qwen3_model, removed, msg):
    model = load(qwen3_model)
    with pytest.raises(UserError, match=msg):
        remove_blocks(model, removed)
    assert len(blocks_of(model)) == model.config.num_hidden_layers == len(model.config.layer_types) == 3
    with pytest.raises(UserError, match=msg):
        with skipping(model, removed):
            pass


def test_fold_mlp_patch_refusals(qwen3_model):
    model = load(qwen3_model)
    w = blocks_of(model)[0].mlp.down_proj.weight.detach().clone()
    with pytest.raises(UserError, match="128 x 128"):
        fold_mlp_patch(model, 0, np.eye(64))
    with pytest.raises(UserError, match="block 3 is out of range"):
        fold_mlp_patch(model, 3, np.eye(128))
    with pytest.raises(UserError, match="inf or nan"):
        fold_mlp_patch(model, 0, np.full((128, 128), np.nan))
    assert torch.equal(blocks_of(model)[0].mlp.down_proj.weight, w)
    blocks_of(model)[1].post_feedforward_layernorm = torch.nn.Identity()  # as in Gemma2/3, Olmo2
    with pytest.raises(UserError, match="normalises its MLP output"):
        fold_mlp_patch(model, 1, np.eye(128))
    blocks_of(model)[2].mlp = torch.nn.Identity()
    with pytest.raises(UserError, match="block 2 .* has no MLP output projection"):
        fold_mlp_patch(model, 2, np.eye(128))
    with pytest.raises(UserError, match="no MLP output projection"):
        fold_mlp_patch(tiny_moe(), 0, np.eye(32))


def test_write_checkpoint_refuses_a_non_empty_out(qwen3_model, tmp_path):
    model = load(qwen3_model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out: .*out is not empty"):
        write_checkpoint(model, qwen3_model, out, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match="--out: .*not empty"):
        check_out(out)
    with pytest.raises(UserError, match="--out: .*not a folder"):
        check_out(out / "keep.txt")
    (out / "keep.txt").unlink()  # an existing empty folder is fine
    assert (write_checkpoint(model, qwen3_model, out, {}) / "config.json").is_file()


def test_write_checkpoint_leaves_nothing_on_failure(qwen3_model, tmp_path, monkeypatch):
    model = load(qwen3_model)
    no_tokenizer = tmp_path / "src"
    no_tokenizer.mkdir()
    parent = tmp_path / "outs"
    with pytest.raises(UserError, match="cannot load its tokenizer"):
        write_checkpoint(model, no_tokenizer, parent / "pruned", {})
    assert not parent.exists() or not any(parent.iterdir())

    real = model.save_pretrained

    def save_then_fail(path, **kw):
        real(path, **kw)
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(model, qwen3_model, parent / "pruned", {})
    assert not any(parent.iterdir()), "a failed write must leave no folder behind"
