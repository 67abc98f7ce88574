"""Closed-form solves from merged moments: PCA, linear CKA, orthogonal Procrustes, least squares.

Every function here reads only `Moments` / `CrossMoments` (tourray.stats.moments), never token
matrices: the lake streams tokens through the accumulators elsewhere, merges them exactly, and the
solves below are small d x d float64 linear algebra on the result, so they cost the same for a
thousand tokens or ten million.

Conventions (all functions):
- Row vectors. A map takes a row vector x [d_a] to ``x @ matrix + bias`` [d_b]; a stream of tokens is
  a matrix A [n, d_a] whose rows are tokens, mapped to ``A @ matrix + bias``.
- Weighted tokens. With per-token weights w_i, every sum below is a weighted sum and every
  "covariance" is the population one, ``m2 / w`` (w = sum of weights). Unit weights give the plain
  (bias=True) covariance.
- Scale. Matrices are solved at covariance scale (moments divided by w), so reported singular values
  and ridge constants do not grow with the number of tokens.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg

from tourray.stats.moments import CrossMoments, Moments

__all__ = ["PCA", "Map", "pca", "cka", "procrustes", "lstsq", "map_diagnostics"]


# -- results ---------------------------------------------------------------------------------------


@dataclass
class PCA:
    """Principal directions of one stream (of its centred, weighted covariance).

    components [d, k]: unit eigenvectors as columns, in order of descending eigenvalue, each sign fixed
    so that its largest-|entry| is positive (deterministic across runs and merge orders). Project a row
    vector with ``(x - mean) @ components``.
    eigenvalues [d]: the whole spectrum, descending, clipped at 0 (round-off of a PSD matrix).
    explained [d]: cumulative explained-variance ratio, ``cumsum(eigenvalues) / sum(eigenvalues)``.
    effective_rank: participation ratio ``(sum l)^2 / sum l^2`` over the whole spectrum.
    """

    components: np.ndarray
    eigenvalues: np.ndarray
    explained: np.ndarray
    effective_rank: float
    mean: np.ndarray


@dataclass
class Map:
    """A linear map between two streams, row-vector convention: ``b_hat = a @ matrix + bias``.

    matrix [d_a, d_b]; bias [d_b] (zeros when fitted without centring / intercept).
    rotation: the orthogonal factor of a Procrustes solve ([d, d], or [k, k] in the shared PCA
    space when ``basis_a``/``basis_b`` are set; then ``matrix = basis_a @ rotation @ basis_b.T``
    without whitening); None for least squares.
    singular_values: Procrustes: of the (projected / whitened) cross-covariance the rotation comes from
    (their sum is the achieved alignment); least squares: of the fitted ``matrix``.
    orth_error: ``max |R^T R - I|`` of ``rotation``; nan when there is none.
    kind: "procrustes" or "lstsq"; params: the arguments that produced it.
    """

    matrix: np.ndarray
    bias: np.ndarray
    rotation: np.ndarray | None
    singular_values: np.ndarray
    orth_error: float
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    basis_a: np.ndarray | None = None     # [d_a, k] PCA basis of side a, when solved in a shared k
    basis_b: np.ndarray | None = None     # [d_b, k]

    def apply(self, x) -> np.ndarray:
        """Map row vectors x [n, d_a] (or one [d_a]) to ``x @ matrix + bias``."""
        return np.asarray(x, dtype=np.float64) @ self.matrix + self.bias


# -- helpers ---------------------------------------------------------------------------------------


def _np(m):
    """Moments on a torch device come home as numpy; numpy moments pass through."""
    probe = m.mean if isinstance(m, Moments) else m.mean_a
    return m if isinstance(probe, np.ndarray) else m.to_numpy()


def _check_one(m: Moments, what: str = "moments") -> Moments:
    if m.w <= 0 or m.mean is None:
        raise ValueError(f"{what} are empty (no tokens)")
    if not m.full:
        raise ValueError(f"{what} keep only the diagonal (full=False); solves need the full co-moment")
    return _np(m)


def _check(m_a: Moments, m_b: Moments, x: CrossMoments):
    """Same tokens on both sides: widths fit and the weight sums agree."""
    m_a, m_b = _check_one(m_a, "moments of a"), _check_one(m_b, "moments of b")
    if x.w <= 0 or x.mean_a is None:
        raise ValueError("cross moments are empty (no tokens)")
    if not x.keep_matrix or x.m_ab is None:
        raise ValueError("cross moments were built without the matrix (keep_matrix=False)")
    if (x.d_a, x.d_b) != (m_a.d, m_b.d):
        raise ValueError(f"cross moments are {x.d_a} x {x.d_b}, moments are d_a={m_a.d}, d_b={m_b.d}")
    if not (np.isclose(x.w, m_a.w, rtol=1e-9, atol=0) and np.isclose(x.w, m_b.w, rtol=1e-9, atol=0)):
        raise ValueError(f"moments are of different tokens: weight sums a={m_a.w}, b={m_b.w}, cross={x.w}")
    return m_a, m_b, _np(x)


def _sym(c: np.ndarray) -> np.ndarray:
    return (c + c.T) / 2


def _sym_pow(c: np.ndarray, p: float) -> np.ndarray:
    """c^p for a symmetric PSD c (eigendecomposition); refuses a negative power of a singular c."""
    lam, v = np.linalg.eigh(_sym(c))
    if p < 0:
        tiny = c.shape[0] * np.finfo(np.float64).eps * max(float(lam.max()), 0.0)
        if lam.min() <= tiny:
            raise ValueError(f"covariance is singular (smallest eigenvalue {lam.min():.3g}); "
                             "pass ridge > 0 to whiten")
    lam = np.clip(lam, 0.0, None)
    return (v * lam**p) @ v.T


def _polar(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The orthogonal R = U V^T maximising tr(R^T m) (m = U S V^T), and S."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u @ vt, s


def _orth_error(r: np.ndarray) -> float:
    return float(np.abs(r.T @ r - np.eye(r.shape[1])).max())


def _solve_pd(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    """g^{-1} h for symmetric PSD g: Cholesky when well posed, else the minimum-norm lstsq solution."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            return scipy.linalg.solve(g, h, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, scipy.linalg.LinAlgWarning):
        return scipy.linalg.lstsq(g, h)[0]


# -- solves ----------------------------------------------------------------------------------------


def pca(m: Moments, k: int | None = None) -> PCA:
    """PCA of one stream from its merged moments: ``eigh`` of the covariance ``m2 / w``.

    Why from moments: the d x d covariance is all PCA needs, and it merges exactly across shards, so
    the spectrum of ten million tokens costs one d x d eigendecomposition. k: how many components to
    keep (default all); the spectrum, explained curve and effective rank always cover all d.
    Row-vector convention: scores are ``(x - mean) @ components``.
    """
    m = _check_one(m)
    k = m.d if k is None else int(k)
    if not 1 <= k <= m.d:
        raise ValueError(f"k={k} must be in 1..{m.d}")
    lam, v = np.linalg.eigh(_sym(m.m2 / m.w))
    lam, v = np.clip(lam[::-1], 0.0, None), v[:, ::-1]
    v = v[:, :k]
    rows = np.abs(v).argmax(0)
    v = v * np.where(v[rows, np.arange(k)] < 0, -1.0, 1.0)
    total = lam.sum()
    sq = (lam * lam).sum()
    return PCA(components=np.ascontiguousarray(v), eigenvalues=lam,
               explained=np.cumsum(lam) / total if total > 0 else np.full(m.d, np.nan),
               effective_rank=float(total * total / sq) if sq > 0 else float("nan"),
               mean=np.asarray(m.mean, dtype=np.float64))


def spectrum(m: Moments) -> PCA:
    """The PCA spectrum alone (eigenvalues, explained curve, effective rank; no components): what a
    `layer_stats` row keeps. ``eigvalsh`` skips the eigenvectors, ~3x cheaper than ``eigh`` at d=2048."""
    m = _check_one(m)
    lam = np.clip(np.linalg.eigvalsh(_sym(m.m2 / m.w))[::-1], 0.0, None)
    total, sq = lam.sum(), (lam * lam).sum()
    return PCA(components=np.empty((m.d, 0)), eigenvalues=lam,
               explained=np.cumsum(lam) / total if total > 0 else np.full(m.d, np.nan),
               effective_rank=float(total * total / sq) if sq > 0 else float("nan"),
               mean=np.asarray(m.mean, dtype=np.float64))


def cka(m_a: Moments, m_b: Moments, x: CrossMoments) -> float:
    """Exact linear CKA of two aligned streams over all their tokens.

    ``||C_ab||_F^2 / (||C_aa||_F ||C_bb||_F)`` with the merged, weighted, centred covariances; equal to
    the Gram-matrix form <HKH, HLH> / (||HKH|| ||HLH||) (K = A A^T, L = B B^T) over the same tokens,
    without ever forming n x n matrices, and exact rather than an average of minibatch CKAs. Invariant
    to orthogonal transforms and isotropic scaling of either side; nan if a side has no variance.
    """
    m_a, m_b, x = _check(m_a, m_b, x)
    return cka_from_norms(float(np.sum(x.m_ab ** 2)), float(np.sum(m_a.m2 ** 2)), float(np.sum(m_b.m2 ** 2)))


def cka_from_norms(ab: float, aa: float, bb: float) -> float:
    """Linear CKA from the squared Frobenius norms of the centred co-moments M_ab, M_aa, M_bb over
    the same tokens (the 1/w^2 normalisations cancel). Layer-pair tiles use it: each layer's norm
    comes from the task that owns the layer, the cross norm from the pair's task."""
    den = math.sqrt(aa * bb)
    return ab / den if den > 0 else float("nan")


def _second(m: Moments, center: bool) -> np.ndarray:
    """Covariance (centred) or second moment about zero (uncentred), at covariance scale."""
    c = m.m2 / m.w
    return c if center else c + np.outer(m.mean, m.mean)


def _cross(x: CrossMoments, center: bool) -> np.ndarray:
    """Cross-covariance (centred) or A^T B / w (uncentred: m_ab + w mean_a mean_b^T, over w)."""
    c = x.m_ab / x.w
    return c if center else c + np.outer(x.mean_a, x.mean_b)


def procrustes(m_a: Moments, m_b: Moments, x: CrossMoments, *, center: bool = True, whiten: bool = False,
               ridge: float = 0.0, k: int | None = None) -> Map:
    """Orthogonal Procrustes: the orthogonal R minimising ``||A R - B||_F`` (row vectors, ``a @ R``).

    From the cross moment alone: R = U V^T for ``M = U S V^T``, with M = A^T B (uncentred:
    ``m_ab + w mean_a mean_b^T``; ``center=True``: ``m_ab``, and the bias ``mean_b - mean_a @ matrix``
    restores the means). Why: the rotation recipe between layers or models needs only these d x d sums.

    whiten: the recipe's whitened rotation. Each side is whitened by ``(C + ridge I)^{-1/2}``, C its
    covariance (centred or about zero, following ``center``) at covariance scale and ``ridge`` an
    ABSOLUTE constant added to C's eigenvalues (same units as the variances; not scaled by the mean
    eigenvalue or the token count). R is solved in whitened coordinates and the returned ``matrix`` is
    the map in original coordinates, ``C_a^{-1/2} R C_b^{1/2}``; ``rotation`` is R itself.
    ridge without whiten is refused (it would be ignored).

    k: solve in a shared k-dim PCA space, required when d_a != d_b. ``P_a`` [d_a, k], ``P_b`` [d_b, k]
    are each side's top-k principal directions (of the centred covariance, whatever ``center``); R
    (k x k) comes from ``P_a^T M P_b`` (and whitening, if asked, from ``P^T C P``) and is lifted to
    ``matrix = P_a R P_b^T`` [d_a, d_b] (with whitening, ``P_a W_k P_b^T``).
    """
    m_a, m_b, x = _check(m_a, m_b, x)
    if m_a.d != m_b.d and k is None:
        raise ValueError(f"widths differ (d_a={m_a.d}, d_b={m_b.d}): pass k, the shared PCA dimension")
    if ridge and not whiten:
        raise ValueError("ridge applies to the whitening; pass whiten=True or ridge=0")
    if ridge < 0:
        raise ValueError(f"ridge={ridge} must be >= 0")
    mm = _cross(x, center)
    p_a = p_b = None
    if k is not None:
        p_a, p_b = pca(m_a, k).components, pca(m_b, k).components
        mm = p_a.T @ mm @ p_b
    if whiten:
        c_a, c_b = _second(m_a, center), _second(m_b, center)
        if k is not None:
            c_a, c_b = p_a.T @ c_a @ p_a, p_b.T @ c_b @ p_b
        eye = np.eye(c_a.shape[0])
        a_isqrt = _sym_pow(c_a + ridge * eye, -0.5)
        b_isqrt, b_sqrt = _sym_pow(c_b + ridge * eye, -0.5), _sym_pow(c_b + ridge * eye, 0.5)
        r, s = _polar(a_isqrt @ mm @ b_isqrt)
        core = a_isqrt @ r @ b_sqrt
    else:
        r, s = _polar(mm)
        core = r
    matrix = core if k is None else p_a @ core @ p_b.T
    bias = x.mean_b - x.mean_a @ matrix if center else np.zeros(m_b.d)
    return Map(matrix=matrix, bias=bias, rotation=r, singular_values=s, orth_error=_orth_error(r),
               kind="procrustes", params={"center": center, "whiten": whiten, "ridge": float(ridge), "k": k},
               basis_a=p_a, basis_b=p_b)


def lstsq(m_a: Moments, m_b: Moments, x: CrossMoments, *, ridge: float = 0.0, fit_intercept: bool = True) -> Map:
    """Least-squares / ridge map ``B ~ A W + b`` from moments: the training-free linear patch
    (ReplaceMe) for a deleted block, a = its input stream, b = its output stream.

    With intercept: ``W = (m2_a + ridge * w * I)^{-1} m_ab`` (solved at covariance scale as
    ``(C_aa + ridge I)^{-1} C_ab``) and ``b = mean_b - mean_a W``; i.e. W minimises
    ``(1/w) sum_i w_i ||a_i W + b - b_i||^2 + ridge ||W||_F^2``, the intercept unpenalised, so
    ``ridge`` is in units of a's variance and independent of the token count. Without intercept the
    same with uncentred sums (``A^T A = m2_a + w mean_a mean_a^T``, ``A^T B = m_ab + w mean_a mean_b^T``)
    and b = 0. Cholesky when positive definite, else the minimum-norm least-squares solution.
    Row-vector convention: predictions are ``a @ W + b``.
    """
    m_a, m_b, x = _check(m_a, m_b, x)
    if ridge < 0:
        raise ValueError(f"ridge={ridge} must be >= 0")
    g = _sym(_second(m_a, fit_intercept)) + ridge * np.eye(m_a.d)
    w_ = _solve_pd(g, _cross(x, fit_intercept))
    bias = x.mean_b - x.mean_a @ w_ if fit_intercept else np.zeros(m_b.d)
    return Map(matrix=w_, bias=bias, rotation=None, singular_values=np.linalg.svd(w_, compute_uv=False),
               orth_error=float("nan"), kind="lstsq",
               params={"ridge": float(ridge), "fit_intercept": fit_intercept})


def map_diagnostics(map: Map, m_a: Moments, m_b: Moments, x: CrossMoments) -> dict[str, float]:
    """Held-out diagnostics of a map from held-out moments (tokens the map was not fitted on).

    rel_residual = ``sum_i w_i ||a_i W + bias - b_i||^2 / sum_i w_i ||b_i - mean_b||^2``, exact from
    moments: with r_i the residual, its mean is ``mean_a W + bias - mean_b`` and its centred part
    contributes ``tr(W^T m2_a W) - 2 tr(W^T m_ab) + tr(m2_b)`` (clipped at 0: round-off). Also: mse (per unit weight), the
    orthogonality error, and when widths agree the identity baseline (b ~ a) and the mean cosine of a
    with b before the map (from the cross moments). Row-vector convention, as everywhere here.
    """
    m_a, m_b, x = _check(m_a, m_b, x)
    wm = map.matrix
    if wm.shape != (m_a.d, m_b.d):
        raise ValueError(f"map is {wm.shape[0]} x {wm.shape[1]}, moments are d_a={m_a.d}, d_b={m_b.d}")

    def residual(mat, bias):
        mu = x.mean_a @ mat + bias - x.mean_b
        centred = np.sum(mat * (m_a.m2 @ mat)) - 2 * np.sum(mat * x.m_ab) + np.trace(m_b.m2)
        return max(float(centred + x.w * mu @ mu), 0.0)  # a perfect fit can cancel to -1e-16

    base = float(np.trace(m_b.m2))
    res = residual(wm, map.bias)
    out = {"rel_residual": res / base if base > 0 else float("nan"), "mse": res / x.w,
           "orth_error": map.orth_error, "n_tokens": int(x.n)}
    if m_a.d == m_b.d:
        out["rel_residual_identity"] = residual(np.eye(m_a.d), 0.0) / base if base > 0 else float("nan")
        out["cos_before"] = x.mean_cos
    return out
