"""Solves between two models over the same texts: a student (other tokenizer, other width) and a
teacher in two lakes, paired by character spans, against numpy/scipy on explicitly aligned data."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scipy.linalg

from conftest import _tokenizer, lake_snapshot, write_corpus
from tourray.capture import CaptureConfig, run_capture
from tourray.cli import main
from tourray.lake.tables import Lake, arrow_to_numpy
from tourray.stats.solves import SolveConfig, run_solve

KW = dict(store_dtype="float32", batch_size=3, group_size=3, run="r")


@pytest.fixture(scope="module")
def student_model(tmp_path_factory):
    """A 2-block Qwen3 of width 64 with its own tokenizer (vocab 400: other token boundaries)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _tokenizer(400)
    torch.manual_seed(3)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("student")
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lakes(qwen3_model, student_model, corpus_dir, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("paired")
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(root / "teacher"), **KW), progress=False, executor="local")
    run_capture(CaptureConfig(model=str(student_model), samples=str(corpus_dir), lake=str(root / "student"), **KW), progress=False, executor="local")
    return root / "student", root / "teacher"


def span_aligned(student, teacher, ls, lt):
    """Reference pairing, one token at a time: each student text token with the mean of the teacher
    text-token vectors whose character spans overlap it."""
    xs, ys = [], []
    S, T = Lake(student), Lake(teacher)
    for sid in sorted(S.read("samples", ["sample_id"]).column(0).to_pylist()):
        def text(lake, layer):
            tok = lake.read("tokens", filter=f"sample_id = '{sid}' AND segment = 'text'").sort_by("pos").to_pylist()
            h = lake.read("activations", filter=f"sample_id = '{sid}' AND layer = {layer} AND site = 'resid_post'").sort_by("pos")
            return tok, arrow_to_numpy(h.column("h"), np.float64)
        ts, hs = text(S, ls)
        tt, ht = text(T, lt)
        for t in ts:
            over = [u["pos"] for u in tt if u["char_start"] < t["char_end"] and u["char_end"] > t["char_start"]]
            if t["char_end"] > t["char_start"] and over:
                xs.append(hs[t["pos"]])
                ys.append(ht[over].mean(0))
    return np.array(xs), np.array(ys)


def tiny_heldout(lake) -> float:
    """A held-out fraction below every sample's bucket: everything is fitted."""
    ids = Lake(lake).read("samples", ["sample_id"]).column(0).to_pylist()
    return min(int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 2**32 for s in ids) / 2


def test_lstsq_across_tokenizers_and_widths_equals_numpy_on_span_aligned_tokens(lakes):
    student, teacher = lakes
    x, y = span_aligned(student, teacher, 1, 2)
    assert x.shape[1] == 64 and y.shape[1] == 128 and len(x) > 100
    s = run_solve("lstsq", SolveConfig(lake=str(student), **{"from": "r:1", "to": f"{teacher}:r:2"},
                                       heldout=tiny_heldout(student)), progress=False)
    assert s["n_fit"] == len(x) and (s["rows"], s["cols"]) == (64, 128)
    coef, *_ = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)
    pred, ref = x @ s["matrix"] + s["bias"], np.hstack([x, np.ones((len(x), 1))]) @ coef
    assert np.abs(pred - ref).max() / np.abs(ref).max() < 1e-8                     # 1e-8 relative


def test_procrustes_across_widths_needs_k_and_equals_pca_plus_scipy(lakes, capsys):
    student, teacher = lakes
    before = lake_snapshot(student)
    assert main(["solve", "procrustes", "--lake", str(student), "--from", "r:1", "--to", f"{teacher}:r:2"]) == 2
    assert "--k" in capsys.readouterr().err and lake_snapshot(student) == before
    x, y = span_aligned(student, teacher, 1, 2)
    s = run_solve("procrustes", SolveConfig(lake=str(student), **{"from": "r:1", "to": f"{teacher}:r:2"}, k=16,
                                            heldout=tiny_heldout(student)), progress=False)
    xc, yc = x - x.mean(0), y - y.mean(0)

    def top(c, k):
        lam, v = np.linalg.eigh(c)
        v = v[:, ::-1][:, :k]
        return v * np.sign(v[np.abs(v).argmax(0), range(k)])

    pa_, pb = top(xc.T @ xc / len(x), 16), top(yc.T @ yc / len(y), 16)
    r, _ = scipy.linalg.orthogonal_procrustes(xc @ pa_, yc @ pb)
    lifted = pa_ @ r @ pb.T
    assert np.abs(s["matrix"] - lifted).max() / np.abs(lifted).max() < 1e-8       # 1e-8 relative
    assert s["orth_error"] < 1e-10


def test_runs_over_different_texts_are_refused(lakes, student_model, tmp_path, capsys):
    student, teacher = lakes
    other = write_corpus(tmp_path / "other", {"train/a.txt": "A different text about a harbour.\n"})
    run_capture(CaptureConfig(model=str(student_model), samples=str(other), lake=str(tmp_path / "o"), **KW), progress=False, executor="local")
    before = lake_snapshot(tmp_path / "o")
    assert main(["solve", "lstsq", "--lake", str(tmp_path / "o"), "--from", "r:1", "--to", f"{teacher}:r:2",
                 "--heldout", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "not over the same texts" in err and err.count("error:") == 1 and lake_snapshot(tmp_path / "o") == before
