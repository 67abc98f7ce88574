"""The pruning tests' lake: the 3-block Qwen3 captured once with both sites in float32 (so that
numpy recomputations from the stored vectors are exact references), and once with tokens only."""

from __future__ import annotations

import numpy as np
import pytest

from tourray.capture import CaptureConfig, run_capture
from tourray.lake import Lake, arrow_to_numpy


@pytest.fixture(scope="session")
def lake(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("prune_lake")
    for run, extra in (("full", dict(sites="resid_post,resid_mid")), ("bare", dict(layers="none"))):
        run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(root), run=run,
                                  store_dtype="float32", batch_size=2, group_size=3, stats=[], **extra), progress=False)
    return root


@pytest.fixture(scope="session")
def vectors(lake):
    """vectors(site) -> ({layer: {sample_id: [n, d] float64}}, {sample_id: text span}) of run `full`,
    read straight from the activations table: the independent reference."""
    return lambda site="resid_post": _vectors(lake, "full", site)


def _vectors(lake, run, site):
    lk = Lake(str(lake))
    spans_ = {r["sample_id"]: (r["text_start"], r["text_end"]) for r in lk.read("samples", filter=f"run = '{run}'").to_pylist()}
    t = lk.read("activations", filter=f"run = '{run}' AND site = '{site}'").sort_by([("layer", "ascending"), ("sample_id", "ascending"), ("pos", "ascending")])
    h = arrow_to_numpy(t.column("h"), np.float64)
    out = {}
    for layer in sorted(set(t.column("layer").to_pylist())):
        rows = np.flatnonzero(t.column("layer").to_numpy() == layer)
        sid = np.array(t.column("sample_id").to_pylist())[rows]
        out[layer] = {s: h[rows[sid == s]] for s in spans_}
    return out, spans_


