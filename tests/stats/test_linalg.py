"""Closed-form solves from merged moments (tourray.stats.linalg) against numpy / scipy on the token matrices.

Tolerances are stated at each assertion; all quantities are float64. Moments are built with
`Moments.of` / `CrossMoments.of` ("one") and, where parametrised, by `update` over random splits
("merged"), so merged moments are shown to give the same answers as one pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from tourray.stats.linalg import cka, lstsq, map_diagnostics, pca, procrustes
from tourray.stats.moments import CrossMoments, Moments


def _data(rng, n, d, offset=1.5):
    """Anisotropic, off-centre data with a well-separated spectrum (stable eigenvectors)."""
    scales = np.geomspace(4.0, 0.3, d)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (rng.standard_normal((n, d)) * scales) @ basis.T + offset * rng.standard_normal(d)


def _splits(rng, n, parts=5):
    cuts = np.sort(rng.choice(np.arange(1, n), parts - 1, replace=False))
    return np.split(rng.permutation(n), cuts)


def _moments(a, b, how="one", weights=None, seed=0):
    """(Moments of a, Moments of b, CrossMoments of a, b), in one pass or merged from random splits."""
    if how == "one":
        return Moments.of(a, weights), Moments.of(b, weights), CrossMoments.of(a, b, weights)
    rng = np.random.default_rng(seed)
    m_a, m_b, x = Moments(a.shape[1]), Moments(b.shape[1]), CrossMoments(a.shape[1], b.shape[1])
    for idx in _splits(rng, a.shape[0]):
        v = None if weights is None else weights[idx]
        m_a.update(a[idx], v)
        m_b.update(b[idx], v)
        x.update(a[idx], b[idx], v)
    return m_a, m_b, x


def _sign_fix(v):
    rows = np.abs(v).argmax(0)
    return v * np.where(v[rows, np.arange(v.shape[1])] < 0, -1.0, 1.0)


def _rel(x, y):
    return np.abs(x - y).max() / np.abs(y).max()


def _rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# -- PCA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["one", "merged"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pca_equals_numpy(how, weighted):
    rng = np.random.default_rng(1)
    a = _data(rng, 600, 12)
    w = rng.uniform(0.1, 3.0, len(a)) if weighted else None
    m = _moments(a, a[:, :2], how, w)[0]
    cov = np.cov(a.T, aweights=w, bias=True)
    lam, vec = np.linalg.eigh(cov)
    lam, vec = lam[::-1], _sign_fix(vec[:, ::-1])
    p = pca(m)
    assert _rel(p.eigenvalues, lam) < 1e-10                     # relative 1e-10
    assert np.abs(p.components - vec).max() < 1e-10            # unit vectors: 1e-10
    assert np.abs(p.mean - np.average(a, 0, w)).max() < 1e-10
    assert _rel(p.explained, np.cumsum(lam) / lam.sum()) < 1e-10
    assert abs(p.effective_rank - lam.sum() ** 2 / (lam**2).sum()) < 1e-10 * p.effective_rank
    assert np.all(np.diff(p.eigenvalues) <= 0) and p.explained[-1] == pytest.approx(1.0, abs=1e-12)
    rows = np.abs(p.components).argmax(0)
    assert np.all(p.components[rows, np.arange(12)] > 0)        # deterministic signs
    pk = pca(m, 4)
    assert pk.components.shape == (12, 4) and np.array_equal(pk.components, p.components[:, :4])
    with pytest.raises(ValueError, match="k="):
        pca(m, 13)


# -- Procrustes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["one", "merged"])
def test_procrustes_equals_scipy(how):
    rng = np.random.default_rng(2)
    a, b = _data(rng, 400, 10), _data(rng, 400, 10)
    b = b + 0.5 * a @ _rotation(rng, 10)                        # some real alignment
    m_a, m_b, x = _moments(a, b, how)
    r_unc = scipy.linalg.orthogonal_procrustes(a, b)[0]
    got = procrustes(m_a, m_b, x, center=False)
    assert np.abs(got.matrix - r_unc).max() < 1e-8              # uncentred: 1e-8
    assert np.array_equal(got.bias, np.zeros(10)) and got.orth_error < 1e-12
    ac, bc = a - a.mean(0), b - b.mean(0)
    r_c, scale = scipy.linalg.orthogonal_procrustes(ac, bc)
    got = procrustes(m_a, m_b, x, center=True)
    assert np.abs(got.matrix - r_c).max() < 1e-8                # centred: 1e-8
    assert np.abs(got.bias - (b.mean(0) - a.mean(0) @ r_c)).max() < 1e-8
    assert abs(got.singular_values.sum() * len(a) - scale) < 1e-8 * scale  # singular values of C_ab


@pytest.mark.parametrize("noise", [0.0, 1e-9])
@pytest.mark.parametrize("center", [False, True])
def test_procrustes_recovers_planted_rotation(noise, center):
    rng = np.random.default_rng(3)
    a = _data(rng, 300, 16)
    q = _rotation(rng, 16)
    b = a @ q + noise * rng.standard_normal(a.shape)
    got = procrustes(*_moments(a, b), center=center)
    assert np.abs(got.matrix - q).max() < 1e-6                  # planted rotation: 1e-6
    assert np.abs(got.rotation - q).max() < 1e-6
    assert got.orth_error < 1e-12


@pytest.mark.parametrize("center", [False, True])
def test_procrustes_differing_widths_lifts_pca_solution(center):
    rng = np.random.default_rng(4)
    a = _data(rng, 500, 10)
    b = np.hstack([a[:, :6] @ _rotation(rng, 6), rng.standard_normal((500, 1))]) + 0.1 * _data(rng, 500, 7)
    m_a, m_b, x = _moments(a, b, "merged")
    k = 5
    with pytest.raises(ValueError, match=r"\bk\b"):
        procrustes(m_a, m_b, x)
    p_a = np.linalg.eigh(np.cov(a.T, bias=True))[1][:, ::-1][:, :k]   # independent PCA (numpy)
    p_b = np.linalg.eigh(np.cov(b.T, bias=True))[1][:, ::-1][:, :k]
    ap, bp = (a - a.mean(0), b - b.mean(0)) if center else (a, b)
    r = scipy.linalg.orthogonal_procrustes(ap @ p_a, bp @ p_b)[0]
    got = procrustes(m_a, m_b, x, center=center, k=k)
    assert got.matrix.shape == (10, 7) and got.rotation.shape == (k, k)
    assert np.abs(got.matrix - p_a @ r @ p_b.T).max() < 1e-8    # lifted map, sign-invariant: 1e-8
    assert got.orth_error < 1e-12


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_procrustes_whitened_equals_explicit(ridge):
    rng = np.random.default_rng(5)
    a, b = _data(rng, 400, 8), _data(rng, 400, 8)
    b = b + a @ _rotation(rng, 8)
    m_a, m_b, x = _moments(a, b, "merged")
    ac, bc = a - a.mean(0), b - b.mean(0)
    c_a, c_b = ac.T @ ac / len(a) + ridge * np.eye(8), bc.T @ bc / len(b) + ridge * np.eye(8)
    a_is, b_is = np.linalg.inv(scipy.linalg.sqrtm(c_a)), np.linalg.inv(scipy.linalg.sqrtm(c_b))
    r = scipy.linalg.orthogonal_procrustes(ac @ a_is, bc @ b_is)[0]
    got = procrustes(m_a, m_b, x, whiten=True, ridge=ridge)
    assert np.abs(got.rotation - r).max() < 1e-8                # whitened rotation: 1e-8
    want = a_is @ r @ scipy.linalg.sqrtm(c_b)
    assert _rel(got.matrix, want) < 1e-8                        # map in original coordinates: 1e-8
    with pytest.raises(ValueError, match="whiten"):
        procrustes(m_a, m_b, x, ridge=0.1)


def test_procrustes_whiten_singular_needs_ridge():
    rng = np.random.default_rng(6)
    a = _data(rng, 100, 6)
    a[:, 5] = a[:, 0]                                            # rank 5
    m_a, m_b, x = _moments(a, a)
    with pytest.raises(ValueError, match="ridge"):
        procrustes(m_a, m_b, x, whiten=True)
    assert np.isfinite(procrustes(m_a, m_b, x, whiten=True, ridge=1e-3).matrix).all()


# -- least squares ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["one", "merged"])
def test_lstsq_equals_numpy(how):
    rng = np.random.default_rng(7)
    a = _data(rng, 500, 9)
    b = a @ rng.standard_normal((9, 6)) + 0.7 + 0.3 * rng.standard_normal((500, 6))
    m_a, m_b, x = _moments(a, b, how)
    sol = np.linalg.lstsq(np.hstack([a, np.ones((500, 1))]), b, rcond=None)[0]
    got = lstsq(m_a, m_b, x)
    assert np.abs(got.matrix - sol[:-1]).max() < 1e-8           # W: 1e-8
    assert np.abs(got.bias - sol[-1]).max() < 1e-8              # intercept: 1e-8
    got = lstsq(m_a, m_b, x, fit_intercept=False)
    assert np.abs(got.matrix - np.linalg.lstsq(a, b, rcond=None)[0]).max() < 1e-8  # no intercept: 1e-8
    assert np.array_equal(got.bias, np.zeros(6))


@pytest.mark.parametrize("weighted", [False, True])
def test_ridge_equals_closed_form(weighted):
    rng = np.random.default_rng(8)
    a = _data(rng, 300, 7)
    b = a @ rng.standard_normal((7, 5)) + rng.standard_normal((300, 5))
    v = rng.uniform(0.2, 2.0, 300) if weighted else np.ones(300)
    lam = 0.3
    mu_a, mu_b = np.average(a, 0, v), np.average(b, 0, v)
    ac, bc = a - mu_a, b - mu_b
    w_want = np.linalg.solve(ac.T @ (ac * v[:, None]) + lam * v.sum() * np.eye(7), ac.T @ (bc * v[:, None]))
    got = lstsq(*_moments(a, b, "merged", v if weighted else None), ridge=lam)
    assert np.abs(got.matrix - w_want).max() < 1e-8             # ridge W: 1e-8
    assert np.abs(got.bias - (mu_b - mu_a @ w_want)).max() < 1e-8
    w0 = np.linalg.solve(a.T @ (a * v[:, None]) + lam * v.sum() * np.eye(7), a.T @ (b * v[:, None]))
    got = lstsq(*_moments(a, b, "one", v if weighted else None), ridge=lam, fit_intercept=False)
    assert np.abs(got.matrix - w0).max() < 1e-8                 # ridge without intercept: 1e-8


def test_lstsq_rank_deficient_predictions_equal_numpy():
    rng = np.random.default_rng(9)
    a = _data(rng, 200, 6)
    a[:, 5] = 2 * a[:, 1]                                        # singular A^T A: min-norm fallback
    b = a @ rng.standard_normal((6, 3)) + rng.standard_normal((200, 3))
    got = lstsq(*_moments(a, b))
    a1 = np.hstack([a, np.ones((200, 1))])
    want = a1 @ np.linalg.lstsq(a1, b, rcond=None)[0]
    assert np.abs(got.apply(a) - want).max() < 1e-8             # predictions are unique: 1e-8


# -- CKA -------------------------------------------------------------------------------------------


def _gram_cka(a, b):
    n = len(a)
    h = np.eye(n) - 1.0 / n
    k, l = h @ (a @ a.T) @ h, h @ (b @ b.T) @ h
    return float(np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l)))


@pytest.mark.parametrize("how", ["one", "merged"])
def test_cka_equals_gram_and_invariances(how):
    rng = np.random.default_rng(10)
    a = _data(rng, 200, 8)
    b = np.tanh(a[:, :5] @ rng.standard_normal((5, 6))) + 0.5 * _data(rng, 200, 6)
    got = cka(*_moments(a, b, how))
    assert abs(got - _gram_cka(a, b)) < 1e-9                    # Gram-matrix CKA: 1e-9
    assert 0 < got < 1
    q = _rotation(rng, 6)
    assert abs(cka(*_moments(a, b @ q, how)) - got) < 1e-9      # orthogonal transform of B: 1e-9
    assert abs(cka(*_moments(3.7 * a, b, how)) - got) < 1e-9    # isotropic scaling: 1e-9
    assert abs(cka(*_moments(a, 0.02 * b @ q, how)) - got) < 1e-9
    assert abs(cka(*_moments(a, a, how)) - 1.0) < 1e-12         # CKA(A, A) = 1


# -- held-out diagnostics --------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_map_diagnostics_residual_equals_direct(weighted):
    rng = np.random.default_rng(11)
    a = _data(rng, 700, 8)
    b = a @ _rotation(rng, 8) * 1.1 + 0.4 + 0.3 * rng.standard_normal((700, 8))
    tr, ho = slice(0, 400), slice(400, 700)
    v = rng.uniform(0.2, 2.0, 700) if weighted else np.ones(700)
    held = _moments(a[ho], b[ho], "merged", v[ho] if weighted else None)
    for fit in (lstsq(*_moments(a[tr], b[tr]), ridge=0.01), procrustes(*_moments(a[tr], b[tr])),
                procrustes(*_moments(a[tr], b[tr]), center=False)):
        d = map_diagnostics(fit, *held)
        r = fit.apply(a[ho]) - b[ho]
        bc = b[ho] - np.average(b[ho], 0, v[ho])
        want = (v[ho] @ (r * r).sum(1)) / (v[ho] @ (bc * bc).sum(1))
        assert abs(d["rel_residual"] - want) < 1e-8 * want      # exact from moments: relative 1e-8
        assert 0 < d["rel_residual"] < d["rel_residual_identity"]
        assert d["orth_error"] == fit.orth_error or np.isnan(d["orth_error"]) and fit.kind == "lstsq"
    diff = a[ho] - b[ho]
    assert abs(d["rel_residual_identity"] - (v[ho] @ (diff * diff).sum(1)) / (v[ho] @ (bc * bc).sum(1))) < 1e-8
