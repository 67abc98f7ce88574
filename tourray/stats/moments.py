"""Mergeable float64 statistics of token-vector streams.

`Moments` holds the weighted count, mean and co-moment (sum of weighted centred outer products) of
one stream; `CrossMoments` the co-moment of two aligned streams plus per-token pair scalars. Both
update from a batch and merge exactly (Chan, Golub & LeVeque's pairwise update), so partial results
computed per group, per fragment, per Ray task or per capture actor combine in any order into the
statistics of the whole, never by naive sums of squares (which lose precision at 10^7 tokens).

Updates accept numpy arrays or torch tensors (a capture actor accumulates on the model's device);
the state stays in the array library it was first fed and `to_numpy()` brings it home.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np


def _xp(x):
    """The array namespace of `x`: numpy, or torch for tensors (imported only when given one)."""
    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def _f64(x):
    xp = _xp(x)
    if xp is np:
        return np.asarray(x, dtype=np.float64)
    return x.to(dtype=xp.float64)


def _zeros(xp, shape, like):
    if xp is np:
        return np.zeros(shape)
    return xp.zeros(shape, dtype=xp.float64, device=like.device)


def _full(xp, shape, value, like):
    if xp is np:
        return np.full(shape, value, dtype=np.float64)
    return xp.full(shape, value, dtype=xp.float64, device=like.device)


def _weights(x, weights):
    """Per-row weights as float64 in x's namespace, or None for unit weights."""
    if weights is None:
        return None
    xp = _xp(x)
    w = np.asarray(weights, dtype=np.float64) if xp is np else _f64(xp.as_tensor(weights, device=x.device))
    if w.shape != (x.shape[0],):
        raise ValueError(f"weights have shape {tuple(w.shape)}, expected ({x.shape[0]},)")
    return w


def _at_most(value: float, dtype, xp):
    """The largest number of `dtype` not above `value`: for x of that dtype, x <= it exactly when
    float64(x) <= value (a plain comparison would round `value` to the dtype, perhaps upwards)."""
    if xp is np:
        t = np.asarray(value, dtype=np.float64).astype(dtype)
        return t if float(t) <= value else np.nextafter(t, dtype.type(-np.inf))
    t = xp.tensor(value, dtype=xp.float64).to(dtype)
    return t if float(t) <= value else xp.nextafter(t, xp.tensor(-float("inf"), dtype=dtype))


def _rowdot(a, b):
    """sum_j a_ij b_ij per row, without an [n, d] product (torch's `vecdot` makes one)."""
    return _xp(a).einsum("ij,ij->i", a, b)


def _rownorm(x):
    """Euclidean norm of each row, without an [n, d] temporary."""
    return np.sqrt(_rowdot(x, x)) if isinstance(x, np.ndarray) else _xp(x).linalg.vector_norm(x, dim=1)


def _to_numpy(v):
    if v is None or isinstance(v, (int, float, np.ndarray)):
        return v
    return v.detach().cpu().numpy()


@dataclass
class Moments:
    """Weighted moments of one stream of d-dimensional vectors.

    `full=True` keeps the d x d co-moment (covariance, PCA, solves); `full=False` only its diagonal
    (per-channel variance), for wide streams such as an MLP's d_ff activations.
    """

    d: int
    full: bool = True
    near_zero: float = 1e-3           # |x| at or below this counts as "near zero" (absolute)
    n: int = 0                        # tokens seen
    w: float = 0.0                    # sum of weights (= n for unit weights)
    mean: Any = None                  # [d]
    m2: Any = None                    # [d, d] (full) or [d]: sum_i w_i (x_i - mean)(x_i - mean)^T
    absmax: Any = None                # [d] max |x| per channel
    zero_w: Any = None                # [d] weight of entries with |x| <= near_zero
    abs_w: Any = None                 # [d] sum_i w_i |x_i| per channel
    norm_w: float = 0.0               # sum_i w_i ||x_i||

    # -- building --------------------------------------------------------------------------
    def update(self, x, weights=None) -> "Moments":
        """Add a batch [n, d] (numpy or torch, any float dtype); returns self."""
        if x.shape[-1] != self.d or x.ndim != 2:
            raise ValueError(f"batch has shape {tuple(x.shape)}, expected (n, {self.d})")
        if x.shape[0] == 0:
            return self
        return self.merge(Moments.of(x, weights, full=self.full, near_zero=self.near_zero), inplace=True)

    @classmethod
    def of(cls, x, weights=None, full: bool = True, near_zero: float = 1e-3) -> "Moments":
        """The moments of one batch, computed directly (two passes over the batch: mean, then
        centred products). |x|, its maximum and the near-zero test are exact in the batch's own
        dtype, so they run there (a capture hands float32, bfloat16 or float16): only the sums are
        float64, and the float64 copy is centred in place when this call made it."""
        xp = _xp(x)
        ax = abs(x)
        small = ax <= _at_most(near_zero, x.dtype, xp)  # counted as integers (exact), weighted as float64
        absmax = _f64(xp.amax(ax, 0))
        x64 = _f64(x)
        v = _weights(x64, weights)
        n, d = x64.shape
        w = float(n) if v is None else float(v.sum())
        mean = x64.sum(0) / n if v is None else (v @ x64) / w
        norms = _rownorm(x64)
        zero_w = _f64(small.sum(0)) if v is None else v @ _f64(small)
        del small
        abs_w = _f64(ax).sum(0) if v is None else v @ _f64(ax)
        del ax
        if x64.dtype != x.dtype and v is None:  # a copy of our own: centre (and, for the diagonal, square) in place
            xc = x64.__isub__(mean)
        else:
            xc = x64 - mean
        if full:
            m2 = (xc if v is None else xc * v[:, None]).T @ xc
        elif v is None:  # in place on the one centred temporary: at d_ff wide, passes over memory are the cost
            m2 = (xc.square_() if xp is not np else np.square(xc, out=xc)).sum(0)
        else:
            m2 = (xc * v[:, None] * xc).sum(0)
        return cls(d=d, full=full, near_zero=near_zero, n=n, w=w, mean=mean, m2=m2, absmax=absmax,
                   zero_w=zero_w, abs_w=abs_w, norm_w=float(norms.sum() if v is None else v @ norms))

    def merge(self, other: "Moments", inplace: bool = False) -> "Moments":
        """Exact pairwise merge (Chan et al.): the moments of both parts' tokens together."""
        if other.d != self.d or other.full != self.full or other.near_zero != self.near_zero:
            raise ValueError(f"cannot merge moments of d={other.d}/full={other.full}/near_zero={other.near_zero} "
                             f"into d={self.d}/full={self.full}/near_zero={self.near_zero}")
        out = self if inplace else replace(self)
        if other.w == 0:
            return out
        if self.w == 0:
            for f in ("n", "w", "mean", "m2", "absmax", "zero_w", "abs_w", "norm_w"):
                setattr(out, f, getattr(other, f))
            return out
        xp = _xp(self.mean)
        w = self.w + other.w
        delta = other.mean - self.mean
        out.mean = self.mean + delta * (other.w / w)
        corr = (self.w * other.w / w)
        out.m2 = self.m2 + other.m2 + (xp.outer(delta, delta) if self.full else delta * delta) * corr
        out.absmax = xp.maximum(self.absmax, other.absmax)
        out.zero_w = self.zero_w + other.zero_w
        out.abs_w = self.abs_w + other.abs_w
        out.norm_w = self.norm_w + other.norm_w
        out.n, out.w = self.n + other.n, w
        return out

    __add__ = merge

    # -- reading ---------------------------------------------------------------------------
    @property
    def cov(self):
        """Population (weight-normalised) covariance, [d, d] or [d] when not full."""
        return self.m2 / self.w

    @property
    def var(self):
        """Per-channel population variance [d]."""
        xp = _xp(self.m2)
        return (xp.diagonal(self.m2) if self.full else self.m2) / self.w

    @property
    def sumsq(self) -> float:
        """sum_i w_i ||x_i||^2, from the co-moment and the mean (no second pass)."""
        return float((self.var.sum() + (self.mean * self.mean).sum()) * self.w)

    @property
    def rms(self) -> float:
        """Square root of the mean of squares over all entries."""
        return float(np.sqrt(self.sumsq / (self.w * self.d)))

    @property
    def mean_norm(self) -> float:
        return self.norm_w / self.w

    @property
    def frac_near_zero(self):
        """Per-channel (weighted) fraction of entries with |x| <= near_zero."""
        return self.zero_w / self.w

    @property
    def abs_mean(self):
        """Per-channel weighted mean |x|."""
        return self.abs_w / self.w

    def to_numpy(self) -> "Moments":
        return replace(self, **{f.name: _to_numpy(getattr(self, f.name)) for f in fields(self)})


@dataclass
class CrossMoments:
    """Co-moment of two aligned streams a [n, d_a] and b [n, d_b] (same tokens, same weights), plus
    per-token pair scalars: mean cosine, mean angular distance arccos(cos)/pi, and the squared norm of
    the difference (for the relative RMS of b - a; only when d_a == d_b)."""

    d_a: int
    d_b: int
    n: int = 0
    w: float = 0.0
    mean_a: Any = None
    mean_b: Any = None
    m_ab: Any = None                  # [d_a, d_b]: sum_i w_i (a_i - mean_a)(b_i - mean_b)^T
    cos_w: float = 0.0                # sum_i w_i cos(a_i, b_i)
    angle_w: float = 0.0              # sum_i w_i arccos(cos(a_i, b_i)) / pi
    diff_w: float = 0.0               # sum_i w_i ||b_i - a_i||^2
    sq_a_w: float = 0.0               # sum_i w_i ||a_i||^2
    keep_matrix: bool = True          # False: only the pair scalars (all-pairs similarity)

    def update(self, a, b, weights=None) -> "CrossMoments":
        if a.shape[0] != b.shape[0] or a.shape[1] != self.d_a or b.shape[1] != self.d_b:
            raise ValueError(f"batches {tuple(a.shape)} and {tuple(b.shape)} do not fit d_a={self.d_a}, d_b={self.d_b}")
        if a.shape[0] == 0:
            return self
        return self.merge(CrossMoments.of(a, b, weights, keep_matrix=self.keep_matrix), inplace=True)

    @classmethod
    def of(cls, a, b, weights=None, keep_matrix: bool = True) -> "CrossMoments":
        xp = _xp(a)
        a, b = _f64(a), _f64(b)
        v = _weights(a, weights)
        n = a.shape[0]
        w = float(n) if v is None else float(v.sum())

        def wsum(t):  # weighted sum over rows
            return t.sum(0) if v is None else v @ t

        mean_a, mean_b = wsum(a) / w, wsum(b) / w
        m_ab = None
        if keep_matrix:
            ac = a - mean_a
            m_ab = (ac if v is None else ac * v[:, None]).T @ (b - mean_b)
        na = _rownorm(a)
        out = cls(d_a=a.shape[1], d_b=b.shape[1], n=n, w=w, mean_a=mean_a, mean_b=mean_b, m_ab=m_ab,
                  sq_a_w=float(wsum(na * na)), keep_matrix=keep_matrix)
        if a.shape[1] == b.shape[1]:  # per-token comparisons need one space
            denom = na * _rownorm(b)
            cos = xp.clip(_rowdot(a, b) / (denom + (denom == 0)), -1.0, 1.0)  # a zero vector: cosine 0
            dn = _rownorm(b - a)
            out.cos_w, out.angle_w = float(wsum(cos)), float(wsum(xp.arccos(cos) / np.pi))
            out.diff_w = float(wsum(dn * dn))
        return out

    def merge(self, other: "CrossMoments", inplace: bool = False) -> "CrossMoments":
        if (other.d_a, other.d_b, other.keep_matrix) != (self.d_a, self.d_b, self.keep_matrix):
            raise ValueError("cannot merge cross moments of different shapes")
        out = self if inplace else replace(self)
        if other.w == 0:
            return out
        if self.w == 0:
            for f in fields(self):
                setattr(out, f.name, getattr(other, f.name))
            return out
        xp = _xp(self.mean_a)
        w = self.w + other.w
        da, db = other.mean_a - self.mean_a, other.mean_b - self.mean_b
        if self.keep_matrix:
            out.m_ab = self.m_ab + other.m_ab + xp.outer(da, db) * (self.w * other.w / w)
        out.mean_a = self.mean_a + da * (other.w / w)
        out.mean_b = self.mean_b + db * (other.w / w)
        for f in ("cos_w", "angle_w", "diff_w", "sq_a_w"):
            setattr(out, f, getattr(self, f) + getattr(other, f))
        out.n, out.w = self.n + other.n, w
        return out

    __add__ = merge

    @property
    def cross_cov(self):
        return self.m_ab / self.w

    @property
    def mean_cos(self) -> float:
        return self.cos_w / self.w

    @property
    def mean_angular(self) -> float:
        return self.angle_w / self.w

    @property
    def rel_rms_diff(self) -> float:
        """sqrt(mean ||b - a||^2 / mean ||a||^2): how much b departs from a, relative to a's size."""
        return float(np.sqrt(self.diff_w / self.sq_a_w)) if self.sq_a_w > 0 else float("nan")

    def to_numpy(self) -> "CrossMoments":
        return replace(self, **{f.name: _to_numpy(getattr(self, f.name)) for f in fields(self)})
