"""Plans from lake evidence against independent numpy recomputations from the stored vectors, the
blind baselines' definitions, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tourray.errors import UserError
from tourray.lake.tables import Lake
from tourray.prune.plan import PlanConfig, make_plan, read_plan, spans


def cos(a, b):
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def plan(prune_lake, **kw):
    return make_plan(PlanConfig(lake=str(prune_lake), run=kw.pop("run", "full"), **kw))


def test_block_influence_and_angular_match_numpy(prune_lake, prune_vectors):
    x, sp = prune_vectors()
    bi = [1 - np.mean(np.concatenate([cos(x[l - 1][s][a:b], x[l][s][a:b]) for s, (a, b) in sp.items()])) for l in range(3)]
    p = plan(prune_lake, method="block-influence", remove=1)
    assert np.allclose(p["evidence"]["block_influence"], bi, atol=1e-6)  # DuckDB's float32 cosines, averaged
    assert p["removed"] == [int(np.argmin(bi))] and p["kept"] == [l for l in range(3) if l != np.argmin(bi)]
    n = 2
    ang = [np.mean([np.arccos(np.clip(cos(x[l - 1][s][b - 1 : b], x[l + n - 1][s][b - 1 : b]), -1, 1))[0] / np.pi
                    for s, (a, b) in sp.items()]) for l in range(3 - n + 1)]
    p = plan(prune_lake, method="angular", remove=n)
    assert np.allclose(p["evidence"]["angular_by_start"], ang, atol=1e-9)
    best = int(np.argmin(ang))
    assert p["removed"] == list(range(best, best + n))
    assert set(p["table_versions"]) >= {"runs", "samples", "token_layers", "tokens", "activations"}
    assert p["run"] == "full" and p["model_revision"].startswith("st-sha256:")


def test_entropy_weighted_and_magnitude(prune_lake, prune_vectors):
    x, sp = prune_vectors()
    lk = Lake(str(prune_lake))
    tok = lk.read("tokens", ["sample_id", "pos", "entropy"], filter="run = 'full'").to_pylist()
    ent = {(r["sample_id"], r["pos"]): r["entropy"] for r in tok}
    want_e, want_m = [], []
    for l in range(3):
        c, w, rel = [], [], []
        for s, (a, b) in sp.items():
            c.append(cos(x[l - 1][s][a:b], x[l][s][a:b]))
            # next-token entropy: computed at p, stored at p + 1 (none after a text that ends the prompt)
            w.append([ent.get((s, p + 1)) or 0.0 for p in range(a, b)])
            rel.append(np.linalg.norm(x[l][s][a:b] - x[l - 1][s][a:b], axis=1) / np.linalg.norm(x[l - 1][s][a:b], axis=1))
        c, w = np.concatenate(c), np.concatenate(w)
        want_e.append(1 - (w * c).sum() / w.sum())
        want_m.append(np.concatenate(rel).mean())
    p = plan(prune_lake, method="entropy-weighted", remove=1)
    assert np.allclose(p["evidence"]["entropy_weighted_influence"], want_e, atol=1e-6)
    assert p["removed"] == [int(np.argmin(want_e))]
    p = plan(prune_lake, method="magnitude", remove=1)
    assert np.allclose(p["evidence"]["rel_update_norm"], want_m, rtol=1e-4)
    assert p["removed"] == [int(np.argmin(want_m))]


def test_blind_baselines_and_protect(prune_lake):
    assert plan(prune_lake, method="reverse", remove=1)["removed"] == [1]        # the block before the last
    assert plan(prune_lake, method="reverse", remove=2)["removed"] == [0, 1]
    assert plan(prune_lake, method="alternating", remove=1)["removed"] == [1]
    assert plan(prune_lake, method="alternating", keep=1)["removed"] == [1, 2]   # L-2, then the rest from the end
    draws = {tuple(plan(prune_lake, method="random", remove=1, seed=s)["removed"]) for s in range(12)}
    assert plan(prune_lake, method="random", remove=1, seed=5)["removed"] == plan(prune_lake, method="random", remove=1, seed=5)["removed"]
    assert len(draws) > 1  # seeds matter
    assert plan(prune_lake, method="random", remove=1, seed=1, protect="0,-1")["removed"] == [1]
    assert plan(prune_lake, method="u-chop", remove=1)["removed"] == [1]          # the only middle block of three
    with pytest.raises(UserError, match="u-chop keeps the first and last"):
        plan(prune_lake, method="u-chop", remove=2)
    # evidence methods refuse runs without stored vectors; blind ones only need the depth
    with pytest.raises(UserError, match="stored no vectors"):
        plan(prune_lake, run="bare", method="block-influence", remove=1)
    assert plan(prune_lake, run="bare", method="reverse", remove=1)["removed"] == [1]


@pytest.mark.parametrize("kw, msg", [
    (dict(method="reverse", remove=3), "must remove at least 1 and keep at least 1"),
    (dict(method="reverse", keep=3), "must remove at least 1"),
    (dict(method="reverse", remove=1, run="nope"), "no run 'nope'"),
    (dict(method="reverse", remove=1, protect="7"), "--protect: block 7 is out of range"),
    (dict(method="reverse", remove=3, protect="0"), "must remove at least 1"),
    (dict(method="variance", remove=1), "no layer statistics"),
])
def test_refusals(prune_lake, kw, msg):
    with pytest.raises(UserError, match=msg):
        plan(prune_lake, **kw)


def test_read_plan_refuses_bad_files(tmp_path):
    def write(d):
        p = tmp_path / "p.json"
        p.write_text(json.dumps(d))
        return p

    with pytest.raises(UserError, match="the embedding"):
        read_plan(write({"removed": [-1, 2]}), 4)
    with pytest.raises(UserError, match="--plan .*block 9 is out of range"):
        read_plan(write({"removed": [1, 9]}), 4)
    with pytest.raises(UserError, match="cannot remove every block"):
        read_plan(write({"removed": [0, 1, 2, 3]}), 4)
    with pytest.raises(UserError, match="not JSON"):
        (tmp_path / "x.json").write_text("{")
        read_plan(tmp_path / "x.json", 4)
    assert spans([5, 1, 2, 7, 8, 9]) == [(1, 2), (5, 5), (7, 9)]
