"""The engine protocol. An engine turns a batch of token-id arrays into one `Captured` per sample
(surprisal, entropy, the stored residual-stream vectors); a `sink(tensors, lengths)` passed to
`capture` sees every hooked tensor first, where it lives (model dtype, model device, inside the
engine's process), so inline statistics never copy vectors anywhere. The stage writes whatever an
engine returns, so every engine fills the very same tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np



@dataclass
class Captured:
    """One sample's forward pass: surprisal/entropy per position and the requested vectors."""

    surprisal: np.ndarray                 # float32 [n], nan at pos 0
    entropy: np.ndarray                   # float32 [n], nan at pos 0
    vectors: dict[tuple[int, str], np.ndarray]  # (layer, site) -> [n, d] in the store dtype
    not_finite: tuple[int, str] | None = None   # first (layer, site) with inf/nan in the store dtype
    kl_ref: np.ndarray | None = None      # float32 [n] KL(reference || model), nan at pos 0 (with a reference)


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

    def capture(self, batch: list[np.ndarray], sink: Callable | None = None) -> list[Captured]: ...


def _plogp(lp):
    """p * log p from a log-softmax, 0 where p = 0: masked logits (-inf) would give 0 * -inf = nan."""
    import torch

    return torch.where(lp > float("-inf"), lp.exp() * lp, torch.zeros((), dtype=lp.dtype, device=lp.device))


def token_stats(logits, next_ids, ref_logits=None):
    """Surprisal of `next_ids` [m] under `logits` [m, vocab], the entropy of those distributions and,
    with `ref_logits`, KL(p_ref || p), in nats from float32 log-softmaxes, as float32 tensors on
    the logits' device. One chunk of positions at a time, so float32 logits stay [m, vocab]."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    s = -lp.gather(1, next_ids[:, None])[:, 0]
    e = -_plogp(lp).sum(-1)
    kl = None
    if ref_logits is not None:
        lr = torch.log_softmax(ref_logits.float(), dim=-1)
        # p_ref = 0 terms are 0, even where the model's log p is -inf too
        term = torch.where(lr > float("-inf"), lr.exp() * (lr - lp), torch.zeros((), device=lr.device))
        kl = term.sum(-1).clamp_min(0)
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
