"""Capture against an independent transformers recomputation, in-process: on embedded Ray's actor pool,
or with the local executor (the same stage and commits, no actor process) where the pool proves nothing."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from conftest import lake_snapshot
from tourray.capture import COMMIT_ORDER, CaptureConfig, CaptureStage, run_capture
from tourray.model.identity import find_blocks
from tourray.errors import UserError
from tourray.lake.tables import Lake, arrow_to_numpy
from tourray.model.prompt import SEGMENTS, PromptFormat


def capture(model, samples, lake, run="r", executor="ray", **kw):
    cfg = CaptureConfig(model=str(model), samples=str(samples), lake=str(lake), run=run, group_size=2, batch_size=2, **kw)
    return run_capture(cfg, progress=False, executor=executor), cfg


def reference(model_dir, text, system_prompt="", **fmt):
    """Independent recomputation: one unpadded forward with output_hidden_states, plus the input
    of the final norm for the last block (HF's last hidden state is post-norm)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = PromptFormat(tok, system_prompt, **fmt).encode(text).input_ids
    pre_norm = {}
    model.model.norm.register_forward_pre_hook(lambda m, a: pre_norm.update(h=a[0]))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids)[None], output_hidden_states=True)
    hs = [h[0].numpy() for h in out.hidden_states[:-1]] + [pre_norm["h"][0].numpy()]
    lp = torch.log_softmax(out.logits[0].float(), -1)
    surprisal = -lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    entropy = -(lp.exp() * lp).sum(-1)[:-1].numpy()
    return ids, hs, surprisal, entropy  # hs[0] = embedding, hs[l+1] = block l output


def stored(lake, run, sample_id, layer, site="resid_post"):
    t = Lake(lake).dataset("activations").to_table(
        filter=f"run = '{run}' AND sample_id = '{sample_id}' AND layer = {layer} AND site = '{site}'")
    t = t.sort_by("pos")
    return arrow_to_numpy(t.column("h"), np.float32)


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_text_spans_match_segments(lake, run="r"):
    """samples.text_start/text_end are exactly the positions whose tokens.segment is 'text'."""
    lk = Lake(str(lake))
    tokens = lk.read("tokens", ["sample_id", "pos", "segment"], filter=f"run = '{run}'")
    samples = lk.read("samples", filter=f"run = '{run}'").to_pylist()
    assert samples
    for s in samples:
        t = tokens.filter(pc.field("sample_id") == s["sample_id"]).sort_by("pos")
        text = np.flatnonzero(np.array(t.column("segment").to_pylist()) == "text")
        assert len(text) > 0 and text.tolist() == list(range(s["text_start"], s["text_end"])), s["source"]


def assert_token_layers_equal_numpy(lake, run="r"):
    """token_layers equals numpy on the stored vectors (widened to float32): norm to 1e-5 relative,
    cos_prev to 1e-5 absolute, null exactly where layer l-1's resid_post was not stored; one row per
    stored vector, written in (sample, layer, site) runs in pos order."""
    lk = Lake(str(lake))
    tl = lk.read("token_layers", filter=f"run = '{run}'")
    assert tl.num_rows == lk.dataset("activations").count_rows(filter=f"run = '{run}'") > 0
    key = list(zip(*(tl.column(c).to_pylist() for c in ("sample_id", "layer", "site"))))
    pos = tl.column("pos").to_pylist()
    for i in range(1, len(key)):  # physical order: runs of one block, pos 0, 1, ... n-1
        assert pos[i] == (pos[i - 1] + 1 if key[i] == key[i - 1] else 0), i
    blocks = set(key)
    for sid, layer, site in sorted(blocks):
        t = tl.filter((pc.field("sample_id") == sid) & (pc.field("layer") == layer) & (pc.field("site") == site))
        h = stored(lake, run, sid, layer, site)
        assert t.column("pos").to_pylist() == list(range(len(h)))
        np.testing.assert_allclose(t.column("norm").to_numpy(), np.linalg.norm(h, axis=1), rtol=1e-5, atol=0)
        cos = t.column("cos_prev")
        if (sid, layer - 1, "resid_post") in blocks:
            p = stored(lake, run, sid, layer - 1)
            want = np.sum(h * p, axis=1) / (np.linalg.norm(h, axis=1) * np.linalg.norm(p, axis=1))
            assert cos.null_count == 0
            np.testing.assert_allclose(cos.to_numpy(), want, rtol=0, atol=1e-5)
        else:  # the embedding, or layer l-1 not stored
            assert cos.null_count == len(h), (layer, site)


def test_float32_store_equals_independent_recompute(qwen3_model, corpus_dir, tmp_path, ray_session):
    lake = tmp_path / "lake"
    summary, _ = capture(qwen3_model, corpus_dir, lake, store_dtype="float32")
    assert summary["captured"] == 6
    samples = Lake(lake).read("samples").to_pylist()
    tokens = Lake(lake).read("tokens")
    for s in samples:
        ids, hs, surprisal, entropy = reference(qwen3_model, s["text"])
        assert s["n_tokens"] == len(ids)
        for layer in range(-1, 3):
            got = stored(lake, "r", s["sample_id"], layer)
            assert got.shape == hs[layer + 1].shape
            assert rel_err(got, hs[layer + 1]) < 1e-5, (s["source"], layer)  # stated tolerance: 1e-5 relative
        t = tokens.filter(tokens.column("sample_id").to_numpy(zero_copy_only=False) == s["sample_id"]).sort_by("pos").to_pydict()
        assert t["token_id"] == list(ids)
        assert t["surprisal"][0] is None and t["entropy"][0] is None
        np.testing.assert_allclose(np.array(t["surprisal"][1:], np.float64), surprisal, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(t["entropy"][1:], np.float64), entropy, rtol=1e-4, atol=1e-4)
        # text tokens' character spans cover the text in order; for ASCII text they tile it exactly
        # (byte-level BPE can split a CJK character, so neighbouring spans may share a character)
        spans = [(a, b) for a, b, seg in zip(t["char_start"], t["char_end"], t["segment"]) if seg == "text"]
        covered = np.zeros(len(s["text"]), bool)
        for a, b in spans:
            covered[a:b] = True
        assert covered.all() and spans == sorted(spans)
        if s["text"].isascii():
            assert "".join(s["text"][a:b] for a, b in spans) == s["text"]
    assert_text_spans_match_segments(lake)
    assert_token_layers_equal_numpy(lake)


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_store_dtypes_round_trip_within_precision(qwen3_model, corpus_dir, tmp_path, ray_session, dtype, tol):
    lake = tmp_path / "lake"
    capture(qwen3_model, corpus_dir, lake, store_dtype=dtype, layers="embed,2")
    s = Lake(lake).read("samples").to_pylist()[0]
    _, hs, _, _ = reference(qwen3_model, s["text"])
    for layer in (-1, 2):
        got = stored(lake, "r", s["sample_id"], layer)
        want = hs[layer + 1]
        # relative to each value's magnitude: float16 has 11 significant bits, bfloat16 8
        assert np.all(np.abs(got - want) <= tol * np.abs(want) + 1e-6), (dtype, layer)
    assert Lake(lake).dataset("activations").schema.field("h").type.list_size == 128
    assert_token_layers_equal_numpy(lake)  # layer 2 without layer 1: cos_prev null


def test_resid_mid_and_llama_chat_template(llama_model, corpus_dir, tmp_path, ray_session):
    lake = tmp_path / "lake"
    sp = tmp_path / "sp.md"
    sp.write_text("You are a tour guide.")
    capture(llama_model, corpus_dir, lake, store_dtype="float32", sites="resid_post,resid_mid", system_prompt=str(sp))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(llama_model)
    s = Lake(lake).read("samples").to_pylist()[0]
    enc = PromptFormat(tok, "You are a tour guide.").encode(s["text"])
    mids = {}
    for i, blk in enumerate(model.model.layers):
        blk.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: mids.update({i: a[0][0].numpy()}))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(enc.input_ids)[None])
    for layer in (0, 1):
        assert rel_err(stored(lake, "r", s["sample_id"], layer, "resid_mid"), mids[layer]) < 1e-5
    segs = Lake(lake).read("tokens", filter=f"sample_id = '{s['sample_id']}'").column("segment").to_pylist()
    assert {"system", "template", "text"} <= set(segs)
    assert_text_spans_match_segments(lake)  # template tokens on both sides of the text
    assert_token_layers_equal_numpy(lake)  # resid_mid of layer l against resid_post of l-1


def test_rerun_is_idempotent_and_identity_is_guarded(qwen3_model, llama_model, fresh_corpus, tmp_path, ray_session):
    lake = tmp_path / "lake"
    capture(qwen3_model, fresh_corpus, lake, executor="local")
    before = lake_snapshot(lake)
    summary, _ = capture(qwen3_model, fresh_corpus, lake, executor="local")
    assert summary["captured"] == 0 and summary["already_done"] == 6
    assert {k: v[0] for k, v in lake_snapshot(lake).items()} == {k: v[0] for k, v in before.items()}
    before = lake_snapshot(lake)
    with pytest.raises(UserError, match="model"):
        capture(llama_model, fresh_corpus, lake, executor="local")
    (fresh_corpus / "train/xian__bell-tower.txt").write_text("Changed text about the Bell Tower.\n")
    with pytest.raises(UserError, match=r"texts changed: 1 \(train/xian__bell-tower.txt\)"):
        capture(qwen3_model, fresh_corpus, lake, executor="local")
    with pytest.raises(UserError, match="--layers"):
        capture(qwen3_model, fresh_corpus, lake, run="other", layers="0-7", executor="local")
    assert lake_snapshot(lake) == before


def test_text_span_is_the_text_segment_also_when_truncated(llama_model):
    """The span CaptureStage records equals the text-segment positions, for a whole prompt (template
    tokens after the text), a text cut short, and a text cut away (then text_start = text_end = n)."""
    from transformers import AutoTokenizer

    fmt = PromptFormat(AutoTokenizer.from_pretrained(llama_model), "You are a tour guide.")
    text = "The Sydney Opera House opened in 1973."
    start, end = CaptureStage._text_span(fmt.encode(text))
    n = len(fmt.encode(text).input_ids)
    assert 0 < start < end < n
    want = {None: (start, end), end: (start, end), (start + end) // 2: (start, (start + end) // 2),
            start: (start, start), start - 1: (start - 1, start - 1)}
    for max_length, span in want.items():
        enc = fmt.encode(text, max_length)
        assert CaptureStage._text_span(enc) == span, max_length
        assert list(range(*span)) == np.flatnonzero(enc.segment == SEGMENTS.index("text")).tolist()


def test_float16_overflow_names_sample_and_layer(qwen3_model, corpus_dir, tmp_path, ray_session):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    big = tmp_path / "big"
    model = AutoModelForCausalLM.from_pretrained(qwen3_model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(1e6)  # pushes block 1's output past float16's 65504
    model.save_pretrained(big)
    AutoTokenizer.from_pretrained(qwen3_model).save_pretrained(big)
    gc.collect()  # a pool an earlier test left for the collector would be freed inside this capture
    time.sleep(1)
    free = ray_session.available_resources().get("CPU")
    with pytest.raises(UserError, match=r"sample .* layer 1, site resid_post: values are not finite in float16") as err:
        capture(big, corpus_dir, tmp_path / "lake", layers="0-2")
    # the failed capture's actor pool is gone while the error is still held (it kept its CPU until the
    # cyclic garbage collector ran, and a statistics pass asking for every CPU then waited forever)
    deadline = time.time() + 10
    while ray_session.available_resources().get("CPU") < free and time.time() < deadline:
        time.sleep(0.1)
    assert ray_session.available_resources().get("CPU") >= free and err.value


def test_a_non_finite_vector_of_one_sample_is_refused_by_name(qwen3_model, corpus_dir, tmp_path, monkeypatch):
    """The stage's finiteness check (from the token_layers norms): an inf in one stored vector of the
    second sample of a batch of 2 names that sample, its layer and site, and commits none of the group."""
    from tourray.capture.hf import HFEngine

    lake_dir = tmp_path / "lake"
    capture(qwen3_model, corpus_dir, lake_dir, run="ok", layers="0-2")
    before = lake_snapshot(lake_dir)
    poisoned_batches = []
    orig = HFEngine.capture

    def poisoned(self, batch, **kw):
        caps = orig(self, batch, **kw)
        if len(caps) == 2 and not poisoned_batches:
            v = caps[1].vectors[(1, "resid_mid")].copy()
            v[-1, 5] = np.inf
            caps[1].vectors[(1, "resid_mid")] = v
            poisoned_batches.append(len(batch))
        return caps

    monkeypatch.setattr(HFEngine, "capture", poisoned)
    with pytest.raises(UserError, match=r"sample (\S+) \(id \w+\), layer 1, site resid_mid: values are not finite "
                                         r"in float16; use --store-dtype") as err:
        run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake_dir), run="bad",
                                  layers="0-2", sites="resid_post,resid_mid", store_dtype="float16", batch_size=2,
                                  group_size=2), progress=False, executor="local")
    named = str(err.value).split()[1]
    assert poisoned_batches and any(named in str(f) for f in corpus_dir.rglob("*.txt"))
    after = lake_snapshot(lake_dir)  # the run is registered; none of the refused group's rows is committed
    assert {t: after[t] for t in before if t.removesuffix(".lance") in COMMIT_ORDER} == \
        {t: v for t, v in before.items() if t.removesuffix(".lance") in COMMIT_ORDER}


def test_find_blocks_is_architecture_agnostic(qwen3_model, llama_model):
    from transformers import AutoModelForCausalLM

    for path, n in ((qwen3_model, 3), (llama_model, 2)):
        name, blocks = find_blocks(AutoModelForCausalLM.from_pretrained(path), n)
        assert name == "model.layers" and len(blocks) == n


def test_token_only_capture_writes_no_vectors(qwen3_model, corpus_dir, tmp_path, ray_session):
    lake = tmp_path / "lake"
    summary, _ = capture(qwen3_model, corpus_dir, lake, layers="none")
    lk = Lake(str(lake))
    assert summary["captured"] == 6 and summary["bytes"] == 0
    assert not lk.exists("activations") and not lk.exists("token_layers") and lk.read("blocks").num_rows == 0
    tokens = lk.read("tokens")
    assert tokens.num_rows == sum(lk.read("samples").column("n_tokens").to_pylist())
    assert tokens.column("surprisal").null_count == 6  # only pos 0 of each sample


def _perturbed(model: Path, out: Path) -> Path:
    """A copy of `model` with one block's MLP output scaled: a variant whose distribution differs."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(model, out)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    m.save_pretrained(out)
    return out


def test_reference_run_kl_equals_the_reference_model_and_bounds_it(qwen3_model, corpus_dir, tmp_path, ray_session):
    """--reference-run: kl_ref from the reference's stored distribution equals running the reference
    model when the run stored the whole vocabulary (1e-5 nats), and is a lower bound of it with top-4
    (batch 2, several groups); refused without a stored top-K distribution, beside --reference, or
    under another prompt, leaving the lake as it was."""
    from transformers import AutoConfig

    other = _perturbed(qwen3_model, tmp_path / "perturbed")
    vocab = AutoConfig.from_pretrained(qwen3_model).vocab_size
    lake_dir = tmp_path / "lake"
    capture(qwen3_model, corpus_dir, lake_dir, run="orig", layers="none", logits=str(vocab), executor="local")
    capture(qwen3_model, corpus_dir, lake_dir, run="orig4", layers="none", logits="4", executor="local")
    capture(qwen3_model, corpus_dir, lake_dir, run="bare", layers="none", executor="local")
    capture(other, corpus_dir, lake_dir, run="exact", layers="none", reference=str(qwen3_model), executor="local")
    capture(other, corpus_dir, lake_dir, run="stored", layers="none", reference_run="orig", executor="local")
    capture(other, corpus_dir, lake_dir, run="bound", layers="none", reference_run="orig4", executor="local")
    lake = Lake(str(lake_dir))

    def kl(run):
        t = lake.read("tokens", ["sample_id", "pos", "kl_ref"],
                      filter=f"run = '{run}' AND segment = 'text' AND pos > 0").sort_by([("sample_id", "ascending"),
                                                                                         ("pos", "ascending")])
        return t.column("kl_ref").to_numpy(zero_copy_only=False).astype(np.float64)

    exact, stored, bound = kl("exact"), kl("stored"), kl("bound")
    assert len(exact) > 50 and not np.isnan(exact).any() and not np.isnan(stored).any() and exact.mean() > 1e-3
    assert np.abs(stored - exact).max() < 1e-5
    assert (bound <= exact + 1e-6).all() and 0 < bound.mean() < exact.mean()
    # outside the text (system prompt, template) nothing is stored: no KL there
    assert lake.read("tokens", ["kl_ref"], filter="run = 'stored' AND segment <> 'text'").column(0).null_count == \
        lake.read("tokens", ["kl_ref"], filter="run = 'stored' AND segment <> 'text'").num_rows
    before = lake_snapshot(lake_dir)
    for kw, match in ((dict(reference_run="bare"), "stored no distribution"),
                      (dict(reference_run="nope"), "no such run"),
                      (dict(reference_run="orig", reference=str(qwen3_model)), "not both"),
                      (dict(reference_run="orig", user_prompt="Another question."), "prompt settings")):
        with pytest.raises(UserError, match=match):
            capture(other, corpus_dir, lake_dir, run="bad", layers="none", executor="local", **kw)
    assert lake_snapshot(lake_dir) == before


def test_prefix_cache_keeps_surprisal_entropy_and_kl(llama_model, corpus_dir, tmp_path, monkeypatch):
    """A tokens-only capture runs the prompt prefix every text shares once (hf.prefix_cache) and gives
    the surprisal, entropy and KL to a reference of the plain forward to 1e-5 (batch 2, several
    groups, a chat template and a system prompt); the prefix is computed once per model, not per batch."""
    from tourray.capture.hf import PrefixCache

    sp = tmp_path / "sp.md"
    sp.write_text("You are a tour guide. Speak about the place in front of the visitor, with dates and names.")
    other = _perturbed(llama_model, tmp_path / "perturbed")
    calls, prefixes = [], []
    orig_call = PrefixCache.__call__

    def spy(self, ids, mask, prefix):
        calls.append(prefix)
        before = self.ids
        out = orig_call(self, ids, mask, prefix)
        if self.ids is not before:
            prefixes.append(prefix)
        return out

    monkeypatch.setattr(PrefixCache, "__call__", spy)
    common = dict(samples=str(corpus_dir), lake=str(tmp_path / "lake"), layers="none", system_prompt=str(sp),
                  batch_size=2, group_size=2, reference=str(llama_model))
    for run, cached in (("cached", True), ("plain", False)):
        run_capture(CaptureConfig(model=str(other), run=run, hf={"prefix_cache": cached}, **common),
                    progress=False, executor="local")
    assert calls and min(calls) >= PrefixCache.MIN_TOKENS
    assert len(prefixes) <= 2 * len(set(prefixes))  # once per model (variant and reference) per distinct prefix
    lake = Lake(str(tmp_path / "lake"))
    cols = ["sample_id", "pos", "surprisal", "entropy", "kl_ref"]
    a, b = (lake.read("tokens", cols, filter=f"run = '{r}'").sort_by([("sample_id", "ascending"), ("pos", "ascending")])
            for r in ("cached", "plain"))
    assert a.num_rows == b.num_rows > 100
    for c in ("surprisal", "entropy", "kl_ref"):
        x, y = (t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for t in (a, b))
        assert np.array_equal(np.isnan(x), np.isnan(y)) and np.nanmax(np.abs(x - y)) < 1e-5, c


def test_reference_kl_and_token_classes(qwen3_model, llama_model, corpus_dir, tmp_path, ray_session):
    """tokens.kl_ref against an independent float64 recomputation (1e-4 nats); zero against itself;
    every text token classed; a reference with another tokenizer refused before anything is written."""
    from transformers import AutoModelForCausalLM

    other = _perturbed(qwen3_model, tmp_path / "perturbed")
    capture(other, corpus_dir, tmp_path / "lake", run="v", layers="none", reference=str(qwen3_model), executor="local")
    capture(qwen3_model, corpus_dir, tmp_path / "lake", run="self", layers="none", reference=str(qwen3_model), executor="local")
    lake = Lake(str(tmp_path / "lake"))
    tok = lake.read("tokens", filter="run = 'v'")
    s = lake.read("samples", filter="run = 'v'").to_pylist()[0]
    t = tok.filter(pc.field("sample_id") == s["sample_id"]).sort_by("pos")
    ids = torch.tensor(t.column("token_id").to_numpy().astype(np.int64))[None]
    with torch.no_grad():
        lp = [torch.log_softmax(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(input_ids=ids).logits[0]
                                .double(), -1) for d in (qwen3_model, other)]
    want = (lp[0].exp() * (lp[0] - lp[1])).sum(-1)[:-1].numpy()
    got = t.column("kl_ref").to_numpy(zero_copy_only=False)
    assert np.isnan(got[0]) and np.abs(got[1:] - want).max() < 1e-4 and want.mean() > 1e-3
    self_kl = lake.read("tokens", ["kl_ref"], filter="run = 'self' AND kl_ref IS NOT NULL").column(0).to_numpy()
    assert np.abs(self_kl).max() < 1e-5
    classes = dict(zip(*np.unique(tok.column("token_class").drop_null().to_numpy(zero_copy_only=False),
                                  return_counts=True)))
    text = pc.equal(tok.column("segment"), "text")
    assert set(classes) <= {"number", "proper", "word", "punct"} and {"number", "proper", "word"} <= set(classes)
    assert pc.sum(text).as_py() == sum(classes.values())  # text tokens, and only they, have a class
    before = lake_snapshot(tmp_path / "lake")
    with pytest.raises(UserError, match="--reference .*tokenizer differs"):
        capture(qwen3_model, corpus_dir, tmp_path / "lake", run="bad", layers="none", reference=str(llama_model), executor="local")
    assert lake_snapshot(tmp_path / "lake") == before


def test_only_forward_passes_run_on_the_forward_thread(qwen3_model, corpus_dir, tmp_path, monkeypatch):
    """Checksums, Arrow building and token tables run on the stage's own thread, so the model thread
    never waits on them (a mutation moving them back into the producer fails this)."""
    import threading

    seen = {"capture": set(), "arrow": set()}
    orig_batch, orig_tokens = CaptureStage._activations_batch, CaptureStage._tokens_table

    def spy(kind, fn):
        def wrapped(*a, **k):
            seen[kind].add(threading.current_thread().name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(CaptureStage, "_activations_batch", spy("arrow", orig_batch))
    monkeypatch.setattr(CaptureStage, "_tokens_table", spy("arrow", orig_tokens))
    from tourray.capture.hf import HFEngine

    monkeypatch.setattr(HFEngine, "capture", spy("capture", HFEngine.capture))
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(tmp_path / "lake"), run="t",
                              batch_size=2, group_size=4), progress=False, executor="local")
    assert seen["capture"] and all(n.startswith("capture-forward") for n in seen["capture"])
    assert seen["arrow"] and not any(n.startswith("capture-forward") for n in seen["arrow"])
