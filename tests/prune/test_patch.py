"""The linear patch (ReplaceMe) solved from streamed lake sums equals a direct least squares on the
same tokens (1e-8 relative), for a span after block 0, a span from the embedding, and a span ending
at the last block (its target is the pre-norm block output, never the final-normed state)."""

from __future__ import annotations

import numpy as np
import pytest

from tourray.errors import UserError
from tourray.lake.tables import Lake
from tourray.prune.patch import check_patchable, solve_span


def direct(prune_vectors, first, last):
    post, sp = prune_vectors("resid_post")
    mid, _ = prune_vectors("resid_mid")
    m, d = [], []
    for s, (a, b) in sp.items():  # text tokens only: system prompt and template rows never count
        if first == 0:
            m.append(post[-1][s][a:b])
            d.append(post[last][s][a:b])
        else:
            y = mid[first - 1][s][a:b]
            m.append(post[first - 1][s][a:b] - y)
            d.append(post[last][s][a:b] - y)
    m, d = np.concatenate(m), np.concatenate(d)
    return np.linalg.lstsq(m, d, rcond=None)[0], m, d


@pytest.mark.parametrize("first, last", [(1, 1), (0, 1), (2, 2), (1, 2)])
def test_lstsq_patch_equals_direct_least_squares(prune_lake, prune_vectors, first, last):
    fit = solve_span(Lake(str(prune_lake)), "full", first, last)
    want, m, d = direct(prune_vectors, first, last)
    assert fit.tokens == len(m)
    assert np.abs(fit.matrix - want).max() / np.abs(want).max() < 1e-8
    assert fit.fold_into == first - 1
    if first > 0:  # the patch can only help: block a-1's output moves toward the span's output
        assert fit.diagnostics["mean_cos_patched"] >= fit.diagnostics["mean_cos_unpatched"] - 1e-9
    assert 0 <= fit.diagnostics["rel_residual_lstsq"] < 1


def test_last_block_target_is_pre_norm(prune_lake, qwen3_model, prune_vectors):
    """The target of a span ending at the last block is the hooked block output; the final norm's
    output (what output_hidden_states[-1] holds) differs from it, so regressing onto it would be another map."""
    import torch
    from transformers import AutoModelForCausalLM

    post, sp = prune_vectors("resid_post")
    s, (a, b) = next(iter(sp.items()))
    lk = Lake(str(prune_lake))
    ids = lk.read("tokens", ["pos", "token_id"], filter=f"run = 'full' AND sample_id = '{s}'").sort_by("pos")
    model = AutoModelForCausalLM.from_pretrained(qwen3_model, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model(input_ids=torch.tensor(ids.column("token_id").to_numpy().astype(np.int64))[None],
                   output_hidden_states=True).hidden_states
    assert np.abs(hs[-1][0].numpy() - post[2][s]).max() > 1e-2        # post-norm != stored
    assert np.abs(model.model.norm(torch.tensor(post[2][s], dtype=torch.float32)).detach().numpy() - hs[-1][0].numpy()).max() < 1e-4


def test_cosine_patch_improves_cosine(prune_lake):
    lsq = solve_span(Lake(str(prune_lake)), "full", 1, 1)
    cos = solve_span(Lake(str(prune_lake)), "full", 1, 1, objective="cosine", epochs=3, lr=1e-3)
    assert cos.diagnostics["mean_cos_patched"] >= lsq.diagnostics["mean_cos_patched"] - 1e-6
    assert not np.allclose(cos.matrix, lsq.matrix)


def test_patch_needs_resid_mid(prune_lake):
    lk = Lake(str(prune_lake))
    with pytest.raises(UserError, match="run bare has no stored vectors of 0:resid_mid, 0:resid_post, 1:resid_post; "
                                        "capture the unpruned model with --sites resid_post,resid_mid"):
        check_patchable(lk, "bare", [(1, 1)])
    check_patchable(lk, "full", [(0, 0), (2, 2)])


@pytest.mark.parametrize("layers, first, last", [("embed,0,2", 1, 2), ("embed,2", 0, 2)])
def test_patch_reads_only_what_the_fit_needs(prune_lake, qwen3_model, corpus_dir, tmp_path, layers, first, last):
    """A run with exactly what check_patchable asks for (block a-1's resid_mid and resid_post, or the
    embedding, and block b's resid_post) but not the first removed block: the check passes, and so
    does the solve (it read the first removed block's resid_post and blamed lake corruption)."""
    from tourray.capture import CaptureConfig, run_capture

    lake = tmp_path / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="part",
                              layers=layers, sites="resid_post,resid_mid", store_dtype="float32", batch_size=2,
                              group_size=3, stats=[]), progress=False, executor="local")
    lk = Lake(str(lake))
    check_patchable(lk, "part", [(first, last)])
    fit = solve_span(lk, "part", first, last)
    full = solve_span(Lake(str(prune_lake)), "full", first, last)  # the same capture, every block stored
    assert fit.tokens == full.tokens
    assert np.abs(fit.matrix - full.matrix).max() / np.abs(full.matrix).max() < 1e-4
