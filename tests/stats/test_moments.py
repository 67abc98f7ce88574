"""Mergeable moments against numpy on the whole: random splits merged in random orders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tourray.stats.moments import CrossMoments, Moments

REL = 1e-10  # float64 merge vs one numpy pass


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def random_parts(rng, n, k):
    cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False))
    return np.split(np.arange(n), cuts)


@pytest.mark.parametrize("weighted", [False, True])
def test_random_splits_merged_in_random_order_equal_numpy(weighted):
    rng = np.random.default_rng(0)
    n, d = 3001, 24
    x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + 50.0).astype(np.float32)  # far from 0: merge must be exact
    y = x @ rng.normal(size=(d, 16)) + rng.normal(size=(n, 16))
    w = rng.uniform(0.0, 3.0, size=n) if weighted else None
    parts = random_parts(rng, n, 17)
    mx = [Moments.of(x[p], None if w is None else w[p]) for p in parts]
    mxy = [CrossMoments.of(x[p], y[p], None if w is None else w[p]) for p in parts]
    order = rng.permutation(len(parts))
    # merge as a random binary tree: pop two, push their merge
    pool = [(mx[i], mxy[i]) for i in order]
    while len(pool) > 1:
        i, j = sorted(rng.choice(len(pool), 2, replace=False))
        b, a = pool.pop(j), pool.pop(i)
        pool.append((a[0] + b[0], a[1] + b[1]))
    m, c = pool[0]
    x64, ww = x.astype(np.float64), (np.ones(n) if w is None else w)
    mean = ww @ x64 / ww.sum()
    assert m.n == n and m.w == pytest.approx(ww.sum(), rel=1e-12)
    assert rel(m.mean, mean) < REL
    assert rel(m.cov, np.cov(x64, rowvar=False, aweights=ww, bias=True)) < REL
    ymean = ww @ y / ww.sum()
    assert rel(c.cross_cov, ((x64 - mean) * ww[:, None]).T @ (y - ymean) / ww.sum()) < REL
    assert rel(m.absmax, np.abs(x64).max(0)) == 0
    norms = np.linalg.norm(x64, axis=1)
    assert m.mean_norm == pytest.approx(ww @ norms / ww.sum(), rel=REL)
    assert m.rms == pytest.approx(np.sqrt(ww @ (x64 ** 2).sum(1) / ww.sum() / d), rel=REL)


def test_pair_scalars_and_per_channel_summaries():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 8))
    a[:, 0] = 0.0
    a[::3, 1] = 1e-4
    b = a + 0.3 * rng.normal(size=a.shape)
    w = rng.uniform(0.5, 2, size=500)
    c = CrossMoments.of(a[:200], b[:200], w[:200]) + CrossMoments.of(a[200:], b[200:], w[200:])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert c.mean_cos == pytest.approx(w @ cos / w.sum(), rel=1e-12)
    assert c.mean_angular == pytest.approx(w @ (np.arccos(cos) / np.pi) / w.sum(), rel=1e-12)
    assert c.rel_rms_diff == pytest.approx(np.sqrt(w @ ((b - a) ** 2).sum(1) / (w @ (a ** 2).sum(1))), rel=1e-12)
    m = Moments.of(a, w, full=False, near_zero=1e-3)
    assert m.frac_near_zero[0] == pytest.approx(1.0)
    assert m.frac_near_zero[1] == pytest.approx(w[::3].sum() / w.sum() + w[np.abs(a[:, 1]) <= 1e-3].sum() / w.sum()
                                                - w[::3][np.abs(a[::3, 1]) <= 1e-3].sum() / w.sum())
    assert rel(m.var, np.cov(a, rowvar=False, aweights=w, bias=True).diagonal()) < REL


def test_torch_updates_equal_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    mt, mn = Moments(12), Moments(12)
    for p in np.array_split(np.arange(300), 7):
        mt.update(torch.from_numpy(x[p]))
        mn.update(x[p])
    mt = mt.to_numpy()
    assert isinstance(mt.m2, np.ndarray)
    assert rel(mt.m2, mn.m2) < 1e-12 and rel(mt.mean, mn.mean) < 1e-12 and mt.norm_w == pytest.approx(mn.norm_w)


def test_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="expected"):
        Moments(4).update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="cannot merge"):
        Moments(4) + Moments.of(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="weights"):
        Moments.of(np.zeros((3, 4)), np.ones(2))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "np.float16", "np.float32"])
@pytest.mark.parametrize("full", [True, False])
def test_a_low_precision_batch_counts_near_zero_as_its_float64_copy_would(dtype, full):
    """|x|, its maximum and the near-zero count run in the batch's own dtype (a capture's float32 or
    bfloat16): each must equal what the float64 copy gives, also for values that round to the
    threshold in that dtype (float32(1e-3) > 1e-3); the sums agree to float64 rounding."""
    rng = np.random.default_rng(3)
    nz = 1e-3
    x = rng.normal(scale=2e-3, size=(400, 6))
    if dtype.startswith("np."):
        x = x.astype(getattr(np, dtype[3:]))
        x[:50, 0] = x.dtype.type(nz)  # nz rounded to the dtype: above 1e-3 in float16 and float32
        x[50:60, 1] = -x.dtype.type(nz)
        lo, ref = x, x.astype(np.float64)
    else:
        lo = torch.from_numpy(x).to(getattr(torch, dtype))
        lo[:50, 0] = torch.tensor(nz, dtype=torch.float64).to(lo.dtype)
        lo[50:60, 1] = -lo[0, 0]
        ref = lo.to(torch.float64).numpy()
    m, m64 = Moments.of(lo, full=full, near_zero=nz).to_numpy(), Moments.of(ref, full=full, near_zero=nz)
    assert rel(m.zero_w, m64.zero_w) == 0 and rel(m.absmax, m64.absmax) == 0
    # the rounded threshold itself (rows 0-49): counted only where it is <= 1e-3 (bfloat16), not in float16 / float32
    assert m.zero_w[0] == 50 * (float(ref[0, 0]) <= nz) + (np.abs(ref[50:, 0]) <= nz).sum()
    assert rel(m.abs_w, m64.abs_w) < 1e-12 and rel(m.mean, m64.mean) < 1e-12 and rel(m.m2, m64.m2) < 1e-12
    assert m.norm_w == pytest.approx(m64.norm_w, rel=1e-12)
    assert lo.dtype != torch.float64 and np.asarray(ref).dtype == np.float64  # the caller's batch is left as it was
    again = Moments.of(lo, full=full, near_zero=nz).to_numpy()
    assert rel(again.m2, m.m2) == 0
