"""`tourray stats` on a real capture against numpy on the same stored vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import lake_snapshot
from tourray.capture import CaptureConfig, run_capture
from tourray.errors import UserError
from tourray.lake.tables import Lake, arrow_to_numpy
from tourray.stats.stream import Selection
from tourray.stats.tasks import StatsConfig, read_moments, run_stats


@pytest.fixture(scope="module")
def lake(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("stats") / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(root), run="r",
                              store_dtype="float32", sites="resid_post,resid_mid", batch_size=2, group_size=2),
                progress=False, executor="local")
    return root


def stored_text_vectors(lake, run="r", site="resid_post"):
    """layer -> [n, d] float64 of text tokens, rows ordered by (sample_id, pos): numpy's reference."""
    lk = Lake(lake)
    spans = {r["sample_id"]: (r["text_start"], r["text_end"]) for r in lk.read("samples", filter=f"run = '{run}'").to_pylist()}
    t = lk.read("activations", filter=f"run = '{run}' AND site = '{site}'").sort_by([("layer", "ascending"), ("sample_id", "ascending"), ("pos", "ascending")])
    out = {}
    for layer in sorted(set(t.column("layer").to_pylist())):
        part = t.filter(t.column("layer").to_numpy() == layer)
        sid, pos = part.column("sample_id").to_pylist(), part.column("pos").to_numpy()
        keep = np.array([spans[s][0] <= p < spans[s][1] for s, p in zip(sid, pos)])
        out[layer] = arrow_to_numpy(part.column("h"), np.float64)[keep]
    return out


def gram_cka(a, b):
    k, l = a @ a.T, b @ b.T
    h = np.eye(len(a)) - 1.0 / len(a)
    k, l = h @ k @ h, h @ l @ h
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_all_pairs_equal_numpy_on_stored_vectors(lake):
    s = run_stats(StatsConfig(lake=str(lake), run="r", pairs="all", tile_layers=2, workers=2), progress=False)
    info = s["sites"]["resid_post"]
    assert info["computed_pairs"] == 6 and info["tiles"] == 3  # 4 layers in tiles of 2: (I,I), (I,J), (J,J)
    ref = stored_text_vectors(lake)
    lk = Lake(lake)
    key = dict(run="r", site="resid_post", selection=Selection().key())
    layers = {r["layer"]: r for r in lk.read("layer_stats", filter="run = 'r' AND site = 'resid_post'").to_pylist()}
    assert sorted(layers) == [-1, 0, 1, 2]
    for layer, x in ref.items():
        row = layers[layer]
        assert row["n_tokens"] == len(x)
        cov = np.cov(x, rowvar=False, bias=True)
        m = read_moments(lk, kind="layer", layer_a=layer, source=row["source"], **key)
        assert rel(m.cov, cov) < 1e-10                                   # covariance: 1e-10 relative
        lam = np.linalg.eigvalsh(cov)[::-1]
        assert rel(row["eigenvalues"], lam) < 1e-9
        assert row["effective_rank"] == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-9)
        assert row["rms"] == pytest.approx(np.sqrt((x ** 2).mean()), rel=1e-10)
        assert row["mean_norm"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-10)
        assert rel(row["channel_absmax"], np.abs(x).max(0)) == 0
    pairs = {(r["layer_a"], r["layer_b"]): r for r in lk.read("pair_stats", filter="run = 'r' AND site = 'resid_post'").to_pylist()}
    assert len(pairs) == 6
    for (a, b), row in pairs.items():
        xa, xb = ref[a], ref[b]
        cos = (xa * xb).sum(1) / np.linalg.norm(xa, axis=1) / np.linalg.norm(xb, axis=1)
        assert row["mean_cos"] == pytest.approx(cos.mean(), rel=1e-10)
        assert row["mean_angular"] == pytest.approx((np.arccos(np.clip(cos, -1, 1)) / np.pi).mean(), rel=1e-9)
        assert row["cka"] == pytest.approx(gram_cka(xa, xb), rel=1e-9)   # exact CKA over all tokens: 1e-9
        assert row["rel_rms_diff"] == pytest.approx(np.sqrt(((xb - xa) ** 2).sum() / (xa ** 2).sum()), rel=1e-10)
        assert json.loads(row["sources"])["activations_version"] >= 1


def test_asking_again_reuses_and_consecutive_pairs_store_cross_matrices(lake):
    cfg = StatsConfig(lake=str(lake), run="r", sites="resid_mid", pairs="consecutive")
    first = run_stats(cfg, progress=False)["sites"]["resid_mid"]
    assert first["layers"] == [0, 1, 2] and first["computed_pairs"] == 2
    before = lake_snapshot(lake)
    again = run_stats(cfg, progress=False)["sites"]["resid_mid"]
    assert again["tiles"] == 0 and again["reused_layers"] == 3 and again["reused_pairs"] == 2
    assert lake_snapshot(lake) == before
    ref = stored_text_vectors(lake, site="resid_mid")
    lk = Lake(lake)
    src = lk.read("layer_stats", ["source"], filter="run = 'r' AND site = 'resid_mid'").column(0)[0].as_py()
    x = read_moments(lk, "r", "resid_mid", Selection().key(), src, "pair", 0, 1)
    xa, xb = ref[0], ref[1]
    assert rel(x.cross_cov, (xa - xa.mean(0)).T @ (xb - xb.mean(0)) / len(xa)) < 1e-10


def test_where_and_entropy_weights(lake):
    lk = Lake(lake)
    run_stats(StatsConfig(lake=str(lake), run="r", layers="1", pairs="none", where="surprisal > 5", weight="entropy"),
              progress=False)
    t = lk.read("tokens", filter="run = 'r' AND segment = 'text'").to_pandas()
    t = t[t.surprisal > 5].sort_values(["sample_id", "pos"])
    acts = lk.read("activations", filter="run = 'r' AND site = 'resid_post' AND layer = 1").to_pandas()
    acts = t.merge(acts, on=["sample_id", "pos"])
    x = np.stack(acts["h"].to_numpy()).astype(np.float64)
    w = acts["entropy"].to_numpy().astype(np.float64)
    row = lk.read("layer_stats", filter="run = 'r' AND layer = 1 AND selection LIKE '%surprisal%'").to_pylist()[0]
    assert row["n_tokens"] == len(x) and 0 < len(x)
    assert row["weight_sum"] == pytest.approx(w.sum(), rel=1e-6)   # entropy is stored float32
    assert rel(row["channel_var"], np.cov(x, rowvar=False, aweights=w, bias=True).diagonal()) < 1e-9


@pytest.mark.parametrize("kw, message", [
    (dict(run="nope"), "no run 'nope'"),
    (dict(run="r", layers="embed,7"), "out of range"),
    (dict(run="r", where="surprisal > 1e9"), "selects no tokens"),
    (dict(run="r", where="no_such_column = 1"), "--where"),
    (dict(run="r", pairs="0:0"), "itself"),
    (dict(run="r", pairs="0-2"), "cannot parse"),
])
def test_bad_input_is_refused_and_writes_nothing(lake, kw, message):
    before = lake_snapshot(lake)
    with pytest.raises(UserError, match=message):
        run_stats(StatsConfig(lake=str(lake), **kw), progress=False)
    assert lake_snapshot(lake) == before


def test_tiles_read_each_layer_few_times_and_own_each_layer_once():
    from tourray.stats.tasks import make_tiles, parse_pairs

    layers = list(range(-1, 63))  # a 64-layer model: embed + 63 blocks
    pairs = parse_pairs("all", layers, 63)
    tiles = make_tiles(layers, pairs, all_pairs=True, tile_layers=8)
    assert sorted(p for t in tiles for p in t.pairs) == pairs          # every pair exactly once
    assert sorted(l for t in tiles for l in t.own) == layers           # every layer's moments once
    reads = [sum(l in t.read for t in tiles) for l in layers]
    assert max(reads) == 8 and max(len(t.pairs) for t in tiles) <= 64  # not 64 reads per layer
    few = make_tiles(layers, parse_pairs("consecutive", layers, 63), all_pairs=False, tile_layers=8, own=layers[:3])
    assert sorted(l for t in few for l in t.own) == layers[:3]


def test_cli_bad_input_is_one_error_line(lake, capsys):
    from tourray.cli import main

    before = lake_snapshot(lake)
    for args, message in ((["--run", "nope"], "no run 'nope'"), (["--run", "r", "--where", "surprisal > 1e9"], "selects no tokens"),
                          (["--run", "r", "--pairs", "embed:9"], "out of range")):
        assert main(["-q", "stats", "--lake", str(lake), *args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and message in err and "Traceback" not in err
    assert lake_snapshot(lake) == before


def test_bfloat16_vectors(qwen3_model, corpus_dir, tmp_path, ray_session):
    root = tmp_path / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(root), run="b",
                              store_dtype="bfloat16", layers="0,1", batch_size=3, group_size=3), progress=False, executor="local")
    run_stats(StatsConfig(lake=str(root), run="b"), progress=False)
    ref = stored_text_vectors(root, run="b")       # bfloat16 bits -> float32 -> float64
    row = Lake(root).read("pair_stats").to_pylist()[0]
    assert row["cka"] == pytest.approx(gram_cka(ref[0], ref[1]), rel=1e-9)
