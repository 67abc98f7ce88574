"""`tourray tours generate --engine vllm` (runs where vLLM is installed: `make test` runs it in
.venv-vllm): the same inputs give the hf engine's texts under the deterministic tour decoding (vLLM's
repetition penalty, and no-repeat n-grams through tourray's vLLM logits processor)."""

from __future__ import annotations

import importlib.util

import pytest

from serve_fixtures import SYS, chatty_qwen3, one_thread, system_prompt_file  # noqa: F401

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (make test runs this in .venv-vllm)")


def test_banned_next_matches_the_hf_processor():
    import torch

    from tourray.model.decoding import NoRepeatGeneratedNgram
    from tourray.serve.vllm_tours import banned_next

    torch.manual_seed(0)
    for n in (1, 2, 3, 4):
        for _ in range(50):
            gen = torch.randint(0, 6, (int(torch.randint(0, 12, ())),)).tolist()
            scores = NoRepeatGeneratedNgram(n, 0)(torch.tensor([gen], dtype=torch.long).reshape(1, -1), torch.zeros(1, 6))
            assert set(torch.isinf(scores[0]).nonzero().flatten().tolist()) == banned_next(gen, n), (n, gen)


@pytest.mark.parametrize("decoding", [None, {"repetition_penalty": 1.0, "no_repeat_ngram_size": 2}], ids=["tour", "ngram2"])
def test_vllm_tours_equal_the_hf_engines(chatty_qwen3, system_prompt_file, tmp_path, monkeypatch, decoding):  # noqa: F811
    from tourray.serve.config import ToursConfig
    from tourray.serve.tours import HFTours, plan_tours
    from tourray.serve.vllm_tours import VLLMTours

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = ToursConfig(model=str(chatty_qwen3), include=["train/rome__*"], tags=None, styles=["brief"], max_new_tokens=12,
                      system_prompt=str(system_prompt_file), engine="vllm", vllm_max_model_len=512, batch_size=4,
                      lake=str(tmp_path / "lake"), **({"decoding": decoding} if decoding else {}))
    rows = plan_tours(cfg).inputs.to_pylist()[:6]
    prompts = [r["prompt"] for r in rows]
    v = VLLMTours(cfg, SYS).generate(prompts, 12, [None] * len(prompts))
    h = HFTours(cfg.model_copy(update={"engine": "hf"}), SYS).generate(prompts, 12, [None] * len(prompts))
    assert [x["token_ids"] for x in v] == [x["token_ids"] for x in h]
    assert [x["text"] for x in v] == [x["text"] for x in h] and all(x["prompt_tokens"] > 0 for x in v)
    if decoding:  # the ban was in force: no 2-gram repeats in any output
        for x in v:
            grams = list(zip(x["token_ids"], x["token_ids"][1:]))
            assert len(grams) == len(set(grams))
