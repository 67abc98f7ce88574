"""The heal's loss: alpha * KD + (1 - alpha) * CE on text tokens, from the student's hidden states and
the teacher's stored support, computed `chunk` positions at a time with the LM head recomputed in
backward (so float32 logits are [chunk, vocab], never [batch, length, vocab]).

KD is the forward KL(teacher || student) over the partition the lake stores:

- `--logits K` (top-K): the K stored ids plus one "rest" outcome holding the remaining mass. With the
  teacher's log-probabilities l_i (i = 1..K, rest) and the student's s_i over the same partition
  (s_rest = logsumexp of the student's other ids), KL = sum_i exp(l_i) (l_i - s_i): exact for that
  partition, equal to the full-vocabulary KL when K = vocab (tested). At temperature T the student is
  log_softmax(z / T) and the teacher's partition is re-tempered as log_softmax(l / T) (the rest bucket
  treated as one outcome: exact at T = 1 and for K = vocab), times T^2 (Hinton et al.).
- `--logits sample:N`: N ids drawn from the teacher with counts c_i: sum_i (c_i / N) (l_i - s_i) is an
  unbiased estimate of the KL and its gradient (Sparse Logit Sampling, 2503.16870); T must be 1.

CE is -log softmax(z)[next token] at temperature 1. Both are sums over text tokens; the caller divides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _safe_rest(ls, ids, t_rest):
    """Student log-mass outside `ids` per row; rows whose teacher rest is -inf (no mass: K = vocab)
    get a finite dummy so no nan reaches backward (their term is dropped by the caller)."""
    masked = ls.scatter(1, ids, float("-inf"))
    empty = torch.isneginf(t_rest)
    if bool(empty.any()):
        masked = torch.where(empty[:, None] & (torch.arange(ls.shape[1], device=ls.device) == 0), torch.zeros_like(masked),
                             masked)
    return masked.logsumexp(-1)


def chunk_terms(z, targets, sup_ids, sup_logprobs, rest, weights, temperature: float):
    """KD and CE sums (float32 scalars) for one chunk of logits z [c, vocab]."""
    z = z.float()
    ls1 = F.log_softmax(z, dim=-1)
    ce = -ls1.gather(1, targets[:, None]).sum()
    ls = ls1 if temperature == 1 else F.log_softmax(z / temperature, dim=-1)
    s_top = ls.gather(1, sup_ids)
    if weights is not None:  # sampled support: unbiased estimate, weights count / N
        kd = (weights * (sup_logprobs - s_top)).sum()
        return kd, ce
    t = torch.cat([sup_logprobs, rest[:, None]], 1)
    if temperature != 1:
        t = F.log_softmax(t / temperature, dim=-1)
    s = torch.cat([s_top, _safe_rest(ls, sup_ids, t[:, -1])[:, None]], 1)
    p = t.exp()
    kd = torch.where(p > 0, p * (t - s), torch.zeros_like(p)).sum() * temperature ** 2
    return kd, ce


def kd_ce_sums(hidden, head, batch, temperature: float = 1.0, chunk: int = 256):
    """(kd_sum, ce_sum) over the batch's predicted text tokens, from the student's final hidden states
    [B, T, d] (after the final norm) and `head` (hidden -> logits). Each chunk's logits are recomputed
    in backward (activation checkpointing), so only [chunk, vocab] float32 lives at once."""
    h = hidden[batch.rows_b, batch.rows_t]
    kd = ce = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, h.shape[0], chunk):
        sl = slice(a, a + chunk)
        w = None if batch.weights is None else batch.weights[sl]

        def f(x, tg, si, sl_, r, w=w):
            return torch.stack(chunk_terms(head(x), tg, si, sl_, r, w, temperature))

        part = checkpoint(f, h[sl], batch.targets[sl], batch.sup_ids[sl], batch.sup_logprobs[sl], batch.rest[sl],
                          use_reentrant=False) if torch.is_grad_enabled() else \
            f(h[sl], batch.targets[sl], batch.sup_ids[sl], batch.sup_logprobs[sl], batch.rest[sl])
        kd = kd + part[0]
        ce = ce + part[1]
    return kd, ce


def eval_sums(hidden, head, batch, chunk: int = 256):
    """(kl_sum, top1_agree, n) at temperature 1 without gradients: the held-out KL over the stored
    partition (an estimate for sampled support) and how often the student's most likely token is the
    teacher's first stored id."""
    with torch.no_grad():
        h = hidden[batch.rows_b, batch.rows_t]
        kl, agree = 0.0, 0
        for a in range(0, h.shape[0], chunk):
            sl = slice(a, a + chunk)
            z = head(h[sl])
            w = None if batch.weights is None else batch.weights[sl]
            kd, _ = chunk_terms(z, batch.targets[sl], batch.sup_ids[sl], batch.sup_logprobs[sl], batch.rest[sl], w, 1.0)
            kl += float(kd)
            agree += int((z.argmax(-1) == batch.sup_ids[sl, 0]).sum())
        return kl, agree, int(h.shape[0])


class HealObjective(torch.nn.Module):
    """The student and its loss as one module, so DDP sees the whole computation in `forward`."""

    def __init__(self, model, alpha: float, temperature: float, chunk: int):
        super().__init__()
        from tourray.capture.hf import lm_head_logits

        self.model = model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._decoder = inner.get_decoder()
        self._head = lm_head_logits(inner)
        self.alpha, self.temperature, self.chunk = alpha, temperature, chunk

    def hidden(self, batch):
        return self._decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]

    def forward(self, batch):
        """(loss, kd, ce): means per text token of the batch."""
        kd, ce = kd_ce_sums(self.hidden(batch), self._head, batch, self.temperature, self.chunk)
        n = max(batch.n_tokens, 1)
        kd, ce = kd / n, ce / n
        return self.alpha * kd + (1 - self.alpha) * ce, kd.detach(), ce.detach()

    def evaluate(self, batch):
        return eval_sums(self.hidden(batch), self._head, batch, self.chunk)
