"""The engine protocol. An engine turns a batch of token-id arrays into one `Captured` per sample
(surprisal, entropy, the stored residual-stream vectors); a `sink(tensors, lengths)` passed to
`capture` sees every hooked tensor first, where it lives (model dtype, model device, inside the
engine's process), so inline statistics never copy vectors anywhere. It may get the keys one at a
time in layer order (HFEngine calls it from each hook) or all at once (VLLMEngine). The stage
writes whatever an engine returns, so every engine fills the very same tables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np



@dataclass
class Captured:
    """One sample's forward pass: surprisal/entropy per position and the requested vectors."""

    surprisal: np.ndarray                 # float32 [n], nan at pos 0
    entropy: np.ndarray                   # float32 [n], nan at pos 0
    vectors: dict[tuple[int, str], np.ndarray]  # (layer, site) -> [n, d] in the store dtype
    kl_ref: np.ndarray | None = None      # float32 [n] KL(reference || model), nan at pos 0 (with a reference)
    logits: "Support | None" = None       # --logits: row i = the distribution that predicted token i + 1


@dataclass
class Support:
    """One sample's stored next-token distribution (`--logits`), row i for position i + 1 (every
    predicting position: the stage keeps the text tokens). Sample mode pads each row to N ids with
    id -1 and count 0."""

    ids: np.ndarray                       # int32 [n - 1, k], most likely first
    logprobs: np.ndarray                  # float32 [n - 1, k]
    rest: np.ndarray                      # float32 [n - 1]: log of the mass outside ids
    counts: np.ndarray | None = None      # int32 [n - 1, k] (sample mode)

    @staticmethod
    def split(parts: list[tuple], lengths: list[int]) -> list["Support"]:
        """Flattened rows of a batch (chunks of (ids, logprobs, rest, counts) tensors, samples one
        after another, n - 1 rows each) -> one Support per sample."""
        import torch

        cat = [torch.cat([p[j] for p in parts]).cpu().numpy() if parts and parts[0][j] is not None else None
               for j in range(4)]
        out, off = [], 0
        for n in lengths:
            m = max(n - 1, 0)
            sl = slice(off, off + m)
            k = cat[0].shape[1] if cat[0] is not None else 0
            out.append(Support(*(x[sl] if x is not None else None for x in cat)) if cat[0] is not None else
                       Support(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32)))
            off += m
        return out


@dataclass
class RefSupport:
    """A reference run's stored distribution for one sample (--reference-run): rows for the text
    tokens at positions `start`, `start` + 1, ... (the row of token t is the distribution that
    predicted it, from position t - 1), top-K ids with log-probabilities and the rest's log-mass."""

    start: int
    ids: np.ndarray                       # int32 [m, K]
    logprobs: np.ndarray                  # float32 [m, K]
    rest: np.ndarray                      # float32 [m]


def support_uniforms(ids: np.ndarray, n_draws: int) -> np.ndarray:
    """--logits sample:N: the uniforms of one sample's draws, [n - 1, N] float64, from a generator
    seeded by the sample's token ids: the same draws whatever the batching, engine or resume."""
    seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).digest()[:8], "little")
    return np.random.default_rng(seed).random((max(len(ids) - 1, 0), n_draws))


def logit_support(lp, spec: tuple[str, int], u=None, rows: int = 128):
    """The stored support of log-softmax rows `lp` [m, vocab] (float32): ("top", K) -> the K largest
    log-probabilities and their ids, descending; ("sample", N) -> the distinct ids of N draws by
    inverse CDF (float64 cumulative sums) from uniforms `u` [m, N], most likely first, padded with
    id -1 / count 0. Both with the log of the remaining mass (a logsumexp over the other ids).
    Returns int32 ids, float32 log-probs, float32 rest, int32 counts (None for top-K)."""
    import torch

    mode, k = spec
    if mode == "top":
        vals, ids = lp.topk(k, dim=-1)
        rest = lp.scatter(1, ids, float("-inf")).logsumexp(-1)
        return ids.int(), vals, rest, None
    outs = []
    for a in range(0, lp.shape[0], rows):  # float64 cumulative sums: [rows, vocab] at a time
        x = lp[a : a + rows]
        cdf = x.double().exp().cumsum(-1)
        uu = torch.as_tensor(u[a : a + rows], dtype=torch.float64, device=x.device) * cdf[:, -1:]
        draws = torch.searchsorted(cdf, uu).clamp_max(x.shape[1] - 1)
        full = torch.zeros(x.shape, dtype=torch.int32, device=x.device).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.int32))
        vals, ids = x.masked_fill(full == 0, float("-inf")).topk(min(k, x.shape[1]), dim=-1)
        cnt = full.gather(1, ids)
        ids = ids.masked_fill(cnt == 0, -1)
        vals = vals.masked_fill(cnt == 0, float("nan"))
        rest = x.masked_fill(full > 0, float("-inf")).logsumexp(-1)
        outs.append((ids.int(), vals, rest, cnt))
    return tuple(torch.cat([o[j] for o in outs]) for j in range(4))


#: Hooked inputs of sub-modules, accumulated inline for width pruning but never stored as vectors:
#: site -> (module path in a block, how its input is read).
INNER_SITES = {
    "mlp_act": ("mlp.down_proj", "the MLP activation (input of the down projection), d_ff channels"),
    "head_out": ("self_attn.o_proj", "per-head attention output (input of the output projection), by head"),
}


def _submodule(block, path: str):
    mod = block
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


class Engine(Protocol):
    """What the capture stage needs from an engine."""

    keys: list[tuple[int, str]]          # hooked (layer, site)
    stored_keys: list[tuple[int, str]]   # of those, handed back as vectors
    inner_keys: list[tuple[int, str]]    # hooked sub-module inputs for inline statistics (mlp_act, head_out)
    num_heads: int

    def capture(self, batch: list[np.ndarray], sink: Callable | None = None,
                reference: list[RefSupport] | None = None, prefix: int = 0) -> list[Captured]: ...


class HeadScratch:
    """Float32 [chunk, vocab] buffers an engine reuses for every chunk of every batch: the LM head's
    logits (where the head can write into one: a float32 head), their log-softmax and the entropy's
    p log p. On CPU a fresh block that size (100 MB at 512 x 49,152) is above glibc's largest mmap
    threshold, so each chunk's temporaries were mapped and faulted in page by page again (1.1-1.3 s of
    system CPU in a SmolLM2 batch of 8). The buffers are the chunk's own peak, held between batches; on
    a GPU the caching allocator held them already."""

    def __init__(self, logits: bool = True):
        self.logits = logits  # False: a bf16 / float16 head makes its own logits, no buffer is kept for them
        self._buf = None

    def __call__(self, m: int, vocab: int, device) -> tuple:
        """(logits or None, log-softmax, product) views [m, vocab]; m <= the largest chunk asked so far or grows."""
        import torch

        b = self._buf
        if b is None or b.shape[1] < m or b.shape[2] != vocab or b.device != torch.device(device):
            self._buf = None  # let the old one go before the new one is allocated
            self._buf = b = torch.empty((2 + self.logits, m, vocab), dtype=torch.float32, device=device)
        return (b[0, :m] if self.logits else None), b[-2, :m], b[-1, :m]


def linear_into(h, weight, bias=None, out=None):
    """`h @ weight.T (+ bias)`, written into `out` where dtypes and devices agree (the very kernel
    `torch.nn.functional.linear` runs on a 2-D input: the same bits), else a new tensor."""
    import torch

    if out is not None and weight.dtype == out.dtype == h.dtype and out.device == h.device == weight.device:
        return torch.mm(h, weight.t(), out=out) if bias is None else torch.addmm(bias, h, weight.t(), out=out)
    return torch.nn.functional.linear(h, weight, bias)


def _entropy(lp, out=None):
    """-sum p log p per row of a log-softmax, 0 for p = 0 terms (masked logits, -inf, would give
    0 * -inf = nan). In place on one [m, vocab] temporary (`out`, or a new one): this runs over
    every position's full vocabulary, where each extra full-size temporary costs more than the
    arithmetic."""
    import torch

    return -torch.exp(lp, out=out).mul_(lp).nan_to_num_(0.0).sum(-1)


def partition_kl(lp, ids, ref_logprobs, ref_rest):
    """KL(reference || model) per row over the partition a --logits K run stores: the K ids plus
    one outcome for the rest of the mass. `lp` [m, vocab] is the model's log-softmax; the model's
    rest is the logsumexp of its other ids. Equal to the full KL when K = vocab (rest = -inf), and
    never above it otherwise (merging outcomes cannot raise a KL: the log-sum inequality)."""
    import torch

    t = torch.cat([ref_logprobs, ref_rest[:, None]], 1)
    s = torch.cat([lp.gather(1, ids), lp.scatter(1, ids, float("-inf")).logsumexp(-1)[:, None]], 1)
    term = torch.where(t > float("-inf"), t.exp() * (t - s), torch.zeros((), device=t.device))
    return term.sum(-1).clamp_min(0)


def token_stats(logits, next_ids, ref_logits=None, support=None, ref_support=None, scratch=None):
    """Surprisal of `next_ids` [m] under `logits` [m, vocab], the entropy of those distributions and,
    with `ref_logits`, KL(p_ref || p), in nats from float32 log-softmaxes, as float32 tensors on
    the logits' device (with `ref_support` = (ids, logprobs, rest) instead: `partition_kl`). One
    chunk of positions at a time, so float32 logits stay [m, vocab].
    `support(lp)`: also return what it makes of the same log-softmax (the --logits rows), 4th.
    `scratch`: (log-softmax, product) float32 buffers shaped like `logits` (`HeadScratch`), written
    instead of new tensors; the results are the same bits."""
    import torch

    lp_out, tmp = (None, None) if scratch is None else scratch
    lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=lp_out)
    s = -lp.gather(1, next_ids[:, None])[:, 0]
    e = _entropy(lp, out=tmp)
    kl = None
    if ref_logits is not None:
        lr = torch.log_softmax(ref_logits.float(), dim=-1)
        # p_ref = 0 terms are 0 (0 * -inf or 0 * nan: set to 0), even where the model's log p is -inf
        # too; p_ref > 0 where the model's p = 0 stays +inf
        kl = (lr - lp).mul_(lr.exp()).nan_to_num_(0.0, posinf=float("inf")).sum(-1).clamp_min(0)
    elif ref_support is not None:
        kl = partition_kl(lp, *ref_support)
    if support is not None:
        return s, e, kl, support(lp)
    return s, e, kl


def surprisal_entropy(logits, ids, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced -log p(token_t | <t) and the entropy of the predicting distribution, in nats,
    from a float32 log-softmax; position 0 has neither (nan). Chunked to bound memory at large vocab."""
    import torch

    n = logits.shape[0]
    s = torch.full((n,), float("nan"))
    e = torch.full((n,), float("nan"))
    for a in range(0, n - 1, chunk):
        b = min(n - 1, a + chunk)
        cs, ce, _ = token_stats(logits[a:b], ids[a + 1 : b + 1])
        s[a + 1 : b + 1] = cs.cpu()
        e[a + 1 : b + 1] = ce.cpu()
    return s.numpy(), e.numpy()


def kl_divergence(ref_logits, logits, chunk: int = 512) -> np.ndarray:
    """KL(p_ref || p) in nats per position, from float32 log-softmaxes of both models' full logits,
    aligned like `surprisal_entropy`: position t holds the KL of the distributions that predicted
    token t (nan at position 0)."""
    import torch

    n = logits.shape[0]
    kl = torch.full((n,), float("nan"))
    dummy = torch.zeros(n, dtype=torch.long, device=logits.device)
    for a in range(0, n - 1, chunk):
        b = min(n - 1, a + chunk)
        kl[a + 1 : b + 1] = token_stats(logits[a:b], dummy[a + 1 : b + 1], ref_logits[a:b])[2].cpu()
    return kl.numpy()
