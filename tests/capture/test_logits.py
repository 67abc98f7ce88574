"""`tourray capture --logits`: the stored next-token distribution against an independent float64
recomputation (torch.topk of a float64 log-softmax of the same model), sample mode's draws, exact
resume, and verify's check of the table."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import lake_snapshot
from tourray.capture import CaptureConfig, run_capture
from tourray.capture.plan import all_groups, plan_capture
from tourray.errors import UserError
from tourray.lake import tables as lk
from tourray.lake.verify import verify_lake
from tourray.model.prompt import PromptFormat

TOL = 1e-5  # stated tolerance: log-probabilities (nats), float32 capture vs float64 recompute


def capture(model, samples, lake, run="r", executor="local", **kw):
    cfg = CaptureConfig(**dict(dict(model=str(model), samples=str(samples), lake=str(lake), run=run, group_size=2,
                                    batch_size=2, layers="none"), **kw))
    return run_capture(cfg, progress=False, executor=executor)


def reference_logprobs(model_dir, text):
    """Independent: the prompt's ids and a float64 log-softmax of a float64 forward, row t = the
    distribution that predicts token t + 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ids = PromptFormat(tok, "").encode(text).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
    return ids, torch.log_softmax(logits.double(), -1)


def rows_of(lake, run):
    t = lk.Lake(str(lake)).read("logits", filter=f"run = '{run}'").sort_by([("sample_id", "ascending"), ("pos", "ascending")])
    return t


@pytest.fixture(scope="module")
def topk_lake(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    lake = tmp_path_factory.mktemp("logits") / "lake"
    capture(qwen3_model, corpus_dir, lake, logits="16", executor="ray")
    return lake


def test_topk_equals_float64_recompute(qwen3_model, topk_lake):
    L = lk.Lake(str(topk_lake))
    t = rows_of(topk_lake, "r")
    samples = L.read("samples", filter="run = 'r'").to_pylist()
    assert samples and t.num_rows == sum(s["text_end"] - max(s["text_start"], 1) for s in samples)
    for s in samples:
        mine = t.filter(t.column("sample_id").to_numpy(zero_copy_only=False) == s["sample_id"]).to_pylist()
        assert [r["pos"] for r in mine] == list(range(max(s["text_start"], 1), s["text_end"]))  # text tokens only
        ids, lp = reference_logprobs(qwen3_model, s["text"])
        assert s["n_tokens"] == len(ids)
        for r in mine:
            ref = lp[r["pos"] - 1]
            want_vals, _ = torch.topk(ref, 16)
            got_ids = torch.tensor(r["top_ids"], dtype=torch.long)
            got = np.array(r["top_logprobs"], np.float64)
            assert len(set(r["top_ids"])) == 16 and r["counts"] is None
            assert np.all(np.diff(got) <= 0)  # most likely first
            np.testing.assert_allclose(got, want_vals.numpy(), rtol=0, atol=TOL)  # they are the top 16
            np.testing.assert_allclose(got, ref[got_ids].numpy(), rtol=0, atol=TOL)  # and these ids' values
            rest = ref.clone()
            rest[got_ids] = float("-inf")
            np.testing.assert_allclose(r["rest_logprob"], float(rest.logsumexp(0)), rtol=0, atol=TOL)


def test_k_equal_to_the_vocabulary_leaves_no_rest(qwen3_model, corpus_dir, tmp_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(qwen3_model).vocab_size
    capture(qwen3_model, corpus_dir, tmp_path / "lake", logits=str(vocab), include=["train/sydney__o*"])
    t = rows_of(tmp_path / "lake", "r")
    assert t.num_rows > 0 and all(len(x) == vocab for x in t.column("top_ids").to_pylist()[:3])
    assert np.all(np.isneginf(t.column("rest_logprob").to_numpy()))
    with pytest.raises(UserError, match="vocabulary has"):
        capture(qwen3_model, corpus_dir, tmp_path / "lake2", logits=str(vocab + 1))
    assert not (tmp_path / "lake2").exists()


def test_sample_mode_draws_are_distinct_counted_and_reproducible(qwen3_model, corpus_dir, tmp_path):
    lake = tmp_path / "lake"
    inc = ["train/sydney__*"]
    capture(qwen3_model, corpus_dir, lake, logits="sample:12", include=inc)
    capture(qwen3_model, corpus_dir, lake, run="again", logits="sample:12", include=inc, batch_size=1)
    a, b = rows_of(lake, "r"), rows_of(lake, "again")
    assert a.num_rows > 0
    for c in ("pos", "top_ids", "counts"):  # the draws do not depend on batching (padding moves the values ~1e-7)
        assert a.column(c).to_pylist() == b.column(c).to_pylist(), c
    np.testing.assert_allclose(np.concatenate(a.column("top_logprobs").to_pylist()),
                               np.concatenate(b.column("top_logprobs").to_pylist()), rtol=0, atol=TOL)
    samples = {s["sample_id"]: s["text"] for s in lk.Lake(str(lake)).read("samples", filter="run = 'r'").to_pylist()}
    freq_err = []
    for sid, text in samples.items():
        _, lp = reference_logprobs(qwen3_model, text)
        for r in (x for x in a.to_pylist() if x["sample_id"] == sid):
            ids, counts = r["top_ids"], r["counts"]
            assert len(set(ids)) == len(ids) and sum(counts) == 12 and min(counts) >= 1
            ref = lp[r["pos"] - 1]
            np.testing.assert_allclose(r["top_logprobs"], ref[ids].numpy(), rtol=0, atol=TOL)
            rest = ref.clone()
            rest[ids] = float("-inf")
            np.testing.assert_allclose(r["rest_logprob"], float(rest.logsumexp(0)), rtol=0, atol=TOL)
            # draws follow the distribution: sum_i count_i / N * f(id_i) is unbiased for E_p[f]; f = log p
            p = ref.exp()
            freq_err.append(float(np.dot(np.array(counts) / 12, ref[ids].numpy()) - float((p * ref).sum())))
    err = np.array(freq_err)
    assert abs(err.mean()) < 4 * err.std() / np.sqrt(len(err)), (err.mean(), err.std(), len(err))


def test_resume_after_partial_commits_gives_the_same_rows(qwen3_model, corpus_dir, topk_lake, tmp_path):
    """Group 0 never committed, group 1 half committed (tokens and logits but no samples rows):
    the resumed run's logits rows equal the uninterrupted run's, and verify passes."""
    lake = tmp_path / "lake"
    shutil.copytree(topk_lake, lake)
    cfg = CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="r", group_size=2,
                        batch_size=2, layers="none", logits="16")
    g0, g1 = [[s.sample_id for s in g] for g in all_groups(plan_capture(cfg))][:2]
    L = lk.Lake(str(lake))
    ids0 = ", ".join(lk.sql_quote(s) for s in g0)
    for table in ("tokens", "blocks", "logits", "samples"):
        L.delete(table, f"sample_id IN ({ids0})")
    L.delete("samples", f"sample_id = {lk.sql_quote(g1[0])}")
    s = run_capture(cfg, progress=False, executor="local")
    assert s["captured"] == 4
    want, got = rows_of(topk_lake, "r"), rows_of(lake, "r")
    assert got.num_rows == want.num_rows
    for c in ("sample_id", "pos", "top_ids", "top_logprobs", "rest_logprob"):
        assert got.column(c).to_pylist() == want.column(c).to_pylist(), c
    rep = verify_lake(lake, "r")
    assert not rep.problems, rep.problems


def test_verify_names_a_missing_logits_row(topk_lake, tmp_path):
    lake = tmp_path / "lake"
    shutil.copytree(topk_lake, lake)
    L = lk.Lake(str(lake))
    victim = L.read("logits", filter="run = 'r'").to_pylist()[3]
    L.delete("logits", f"sample_id = {lk.sql_quote(victim['sample_id'])} AND pos = {victim['pos']}")
    problems = verify_lake(lake, "r").problems
    assert any(victim["sample_id"] in p and "logits" in p for p in problems), problems


def test_a_change_of_logits_under_an_existing_run_is_refused(qwen3_model, corpus_dir, topk_lake, tmp_path):
    lake = tmp_path / "lake"
    shutil.copytree(topk_lake, lake)
    before = lake_snapshot(lake)
    with pytest.raises(UserError, match="logits"):
        capture(qwen3_model, corpus_dir, lake, logits="8")
    assert lake_snapshot(lake) == before
