"""The training-free linear patch for a deleted span of blocks (ReplaceMe, arXiv 2505.02819), solved
from sums streamed out of the lake: no activations are held in memory.

For a removed span a..b, block a-1 (the block before it) computes x_(a-1) = y + m, with y its
resid_mid (stream plus attention) and m its MLP output. ReplaceMe replaces the span by a map T on
the MLP output, so that y + m T ~ x_b, folded into block a-1's down projection (architecture
unchanged). Least squares: T = argmin sum ||m T - (x_b - y)||^2 (+ ridge), from the uncentred
moments of m and of (m, x_b - y). When the span starts at block 0 there is no block before it: the
map acts on the embedding output e (e T ~ x_b) and is folded into the embedding.

T is solved as I + D, with `ridge` shrinking D toward zero (T toward the identity, i.e. the block
left as it was) in units of m's mean second moment per channel. At ridge 0 this is exactly the
least-squares T. The ridge matters: the fit sees text tokens only, but the folded block also runs on
the prompt's first token, where an early-middle block's MLP writes the attention sink's massive
activation (SmolLM2-135M: block 11, norm ~25,000 against ~140 elsewhere). Text tokens barely span
that direction, so an unconstrained T maps it arbitrarily and the pruned model collapses
(perplexity x10^4 measured; a ridge toward the identity does not save it). So the directions of such
outliers on masked tokens (`protected_directions`) are left to the identity: T = I + P D with P
projecting them out of the input, solved by least squares on the text tokens as before.

Tokens are the run's text tokens (system prompt, chat template and padding never count: padding is
never stored). Targets are block outputs captured by hooks, pre-norm: the model's final norm is never
regressed onto. `cosine` (ReplaceMe's other objective) starts from the least-squares T and runs a
few epochs of Adam on the mean cosine distance between y + m T and x_b, streaming the lake each epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from tourray.lake import tables as lk
from tourray.errors import UserError
from tourray.stats.linalg import Map, lstsq, map_diagnostics
from tourray.stats.moments import CrossMoments, Moments
from tourray.stats.stream import Selection, layer_stream, resolve
from tourray.stats.tasks import stored_layers

log = logging.getLogger("tourray")


@dataclass
class SpanFit:
    first: int                 # first removed block
    last: int                  # last removed block
    matrix: np.ndarray         # T [d, d], row vectors: m -> m @ T
    tokens: int
    diagnostics: dict          # on the fit tokens: rel_residual, mse, mean cosine before / after

    @property
    def fold_into(self) -> int:
        """Block whose down projection takes T (-1: the embedding)."""
        return self.first - 1


def needed_vectors(first: int, last: int) -> list[tuple[int, str]]:
    """(layer, site) the fit of span first..last reads, and nothing else: the map's input m (block
    a-1's resid_post minus its resid_mid, or the embedding output) and the target x_b."""
    inputs = [(first - 1, "resid_mid"), (first - 1, "resid_post")] if first > 0 else [(-1, "resid_post")]
    return inputs + [(last, "resid_post")]


def check_patchable(lake: lk.Lake, run: str, spans: list[tuple[int, int]]) -> None:
    """Refuse, before anything is written, a patch whose vectors the run did not store: exactly what
    `solve_span` reads (`needed_vectors`)."""
    rows = lake.read("runs", filter=f"run = {lk.sql_quote(run)}").to_pylist()
    if not rows:
        raise UserError(f"--patch: no run {run!r} in {lake.root} to solve the patch from")
    row = rows[0]
    stored, sites = set(stored_layers(row)), set(row["sites"])
    for a, b in spans:
        need = needed_vectors(a, b)
        miss = [f"{'embed' if l < 0 else l}:{s}" for l, s in need if l not in stored or s not in sites]
        if miss:
            raise UserError(f"--patch for the removed span {a}-{b}: run {run} has no stored vectors of {', '.join(miss)}; "
                            "capture the unpruned model with --sites resid_post,resid_mid --layers all --store all")


def span_inputs(lake: lk.Lake, run: str, first: int, mask) -> Iterator[np.ndarray]:
    """The map's input m alone, in float64 batches of the selected tokens (no target is read)."""
    if first == 0:
        for c in layer_stream(lake, run, "resid_post", [-1], mask):
            yield c.h[-1]
        return
    before = first - 1
    post = layer_stream(lake, run, "resid_post", [before], mask)
    mid = layer_stream(lake, run, "resid_mid", [before], mask)
    for cp, cm in zip(post, mid, strict=True):
        if not (np.array_equal(cp.pos, cm.pos) and cp.sample_id.equals(cm.sample_id)):
            raise UserError(f"run {run}: resid_mid and resid_post rows of block {before} are not aligned; "
                            "run `tourray verify`")
        yield cp.h[before] - cm.h[before]


def span_batches(lake: lk.Lake, run: str, first: int, last: int, mask) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
    """(m, y, x_b, weights) float64 batches of the selected tokens: m the input of the map, y what
    is added to it (zeros for the embedding case), x_b the target."""
    if first == 0:
        for c in layer_stream(lake, run, "resid_post", [-1, last], mask):
            yield c.h[-1], np.zeros_like(c.h[-1]), c.h[last], c.weights
        return
    before = first - 1
    post = layer_stream(lake, run, "resid_post", [before, last], mask)
    mid = layer_stream(lake, run, "resid_mid", [before], mask)
    for cp, cm in zip(post, mid, strict=True):
        if not (np.array_equal(cp.pos, cm.pos) and cp.sample_id.equals(cm.sample_id)):
            raise UserError(f"run {run}: resid_mid and resid_post rows of block {before} are not aligned; "
                            "run `tourray verify`")
        y = cm.h[before]
        yield cp.h[before] - y, y, cp.h[last], cp.weights


def solve_span(lake: lk.Lake, run: str, first: int, last: int, ridge: float = 0.0, objective: str = "lstsq",
               epochs: int = 3, lr: float = 1e-4, selection: Selection | None = None) -> SpanFit:
    mask = resolve(lake, run, selection or Selection())
    m_m = m_d = x = None
    cos_before = 0.0
    for m, y, xb, w in span_batches(lake, run, first, last, mask):
        d = xb - y - m  # solved as T = I + D: ridge shrinks toward the identity (the unpatched block)
        mm, md, xx = Moments.of(m, w), Moments.of(d, w), CrossMoments.of(m, d, w)
        m_m, m_d, x = (mm, md, xx) if m_m is None else (m_m.merge(mm), m_d.merge(md), x.merge(xx))
        cos_before += float(_wsum(_cos(m + y, xb), w))  # block a-1's output vs the target: the unpatched deletion
    if x is None:
        raise UserError(f"run {run}: no text tokens to solve the patch of span {first}-{last} from")
    scale = float(np.trace(m_m.m2) / m_m.w + m_m.mean @ m_m.mean) / m_m.d  # mean second moment of m per channel
    keep = protected_directions(lake, run, first, scale)
    fit = lstsq(m_m, m_d, x, ridge=ridge * scale, fit_intercept=False) if not len(keep) else None
    if fit is None:  # T = I + P D: P removes the protected directions, so T leaves them as the block wrote them
        proj = np.eye(m_m.d) - keep.T @ keep
        g = proj @ (m_m.m2 / m_m.w + np.outer(m_m.mean, m_m.mean) + ridge * scale * np.eye(m_m.d)) @ proj
        d_ = proj @ np.linalg.lstsq(g, proj @ (x.m_ab / x.w + np.outer(x.mean_a, x.mean_b)), rcond=None)[0]
        fit = Map(matrix=d_, bias=np.zeros(m_m.d), rotation=None, singular_values=np.linalg.svd(d_, compute_uv=False),
                  orth_error=float("nan"), kind="lstsq", params={"ridge": ridge * scale, "protected": len(keep)})
    diag = map_diagnostics(fit, m_m, m_d, x)
    t = np.eye(m_m.d) + fit.matrix
    if objective == "cosine":
        t = _cosine_epochs(lake, run, first, last, mask, t, epochs, lr)
    cos_after = sum(float(_wsum(_cos(m @ t + y, xb), w)) for m, y, xb, w in span_batches(lake, run, first, last, mask))
    diagnostics = dict(rel_residual_lstsq=diag.get("rel_residual"), mean_cos_unpatched=cos_before / x.w,
                       mean_cos_patched=cos_after / x.w, objective=objective, ridge=ridge, protected_directions=len(keep))
    log.info("patch %d-%d (%s): mean cosine to the span's output %.4f unpatched -> %.4f patched, %d tokens",
             first, last, objective, diagnostics["mean_cos_unpatched"], diagnostics["mean_cos_patched"], x.n)
    return SpanFit(first, last, t, x.n, diagnostics)


def protected_directions(lake: lk.Lake, run: str, first: int, scale: float, factor: float = 100.0,
                         rank: int = 4) -> np.ndarray:
    """Orthonormal rows spanning the map input's massive outliers on the masked (non-text) tokens:
    rows whose squared norm exceeds `factor` x the text tokens' mean (`scale` x d), e.g. the
    attention sink's activation on the first token. The fit never sees them, yet the folded block
    runs on them; the patch must leave them alone ([k, d], k <= rank; empty when there are none)."""
    rows = []
    for m in span_inputs(lake, run, first, resolve(lake, run, Selection(text_only=False))):
        big = np.einsum("ij,ij->i", m, m) > factor * scale * m.shape[1]
        if big.any():
            rows.append(m[big][:4096])
    if not rows:
        return np.zeros((0, 0))
    u, sv, vt = np.linalg.svd(np.concatenate(rows)[:4096], full_matrices=False)
    k = int(min(rank, (sv > 1e-3 * sv[0]).sum()))
    return vt[:k]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.where(den == 0, 1, den)


def _wsum(v: np.ndarray, w: np.ndarray | None) -> float:
    return float(v.sum() if w is None else v @ w)


def _cosine_epochs(lake, run, first, last, mask, t0: np.ndarray, epochs: int, lr: float) -> np.ndarray:
    """ReplaceMe's cosine objective: Adam on mean(1 - cos(y + m T, x_b)), one lake pass per epoch."""
    import torch

    t = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([t], lr=lr)
    for _ in range(epochs):
        for m, y, xb, w in span_batches(lake, run, first, last, mask):
            m_, y_, xb_ = (torch.from_numpy(a) for a in (m, y, xb))
            cos = torch.nn.functional.cosine_similarity(y_ + m_ @ t, xb_, dim=1)
            wt = torch.ones_like(cos) if w is None else torch.from_numpy(w)
            loss = ((1 - cos) * wt).sum() / wt.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return t.detach().numpy()
