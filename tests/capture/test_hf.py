"""HFEngine on every supported architecture: resid_mid where each family has it, resid_post and the
chunked LM-head statistics against transformers' own forward, hooks that never alias model memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tourray.capture.config import HFEngineConfig
from tourray.capture.engine import HeadScratch, kl_divergence, logit_support, surprisal_entropy, token_stats
from tourray.capture.hf import HFEngine, check_sites, lm_head_logits
from tourray.config import Site
from tourray.errors import UserError

V, L = 97, 2
TOL = 1e-5  # float32 throughout


def _prenorm(b, m):
    return b.mlp(b.post_attention_layernorm(m))


def _sandwich(b, m):
    return b.post_feedforward_layernorm(b.mlp(b.pre_feedforward_layernorm(m)))


def _postnorm(b, m):
    return b.post_feedforward_layernorm(b.mlp(m))


def _cfg(name):
    import transformers as T

    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4,
                  max_position_embeddings=128)
    gqa = dict(num_key_value_heads=2, head_dim=16)
    return {
        "llama": lambda: T.LlamaConfig(**common, **gqa),
        "qwen2": lambda: T.Qwen2Config(**common, **gqa),
        "qwen3": lambda: T.Qwen3Config(**common, **gqa),
        "mistral": lambda: T.MistralConfig(**common, **gqa),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**common, **gqa, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32),
        "mixtral": lambda: T.MixtralConfig(**common, **gqa, num_local_experts=4, num_experts_per_tok=2),
        # a soft-cap of 1 so that the cap changes the logits of a random model
        "gemma2": lambda: T.Gemma2Config(**common, **gqa, final_logit_softcapping=1.0, query_pre_attn_scalar=16),
        "gemma3_text": lambda: T.Gemma3TextConfig(**common, **gqa, final_logit_softcapping=1.0,
                                                  query_pre_attn_scalar=16),
        "olmo2": lambda: T.Olmo2Config(**common, num_key_value_heads=2),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "phi": lambda: T.PhiConfig(**common, num_key_value_heads=2),
    }[name]()


BRANCH = {"llama": _prenorm, "qwen2": _prenorm, "qwen3": _prenorm, "mistral": _prenorm, "qwen3_moe": _prenorm,
          "mixtral": _prenorm, "gemma2": _sandwich, "gemma3_text": _sandwich, "olmo2": _postnorm}
FAMILIES = list(BRANCH) + ["gpt_neox", "phi"]


def _build(name, tmp_path, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_cfg(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and p.dim() == 1:
                p.uniform_(0.5, 1.5)  # non-trivial norms, so a wrong hook point shows
    out = tmp_path / f"{name}-{seed}"
    model.save_pretrained(out)
    return out, model


def _batch(seed=1, lengths=(9, 5, 1, 12)):
    g = np.random.default_rng(seed)
    return [g.integers(0, V, n).astype(np.int64) for n in lengths]


def _final_norm(base):
    for n in ("norm", "final_layer_norm", "final_layernorm"):
        if hasattr(base, n):
            return getattr(base, n)
    raise AssertionError(type(base))


def _close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", FAMILIES)
def test_sites_and_stats_match_transformers(name, tmp_path):
    """resid_post = output_hidden_states (the last through the final norm), resid_mid completes the
    block with the family's MLP branch, surprisal/entropy = full-logits path, chunk 7 = chunk 512."""
    path, model = _build(name, tmp_path)
    mid = name in BRANCH
    sites = [Site.resid_post] + ([Site.resid_mid] if mid else [])
    layers = [-1, 0, 1]
    eng = HFEngine(str(path), None, "float32", "float32", layers, sites, L, hf=HFEngineConfig(lm_head_positions=512))
    eng7 = HFEngine(str(path), None, "float32", "float32", layers, sites, L, hf=HFEngineConfig(lm_head_positions=7))
    batch = _batch()
    got, got7 = eng.capture(batch), eng7.capture(batch)
    base, blocks = model.get_decoder(), eng.model.get_decoder()
    for x, c, c7 in zip(batch, got, got7):
        ids = torch.from_numpy(x)[None]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hs = [h[0].numpy() for h in out.hidden_states]
        _close(c.vectors[(-1, "resid_post")], hs[0])
        _close(c.vectors[(0, "resid_post")], hs[1])
        with torch.no_grad():
            last = _final_norm(base)(torch.from_numpy(c.vectors[(L - 1, "resid_post")])[None])[0].numpy()
        _close(last, hs[L])
        if mid:
            layers_mod = [m for m in eng.model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == L][0]
            for layer in range(L):
                m = c.vectors[(layer, "resid_mid")]
                with torch.no_grad():
                    post = m + BRANCH[name](layers_mod[layer], torch.from_numpy(m)[None])[0].numpy()
                _close(post, c.vectors[(layer, "resid_post")])
                assert np.abs(m - c.vectors[(layer, "resid_post")]).max() > 1e-3  # a real mid-point
        s, e = surprisal_entropy(out.logits[0], ids[0])
        for cc in (c, c7):
            _close(cc.surprisal, s)
            _close(cc.entropy, e)
            assert np.isnan(cc.surprisal[0]) and np.isnan(cc.entropy[0])
        for k in c.vectors:
            np.testing.assert_array_equal(c.vectors[k], c7.vectors[k])
    assert blocks is not None


@pytest.mark.parametrize("name", ["gpt_neox", "phi"])
def test_parallel_residual_refuses_resid_mid(name, tmp_path):
    path, _ = _build(name, tmp_path)
    with pytest.raises(UserError, match="parallel-residual"):
        HFEngine(str(path), None, "float32", "float32", [0], [Site.resid_mid], L)


def test_check_sites():
    check_sites("qwen3", [Site.resid_post, Site.resid_mid])
    check_sites("gpt_neox", [Site.resid_post])
    check_sites("never_heard_of", ["resid_post"])
    with pytest.raises(UserError, match="parallel-residual"):
        check_sites("phi", ["resid_mid"])
    with pytest.raises(UserError, match="not known"):
        check_sites("never_heard_of", [Site.resid_mid])


def test_softcap_is_applied(tmp_path):
    """Gemma 2's logits pass through cap*tanh(x/cap): with cap 1 every logit lies in (-1, 1), so the
    entropy of a 97-way distribution is near log 97 — and equals the full path (tested above)."""
    path, _ = _build("gemma2", tmp_path)
    eng = HFEngine(str(path), None, "float32", "float32", [0], [Site.resid_post], L)
    h = torch.randn(5, 64) * 100
    assert eng.head(h).abs().max() <= 1.0


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "granite", "cohere"])
def test_the_lm_head_writes_the_same_bits_into_a_buffer(family):
    """The head into `HeadScratch`'s buffer, scaled in place (Cohere's logit_scale, Granite's
    logits_scaling, Gemma's soft cap), equals the head's new tensor bit for bit, and is that buffer."""
    import transformers as T
    from transformers import AutoModelForCausalLM

    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    cfg = {"qwen3": lambda: _cfg("qwen3"), "gemma2": lambda: _cfg("gemma2"),
           "granite": lambda: T.GraniteConfig(**common, logits_scaling=4.0, eos_token_id=0, bos_token_id=0, pad_token_id=0),
           "cohere": lambda: T.CohereConfig(**common, logit_scale=0.5)}[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    head = lm_head_logits(model)
    h, buf = torch.randn(11, 64) * 3, torch.full((11, V), float("nan"))
    with torch.inference_mode():
        want, got = head(h), head(h, out=buf)
        raw = model.get_output_embeddings()(h)
    assert got is buf and torch.equal(got, want)
    assert torch.equal(want, raw) == (family == "qwen3")  # the family's scaling is really applied


def test_token_stats_into_scratch_are_the_same_bits():
    """Surprisal, entropy, KL and the --logits support from scratch buffers (the last chunk shorter
    than the first, and -inf logits) equal those from new tensors exactly."""
    g = torch.Generator().manual_seed(0)
    scratch = HeadScratch()
    for m in (9, 4):
        logits = torch.randn(m, V, generator=g) * 4
        logits[0, :10] = float("-inf")
        ref, ids = torch.randn(m, V, generator=g), torch.randint(0, V, (m,), generator=g)
        for support in (None, lambda lp: logit_support(lp, ("top", 5))):
            want = token_stats(logits, ids, ref, support)
            lg, lp, tmp = scratch(m, V, "cpu")
            lg.copy_(logits)
            got = token_stats(lg, ids, ref, support, scratch=(lp, tmp))
            for a, b in zip(want[:3], got[:3]):
                assert torch.equal(a, b)
            if support is not None:
                assert all(torch.equal(a, b) for a, b in zip(want[3][:3], got[3][:3]))
    assert scratch._buf.shape == (3, 9, V)  # the first chunk's buffers serve the shorter one


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_head_scratch_is_reused_across_batches_and_carries_nothing_over(tmp_path, dtype):
    """One allocation serves every chunk of every batch (on CPU each fresh chunk was mapped and
    faulted in anew), and a batch after a longer one gets what a fresh engine gets, bit for bit. A
    bf16 head makes its own logits: no buffer is kept for them."""
    path, _ = _build("qwen3", tmp_path)
    kw = dict(hf=HFEngineConfig(lm_head_positions=7), logits=("top", 4))
    eng = HFEngine(str(path), None, dtype, "float32", [0], [Site.resid_post], L, **kw)
    eng.capture(_batch(lengths=(12, 12, 9)))
    buf = eng.scratch._buf.data_ptr()
    assert eng.scratch._buf.shape == ((3 if dtype == "float32" else 2), 7, V)
    small = _batch(seed=2, lengths=(5, 3))
    got = eng.capture(small)
    assert eng.scratch._buf.data_ptr() == buf
    fresh = HFEngine(str(path), None, dtype, "float32", [0], [Site.resid_post], L, **kw).capture(small)
    for a, b in zip(got, fresh):
        for x, y in ((a.surprisal, b.surprisal), (a.entropy, b.entropy), (a.logits.logprobs, b.logits.logprobs),
                     (a.logits.ids, b.logits.ids), (a.logits.rest, b.logits.rest)):
            np.testing.assert_array_equal(x, y)


def test_hooks_copy_not_alias(tmp_path):
    """An in-place op on a hooked tensor after the engine's hook must not change what was captured."""
    path, model = _build("llama", tmp_path)
    eng = HFEngine(str(path), None, "float32", "float32", [0, 1], [Site.resid_post, Site.resid_mid], L)
    blocks = [m for m in eng.model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == L][0]
    x = _batch(lengths=(8,))
    clean = eng.capture(x)[0].vectors
    h = blocks[0].register_forward_hook(lambda m, a, out: (out[0] if isinstance(out, tuple) else out).mul_(0))
    np.testing.assert_array_equal(eng.capture(x)[0].vectors[(0, "resid_post")], clean[(0, "resid_post")])
    h.remove()
    blocks[1].post_attention_layernorm.register_forward_pre_hook(lambda m, a: a[0].add_(1000.0))
    dirty = eng.capture(x)[0].vectors
    np.testing.assert_array_equal(dirty[(1, "resid_mid")], clean[(1, "resid_mid")])
    assert np.abs(dirty[(1, "resid_post")] - clean[(1, "resid_post")]).max() > 100  # the op did happen


def test_reference_kl_matches_full_logits(tmp_path):
    path, model = _build("qwen3", tmp_path, seed=0)
    ref_path, ref = _build("qwen3", tmp_path, seed=3)
    for chunk in (7, 512):
        eng = HFEngine(str(path), None, "float32", "float16", [0], [Site.resid_post], L, reference=str(ref_path),
                       hf=HFEngineConfig(lm_head_positions=chunk))
        batch = _batch()
        for x, c in zip(batch, eng.capture(batch)):
            ids = torch.from_numpy(x)[None]
            with torch.no_grad():
                kl = kl_divergence(ref(input_ids=ids).logits[0], model(input_ids=ids).logits[0])
            _close(c.kl_ref, kl)
            assert c.vectors[(0, "resid_post")].dtype == np.float16
            if len(x) > 2:
                assert np.nanmax(c.kl_ref) > 0


def test_bfloat16_store(tmp_path):
    path, _ = _build("qwen3", tmp_path)
    eng = HFEngine(str(path), None, "float32", "bfloat16", [0, 1], [Site.resid_post], L)
    batch = _batch(lengths=(6, 3))
    c = eng.capture(batch)
    v = c[0].vectors[(1, "resid_post")]
    assert v.dtype == np.uint16 and v.shape == (6, 64)
    f32 = (v.astype(np.uint32) << 16).view(np.float32)
    ref = HFEngine(str(path), None, "float32", "float32", [1], [Site.resid_post], L).capture(batch)[0]
    _close(f32, ref.vectors[(1, "resid_post")], tol=1e-2)


def test_masked_vocabulary_entropy_is_finite():
    """-inf logits (a masked vocabulary) give p = 0 terms: 0, not nan."""
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")], [1.0, float("-inf"), 2.0, 0.0]])
    s, e, kl = token_stats(logits, torch.tensor([0, 2]), ref_logits=logits.clone())
    assert torch.isfinite(e).all() and torch.isfinite(kl).all()
    assert abs(float(e[0]) - math.log(2)) < 1e-6 and abs(float(s[0]) - math.log(2)) < 1e-6
    assert float(kl.abs().max()) < 1e-6
    s, e = surprisal_entropy(torch.cat([logits, logits]), torch.tensor([0, 0, 2, 1]))
    assert np.isnan(e[0]) and np.isfinite(e[1:]).all()


def test_cuda_asked_without_cuda_is_refused(tmp_path, monkeypatch):
    path, _ = _build("qwen3", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA"):
        HFEngine(str(path), None, "float32", "float32", [0], [Site.resid_post], L, gpus=1)


def test_attn_implementation_is_passed(tmp_path):
    path, _ = _build("qwen3", tmp_path)
    eng = HFEngine(str(path), None, "float32", "float32", [0], [Site.resid_post], L,
                   hf=HFEngineConfig(attn_implementation="eager"))
    assert eng.model.config._attn_implementation == "eager"
