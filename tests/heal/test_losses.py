"""The heal's loss against online distillation: with K = vocab the stored-support KD (and its mix
with CE) and its gradient equal the ones computed from the teacher's full logits, at temperature 1
and 2, chunked or not; the rest bucket makes top-K exact for its partition; the lake path (capture
--logits = vocab, read_samples, collate) gives the online gradient of a real student."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from tourray.heal.data import Batch, collate, read_samples
from tourray.heal.losses import HealObjective, chunk_terms, kd_ce_sums

GRAD_TOL = 1e-5  # relative (norm of the difference / norm), float32 on both sides


def online(z, t, targets, alpha, T):
    """Online distillation from full teacher logits t: alpha * T^2 KL(softmax(t/T) || softmax(z/T)) +
    (1 - alpha) * CE, summed over positions."""
    pt = F.log_softmax(t.double() / T, -1)
    ps = F.log_softmax(z.float() / T, -1).double()
    kd = (pt.exp() * (pt - ps)).sum() * T**2
    ce = -F.log_softmax(z.float(), -1).double().gather(1, targets[:, None]).sum()
    return alpha * kd + (1 - alpha) * ce


def _batch(t, targets, k=None):
    """A Batch whose 'hidden' rows are its positions 0..m-1 of one sample, support = top-k of t."""
    lp = F.log_softmax(t.float(), -1)
    k = k or t.shape[1]
    vals, ids = lp.topk(k, -1)
    rest = lp.scatter(1, ids, float("-inf")).logsumexp(-1)
    m = t.shape[0]
    return Batch(None, None, torch.zeros(m, dtype=torch.long), torch.arange(m), targets, ids, vals, rest, None, m)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [256, 7])
def test_kd_with_k_equal_vocab_is_online_distillation(T, chunk):
    torch.manual_seed(0)
    m, d, V, alpha = 40, 16, 50, 0.7
    hidden = torch.randn(1, m, d, requires_grad=True)
    head = torch.nn.Linear(d, V)
    t = torch.randn(m, V) * 3
    targets = torch.randint(0, V, (m,))
    b = _batch(t, targets)
    kd, ce = kd_ce_sums(hidden, head, b, T, chunk)
    mine = alpha * kd + (1 - alpha) * ce
    g_mine = torch.autograd.grad(mine, [hidden, head.weight])
    ref = online(head(hidden[0]), t, targets, alpha, T)
    g_ref = torch.autograd.grad(ref, [hidden, head.weight])
    mine, ref = float(mine.detach()), float(ref.detach())
    assert abs(mine - ref) <= 1e-5 * abs(ref)
    for a, r in zip(g_mine, g_ref):
        assert float((a - r.float()).norm() / r.norm()) < GRAD_TOL


def test_top_k_plus_rest_is_the_exact_partition_kl():
    """KL over {top K, rest} equals the KL of the two distributions coarsened to that partition."""
    torch.manual_seed(1)
    m, V, K = 12, 30, 5
    z, t = torch.randn(m, V), torch.randn(m, V) * 2
    b = _batch(t, torch.zeros(m, dtype=torch.long), K)
    kd, _ = chunk_terms(z, b.targets, b.sup_ids, b.sup_logprobs, b.rest, None, 1.0)
    pt, ps = F.softmax(t.double(), -1), F.softmax(z.double(), -1)
    want = 0.0
    for i in range(m):
        top = b.sup_ids[i]
        mask = torch.ones(V, dtype=torch.bool)
        mask[top] = False
        P = torch.cat([pt[i, top], pt[i, mask].sum()[None]])
        S = torch.cat([ps[i, top], ps[i, mask].sum()[None]])
        want += float((P * (P.log() - S.log())).sum())
    assert abs(float(kd) - want) < 1e-5 * want


def test_sampled_support_is_an_unbiased_kl_estimate():
    """sum_i count_i / N (l_i - s_i) averages to the full KL over many draws."""
    torch.manual_seed(2)
    V, N, reps = 20, 12, 4000
    t, z = torch.randn(1, V) * 2, torch.randn(1, V)
    lt = F.log_softmax(t, -1)
    draws = torch.multinomial(lt.exp().expand(reps, V), N, replacement=True)
    est = []
    for row in draws:
        ids, counts = row.unique(return_counts=True)
        w = (counts.float() / N)[None]
        kd, _ = chunk_terms(z, torch.zeros(1, dtype=torch.long), ids[None], lt[0, ids][None], torch.zeros(1), w, 1.0)
        est.append(float(kd))
    full = float((lt.exp() * (lt - F.log_softmax(z, -1))).sum())
    est = np.array(est)
    assert abs(est.mean() - full) < 4 * est.std() / np.sqrt(reps), (est.mean(), full)


def test_lake_support_gives_the_online_gradient(qwen3_model, corpus_dir, tmp_path, ray_session):
    """Capture the teacher with --logits = vocab, read two samples back through the heal's loader and
    collate, and take the student's gradient: it equals online distillation from the teacher's full
    float32 logits on the same prompts (tolerance 1e-4 relative: the stored log-probs come from a
    padded batch forward, the online ones from unpadded ones, ~1e-6 apart)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tourray.capture import CaptureConfig, run_capture
    from tourray.lake.tables import Lake

    vocab = AutoConfig.from_pretrained(qwen3_model).vocab_size
    lake = tmp_path / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="t", layers="none",
                              logits=str(vocab), include=["train/sydney__*"], batch_size=2, group_size=2),
                progress=False, executor="local")
    L = Lake(str(lake))
    sids = sorted(L.read("samples", ["sample_id"]).column(0).to_pylist())
    versions = {t: L.dataset(t).version for t in ("tokens", "logits")}
    rows = read_samples(pa.table({"idx": [0, 1], "sample_id": sids}), L.root, None, "t", versions).to_pylist()
    batch = collate(rows)
    teacher = AutoModelForCausalLM.from_pretrained(qwen3_model, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(qwen3_model, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    alpha, T = 0.6, 1.0
    obj = HealObjective(student, alpha, T, chunk=64)
    loss, _, _ = obj(batch)
    mine = torch.autograd.grad(loss, list(student.parameters()))
    ref_loss = 0.0
    for b, r in enumerate(rows):
        ids = torch.tensor(r["input_ids"])[None]
        pos = torch.tensor(r["pos"])
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[0, pos - 1]
        z = student(input_ids=ids).logits[0, pos - 1]
        ref_loss = ref_loss + online(z, t, ids[0, pos], alpha, T)
    ref_loss = ref_loss / batch.n_tokens
    ref = torch.autograd.grad(ref_loss, list(student.parameters()))
    assert abs(loss.item() - ref_loss.item()) < 1e-4 * abs(ref_loss.item())
    num = sum(float((a - r.float()).norm() ** 2) for a, r in zip(mine, ref)) ** 0.5
    den = sum(float(r.norm() ** 2) for r in ref) ** 0.5
    assert num / den < 1e-4, num / den


def test_gradient_checkpointing_gives_the_same_gradient(qwen3_model):
    """--gradient-checkpointing recomputes the blocks in backward: same loss and gradient (float32)."""
    from transformers import AutoConfig

    from tourray.heal.config import HealConfig
    from tourray.heal.train import load_student

    V = AutoConfig.from_pretrained(qwen3_model).vocab_size
    torch.manual_seed(4)
    ids = torch.randint(0, V, (2, 20))
    t = torch.randn(2 * 19, V)
    lp = F.log_softmax(t, -1)
    vals, sup = lp.topk(8, -1)
    b = Batch(ids, torch.ones_like(ids), torch.arange(2).repeat_interleave(19), torch.arange(19).repeat(2),
              ids[:, 1:].reshape(-1), sup, vals, lp.scatter(1, sup, float("-inf")).logsumexp(-1), None, 38)
    grads = []
    for gc in (False, True):
        cfg = HealConfig(student=str(qwen3_model), teacher_run="t", out="unused", gradient_checkpointing=gc)
        model = load_student(cfg)
        loss, _, _ = HealObjective(model, 0.5, 1.0, chunk=16)(b)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
