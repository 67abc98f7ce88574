"""The vLLM engine of `tourray tours generate`: `LLM.generate` with one `SamplingParams` per prompt.

Greedy decoding is `temperature=0`; the repetition penalty is vLLM's own (the same rule as
`tourray.model.decoding`: prompt and output tokens); no-repeat n-grams of the generated text are the
logits processor below; sampling uses vLLM's sampler with the tour's seed (so sampled tours differ
between engines: the engine is part of a run's identity). Prompts are rendered and tokenised exactly
as the hf engine does (`Generator.encode`), and handed over as token ids.
"""

from __future__ import annotations

import os

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from tourray.errors import UserError


def banned_next(output_ids: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in `output_ids` (as NoRepeatGeneratedNgram)."""
    if n <= 0 or len(output_ids) < n:
        return set()
    prefix = output_ids[len(output_ids) - n + 1:] if n > 1 else []
    return {output_ids[i + n - 1] for i in range(len(output_ids) - n + 1) if output_ids[i:i + n - 1] == prefix}


class NoRepeatNgram(AdapterLogitsProcessor):
    """vLLM logits processor: `SamplingParams(extra_args={"no_repeat_ngram_size": n})` bans every token
    that would repeat an n-gram of the request's own output."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        n = int((params.extra_args or {}).get("no_repeat_ngram_size", 0))
        if n <= 0:
            return None

        def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            banned = banned_next(list(output_ids), n)
            if banned:
                logits[sorted(banned)] = float("-inf")
            return logits

        return apply


class VLLMTours:
    def __init__(self, cfg, system_prompt: str):
        from transformers import AutoTokenizer
        from vllm import LLM

        from tourray.model.generate import generation_prompt
        from tourray.model.prompt import PromptFormat

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if cfg.gpus_per_actor == 0:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.cfg, self.decoding = cfg, cfg.decoding
        self.tok = AutoTokenizer.from_pretrained(cfg.model)
        self.fmt = PromptFormat(self.tok, system_prompt=system_prompt, use_chat_template=cfg.chat_template)
        self.render = lambda p: generation_prompt(self.fmt, p)
        try:
            self.llm = LLM(model=cfg.model, tokenizer=cfg.model, dtype="bfloat16" if cfg.gpus_per_actor > 0 else "float32",
                           gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, max_model_len=cfg.vllm_max_model_len,
                           max_num_seqs=max(cfg.batch_size, 1), logits_processors=[NoRepeatNgram], seed=0)
        except Exception as e:  # noqa: BLE001 - one line the user can act on
            raise UserError(f"--engine vllm: cannot start vLLM on {cfg.model}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        gc = self.llm.get_tokenizer()
        eos = getattr(self.llm.llm_engine.model_config.hf_config, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids = sorted(set(eos) | ({gc.eos_token_id} if gc.eos_token_id is not None else set()))

    def _params(self, max_new: int, seed: int | None):
        from vllm import SamplingParams

        d = self.decoding
        extra = {"no_repeat_ngram_size": d.no_repeat_ngram_size} if d.no_repeat_ngram_size else None
        if d.sample:
            return SamplingParams(max_tokens=max_new, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k or -1,
                                  repetition_penalty=d.repetition_penalty, seed=seed if seed is not None else d.seed,
                                  stop_token_ids=self.eos_ids, extra_args=extra)
        return SamplingParams(max_tokens=max_new, temperature=0.0, repetition_penalty=d.repetition_penalty,
                              stop_token_ids=self.eos_ids, extra_args=extra)

    def generate(self, prompts: list[str], max_new_tokens: int, seeds: list[int | None]) -> list[dict]:
        ids = [self.tok(self.render(p), add_special_tokens=False)["input_ids"] for p in prompts]
        outs = self.llm.generate([{"prompt_token_ids": i} for i in ids], [self._params(max_new_tokens, s) for s in seeds],
                                 use_tqdm=False)
        res = []
        for i, o in zip(ids, outs):
            c = o.outputs[0]
            new = list(c.token_ids)
            stopped = c.finish_reason == "stop"
            text_ids = [t for t in new if t not in self.eos_ids]
            res.append(dict(text=self.tok.decode(text_ids, skip_special_tokens=True), n_new_tokens=len(new),
                            stopped=stopped, token_ids=new, prompt_tokens=len(i)))
        return res
