"""`tourray solve` on a real capture against numpy / scipy on the same stored fit-side vectors.

The tiny corpus has 6 samples; the split is by sha256 of the sample id, so the held-out fraction is
chosen from the stored ids: `one_heldout` holds out exactly one sample, `none_heldout` none.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import scipy.linalg

from conftest import lake_snapshot
from tourray.capture import CaptureConfig, run_capture
from tourray.cli import main
from tourray.lake.tables import Lake, arrow_to_numpy
from tourray.stats.solves import SolveConfig, run_solve
from tourray.stats.stream import Selection


@pytest.fixture(scope="module")
def lake(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    # layer 2 (of blocks 0-2) is hooked out: a layer in range that was not stored
    root = tmp_path_factory.mktemp("solves") / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(root), run="r",
                              store_dtype="float32", layers="embed,0,1", sites="resid_post,resid_mid", batch_size=3,
                              group_size=3), progress=False, executor="local")
    return root


def _buckets(lake) -> np.ndarray:
    ids = Lake(lake).read("samples", ["sample_id"]).column(0).to_pylist()
    return np.sort([int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 2**32 for s in ids])


@pytest.fixture(scope="module")
def one_heldout(lake) -> float:
    b = _buckets(lake)
    return float((b[0] + b[1]) / 2)


@pytest.fixture(scope="module")
def none_heldout(lake) -> float:
    return float(_buckets(lake)[0] / 2)


def text_vectors(lake, layer, side="all", heldout=0.1, site="resid_post"):
    """[n, d] float64 of one layer's text tokens on one side of the split, rows by (sample_id, pos)."""
    lk = Lake(lake)
    samples = lk.read("samples", filter="run = 'r'").to_pylist()
    keep = Selection(split=side, heldout=heldout).keeps([r["sample_id"] for r in samples])
    spans = {r["sample_id"]: (r["text_start"], r["text_end"]) for r, k in zip(samples, keep) if k}
    t = lk.read("activations", filter=f"run = 'r' AND site = '{site}' AND layer = {layer}")
    t = t.sort_by([("sample_id", "ascending"), ("pos", "ascending")])
    sid, pos = t.column("sample_id").to_pylist(), t.column("pos").to_numpy()
    rows = np.array([s in spans and spans[s][0] <= p < spans[s][1] for s, p in zip(sid, pos)])
    return arrow_to_numpy(t.column("h"), np.float64)[rows]


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def solve(kind, lake, **kw):
    streams = {k: kw.pop(k) for k in ("from", "to") if k in kw}
    return run_solve(kind, SolveConfig(lake=str(lake), **streams, **kw), progress=False)


def stored_row(lake, solve_id):
    rows = Lake(lake).read("solves", filter=f"solve_id = '{solve_id}'").to_pylist()
    assert len(rows) == 1
    return rows[0]


def test_lstsq_equals_numpy_lstsq_and_is_judged_on_heldout_tokens(lake, one_heldout):
    s = solve("lstsq", lake, **{"from": "r:0", "to": "r:1"}, heldout=one_heldout)
    x, y = (text_vectors(lake, l, "fit", one_heldout) for l in (0, 1))
    assert s["n_fit"] == len(x) > x.shape[1] + 1                       # well posed: more tokens than unknowns
    a = np.hstack([x, np.ones((len(x), 1))])                           # intercept column
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    assert rel(x @ s["matrix"] + s["bias"], a @ coef) < 1e-8            # predictions: 1e-8 relative
    assert rel(s["matrix"], coef[:-1]) < 1e-6

    hx, hy = (text_vectors(lake, l, "heldout", one_heldout) for l in (0, 1))
    assert s["n_heldout"] == len(hx) > 0
    pred = hx @ s["matrix"] + s["bias"]
    assert s["cos_before"] == pytest.approx(cosines(hx, hy).mean(), rel=1e-10)
    assert s["cos_after"] == pytest.approx(cosines(pred, hy).mean(), rel=1e-9)
    assert s["cos_after"] >= s["cos_before"]
    assert s["rel_residual"] == pytest.approx(((pred - hy) ** 2).sum() / ((hy - hy.mean(0)) ** 2).sum(), rel=1e-8)
    assert s["orth_error"] is None and not s["reused"]

    row = stored_row(lake, s["solve_id"])
    assert (row["kind"], row["from_stream"], row["to_stream"]) == ("lstsq", "r:0:resid_post", "r:1:resid_post")
    assert (row["rows"], row["cols"]) == x.shape[1:] * 2
    assert np.array_equal(np.asarray(row["matrix"]).reshape(row["rows"], row["cols"]), s["matrix"])
    assert row["cos_after"] == s["cos_after"] and row["n_heldout"] == len(hx)
    params = json.loads(row["params"])
    assert params["heldout"] == one_heldout and params["selection"]["split"] == "fit"
    assert json.loads(row["sources"])["heldout"]["activations_version"] >= 1


def test_procrustes_equals_scipy_both_directions_reusing_the_moments(lake, one_heldout):
    x, y = (text_vectors(lake, l, "fit", one_heldout) for l in (0, 1))
    xc, yc = x - x.mean(0), y - y.mean(0)
    fwd = solve("procrustes", lake, **{"from": "r:0", "to": "r:1"}, heldout=one_heldout)
    assert rel(fwd["matrix"], scipy.linalg.orthogonal_procrustes(xc, yc)[0]) < 1e-8
    assert rel(fwd["bias"], y.mean(0) - x.mean(0) @ fwd["matrix"]) < 1e-8
    assert fwd["orth_error"] < 1e-12
    moments = lake_snapshot(lake)["moments.lance"]
    back = solve("procrustes", lake, **{"from": "r:1", "to": "r:0"}, heldout=one_heldout)   # the pair, transposed
    assert lake_snapshot(lake)["moments.lance"] == moments                                   # statistics reused
    assert rel(back["matrix"], scipy.linalg.orthogonal_procrustes(yc, xc)[0]) < 1e-8
    assert rel(back["matrix"], fwd["matrix"].T) < 1e-8
    assert back["solve_id"] != fwd["solve_id"] and back["n_heldout"] > 0


def test_pca_without_heldout_tokens_out_file_and_reuse(lake, none_heldout, tmp_path, capsys):
    out = tmp_path / "pca.npy"
    argv = ["-q", "solve", "pca", "--lake", str(lake), "--from", "r:embed", "--k", "8", "--heldout", str(none_heldout),
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "selects no tokens" in first and "stored: solves row" in first
    x = text_vectors(lake, -1)                                      # nothing held out: every text token
    p = np.load(out)
    assert p.shape == (128, 8)
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))[::-1]
    rows = Lake(lake).read("solves", filter="kind = 'pca'").to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert row["n_fit"] == len(x) and row["n_heldout"] == 0
    assert row["cos_before"] is None and row["cos_after"] is None and row["rel_residual"] is None
    assert rel(row["singular_values"], lam) < 1e-9
    assert np.array_equal(np.asarray(row["matrix"]).reshape(128, 8), p) and row["bias"] is None

    before = lake_snapshot(lake)
    out.unlink()
    assert main(argv) == 0
    assert "reused: solves row " + row["solve_id"] in capsys.readouterr().out
    assert lake_snapshot(lake) == before                            # table version unchanged
    assert np.array_equal(np.load(out), p)


def test_hooked_but_not_stored_layer_is_named(qwen3_model, corpus_dir, tmp_path, capsys):
    """A layer the run hooked (for inline statistics) but did not store has no vectors to solve from:
    refused as such, not read as if stored."""
    lake = tmp_path / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="p",
                              store="embed,0", stats=["units"], store_dtype="float32", batch_size=3, group_size=3),
                progress=False, executor="local")
    before = lake_snapshot(lake)
    for args in (["pca", "--from", "p:1"], ["lstsq", "--from", "p:0", "--to", "p:2"],
                 ["procrustes", "--from", "p:0", "--to", f"{lake}:p:1"]):
        assert main(["-q", "solve", *args[:1], "--lake", str(lake), *args[1:], "--no-progress"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        want = "layer " + args[-1].rsplit(":", 1)[1] + " was hooked but not stored"
        assert len(errors) == 1 and want in errors[0], errors
    assert lake_snapshot(lake) == before


@pytest.mark.parametrize("args, message", [
    (["lstsq", "--from", "nope:0", "--to", "nope:1"], "no run 'nope'"),
    (["lstsq", "--from", "r:0", "--to", "r:2"], "did not store layer 2"),
    (["pca", "--from", "r:7"], "out of range"),
    (["pca", "--from", "r:embed:resid_mid"], "no resid_mid"),
    (["procrustes", "--from", "r:0"], "--to"),
    (["lstsq", "--from", "r:0"], "--to"),
    (["pca", "--from", "r:0", "--to", "r:1"], "--to"),
    (["pca", "--from", "r"], "RUN:LAYER"),
    (["pca", "--from", "r:x"], "LAYER must be"),
    (["pca", "--from", "r:0-1"], "LAYER must be"),
    (["pca", "--from", "r:0:bogus"], "neither a layer"),
    (["pca", "--from", "r:0", "--k", "129"], "larger than the width of r:0:resid_post (d=128)"),
    (["procrustes", "--from", "r:0", "--to", "r:1", "--k", "500"], "larger than the width"),
    (["procrustes", "--from", "r:0", "--to", "r:1", "--ridge", "0.1"], "--whiten"),
    (["lstsq", "--from", "r:0", "--to", "r:0"], "--from itself"),
    (["lstsq", "--from", "r:0", "--to", "r:1", "--out", "/no/such/folder/w.npy"], "does not exist"),
])
def test_bad_input_is_one_error_line_and_leaves_the_lake_unchanged(lake, args, message, capsys):
    before = lake_snapshot(lake)
    assert main(["-q", "solve", *args[:1], "--lake", str(lake), *args[1:], "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert lake_snapshot(lake) == before
