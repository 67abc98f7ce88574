"""Inline statistics in the capture actor: equal to `tourray stats` on the stored vectors, exact
on resume, and usable with no vectors stored."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from conftest import lake_snapshot
from tourray.capture import CaptureConfig, run_capture
from tourray.errors import UserError
from tourray.lake.tables import Lake
from tourray.model.prompt import PromptFormat
from tourray.stats.inline import INLINE_SELECTION
from tourray.stats.tasks import StatsConfig, read_moments, run_stats

KW = dict(store_dtype="float32", batch_size=2, group_size=2, stats="moments,pairs")


def capture(model, samples, lake, run="r", **kw):
    return run_capture(CaptureConfig(model=str(model), samples=str(samples), lake=str(lake), run=run, **(KW | kw)),
                       progress=False)


def latest(lake, table, origin, **where):
    cond = " AND ".join([f"origin = '{origin}'"] + [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in where.items()])
    rows = Lake(lake).read(table, filter=cond).to_pylist()
    return sorted(rows, key=lambda r: r["created_at"])[-1]


def test_inline_equals_offline_stats_on_stored_vectors(qwen3_model, corpus_dir, tmp_path, ray_session):
    lake = tmp_path / "lake"
    s = capture(qwen3_model, corpus_dir, lake, sites="resid_post,resid_mid")
    assert s["inline_stats"]["groups"] == 3 and s["inline_stats"]["layers"] == 4 + 3
    run_stats(StatsConfig(lake=str(lake), run="r", sites="resid_post,resid_mid", pairs="consecutive", recompute=True),
              progress=False)
    for site, layers in (("resid_post", [-1, 0, 1, 2]), ("resid_mid", [0, 1, 2])):
        for layer in layers:
            a = latest(lake, "layer_stats", "capture", layer=layer, site=site)
            b = latest(lake, "layer_stats", "stats", layer=layer, site=site)
            assert a["n_tokens"] == b["n_tokens"] > 0
            for f in ("mean_norm", "rms", "effective_rank", "importance_magnitude", "importance_variance"):
                assert a[f] == pytest.approx(b[f], rel=1e-9), (site, layer, f)   # inline = offline: 1e-9
            for f in ("channel_mean", "channel_var", "eigenvalues"):
                np.testing.assert_allclose(a[f], b[f], rtol=1e-9, atol=1e-12 * np.abs(b[f]).max())
        for la, lb in zip(layers, layers[1:]):
            a = latest(lake, "pair_stats", "capture", layer_a=la, layer_b=lb, site=site)
            b = latest(lake, "pair_stats", "stats", layer_a=la, layer_b=lb, site=site)
            for f in ("mean_cos", "mean_angular", "cka", "rel_rms_diff"):
                assert a[f] == pytest.approx(b[f], rel=1e-9), (site, la, lb, f)


def test_mlp_and_head_channels_equal_an_independent_recompute(qwen3_model, corpus_dir, tmp_path, ray_session):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lake = tmp_path / "lake"
    capture(qwen3_model, corpus_dir, lake, layers="all", store="none")
    assert not Lake(lake).exists("activations")  # statistics of every layer, vectors of none
    tok = AutoTokenizer.from_pretrained(qwen3_model)
    model = AutoModelForCausalLM.from_pretrained(qwen3_model, dtype=torch.float32).eval()
    seen = {}
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.update(mlp=a[0][0]))
    model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(head=a[0][0]))
    mlp, head = [], []
    for r in Lake(lake).read("samples").to_pylist():
        ids = PromptFormat(tok, "").encode(r["text"]).input_ids
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids)[None])
        sl = slice(r["text_start"], r["text_end"])
        mlp.append(seen["mlp"][sl].double().numpy())
        head.append(seen["head"][sl].double().reshape(-1, 2, 64).norm(dim=-1).numpy())
    mlp, head = np.concatenate(mlp), np.concatenate(head)
    lk = Lake(lake)
    src = latest(lake, "layer_stats", "capture", layer=1, site="resid_post")["source"]
    m = read_moments(lk, "r", "mlp_act", INLINE_SELECTION.key(), src, "mlp", 1)
    h = read_moments(lk, "r", "head_out", INLINE_SELECTION.key(), src, "head", 1)
    assert m.d == 256 and h.d == 2 and m.n == len(mlp)
    np.testing.assert_allclose(m.mean, mlp.mean(0), rtol=1e-5, atol=1e-7)   # float32 model, batched vs alone
    np.testing.assert_allclose(m.var, mlp.var(0), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(h.mean, head.mean(0), rtol=1e-5)
    # `tourray stats` reuses inline results for layers that have no stored vectors ...
    again = run_stats(StatsConfig(lake=str(lake), run="r"), progress=False)["sites"]["resid_post"]
    assert again["tiles"] == 0 and again["reused_layers"] == 4
    # ... and refuses to recompute them
    before = lake_snapshot(lake)
    with pytest.raises(UserError, match="stored no vectors"):
        run_stats(StatsConfig(lake=str(lake), run="r", layers="1", recompute=True), progress=False)
    assert lake_snapshot(lake) == before


def test_killed_group_is_recounted_once(qwen3_model, corpus_dir, tmp_path, ray_session):
    lake = tmp_path / "lake"
    capture(qwen3_model, corpus_dir, lake, store="none", layers="embed,0-2")
    whole = latest(lake, "layer_stats", "capture", layer=1, site="resid_post")
    # a kill after a group's statistics were committed but before its samples row: drop the samples
    # rows of one group, as if that commit never happened
    import json

    lk = Lake(lake)
    part = lk.read("moments", ["sources"], filter="kind = 'layer_part'").column(0)[0].as_py()
    victims = json.loads(part)["group"]  # the samples of one capture group
    lk.dataset("samples").delete("sample_id IN ({})".format(", ".join(f"'{v}'" for v in victims)))
    s = capture(qwen3_model, corpus_dir, lake, store="none", layers="embed,0-2")
    assert s["captured"] == 2
    again = latest(lake, "layer_stats", "capture", layer=1, site="resid_post")
    assert again["n_tokens"] == whole["n_tokens"]  # counted once, not twice
    # the group is re-run in a new actor process: its float32 forward can differ from the first run
    # by ~1e-5 relative (seen once in a full suite run: BLAS reductions), far below a double count
    np.testing.assert_allclose(again["channel_var"], whole["channel_var"], rtol=1e-4)
    assert again["rms"] == pytest.approx(whole["rms"], rel=1e-4)


def test_store_without_stats_is_refused(qwen3_model, corpus_dir, tmp_path, ray_session):
    with pytest.raises(UserError, match="no --stats"):
        capture(qwen3_model, corpus_dir, tmp_path / "lake", store="0", stats=[])
    with pytest.raises(UserError, match="not hooked"):
        capture(qwen3_model, corpus_dir, tmp_path / "lake", layers="0", store="1")
    assert not (tmp_path / "lake").exists() or not list((tmp_path / "lake").glob("*.lance"))


def _local(model, samples, lake, **kw):
    """An in-process capture (no actor pool): the same tables and commits, faster."""
    return run_capture(CaptureConfig(model=str(model), samples=str(samples), lake=str(lake), run="r",
                                     **(KW | dict(store="none", layers="embed,0-2") | kw)), progress=False,
                       executor="local")


def _capture_rows(lake):
    lk = Lake(lake)
    return (lk.read("layer_stats", ["layer"], filter="run = 'r' AND origin = 'capture'").num_rows,
            lk.read("pair_stats", ["layer_a"], filter="run = 'r' AND origin = 'capture'").num_rows,
            lk.read("moments", ["kind"], filter="run = 'r' AND kind NOT LIKE '%_part'").num_rows)



@contextlib.contextmanager
def killed_at_append(table: str, monkeypatch):
    """The merge dies at its append to `table` (the body must raise it); appends work again after."""
    real = Lake.append

    def dying(self, name, data, expected):
        if name == table:
            raise RuntimeError("killed inside the merge")
        return real(self, name, data, expected)

    monkeypatch.setattr(Lake, "append", dying)
    with pytest.raises(RuntimeError, match="inside the merge"):
        yield
    monkeypatch.setattr(Lake, "append", real)


def test_merge_killed_inside_is_redone_on_resume(qwen3_model, corpus_dir, tmp_path, monkeypatch):
    """A capture dies inside the merge, after its merged moments were committed, before its layer rows:
    nothing is pending on resume, `layer_stats` exists (the merge made it), yet the run has no merged
    layer or pair rows. The resume must merge (decided per run), not skip it."""
    from tourray.stats.inline import finalized

    lake = tmp_path / "lake"
    with killed_at_append("layer_stats", monkeypatch):
        _local(qwen3_model, corpus_dir, lake)
    assert Lake(lake).exists("layer_stats") and _capture_rows(lake)[:2] == (0, 0) and not finalized(Lake(lake), "r")
    s = _local(qwen3_model, corpus_dir, lake)
    assert s["captured"] == 0 and s["inline_stats"]["layers"] == 4
    assert _capture_rows(lake) == (4, 3, 4 + 3 + 3 + 3)  # layers, pairs; merged moments: + mlp, head per block
    assert finalized(Lake(lake), "r")
    assert "inline_stats" not in _local(qwen3_model, corpus_dir, lake)  # done: not merged again


def test_merge_writes_new_rows_before_deleting_old(qwen3_model, corpus_dir, tmp_path, monkeypatch):
    """A re-merge that dies after writing part of its rows leaves the previous merge's rows readable;
    the next merge leaves exactly one merge's rows."""
    from tourray.stats.inline import finalize

    lake = tmp_path / "lake"
    _local(qwen3_model, corpus_dir, lake)
    whole = _capture_rows(lake)
    assert whole == (4, 3, 13)
    with killed_at_append("pair_stats", monkeypatch):
        finalize(Lake(lake), "r")
    rows = _capture_rows(lake)
    assert rows[1] == 3 and rows[0] >= 4 and rows[2] >= 13  # nothing lost (the new rows are there too)
    finalize(Lake(lake), "r")
    assert _capture_rows(lake) == whole
