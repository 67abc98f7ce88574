"""`HFEngine`: a transformers model with hooks on every decoder block, run on padded batches."""

from __future__ import annotations

import numpy as np

from tourray.capture.engine import (RefSupport, INNER_SITES, Captured, HeadScratch, Support, _submodule, linear_into,
                                    logit_support, support_uniforms, token_stats)
from tourray.model.identity import find_blocks, text_model_type
from tourray.model.prompt import right_padded
from tourray.config import Site
from tourray.errors import UserError

#: Where resid_mid (the stream after the attention add, before the MLP branch) is read, per
#: `model_type`: the sub-module of a block whose input it is. Pre-norm blocks: the norm before the
#: MLP; sandwich norms (Gemma 2/3): pre_feedforward_layernorm, since post_attention_layernorm there
#: normalises the attention output before the add; post-norm OLMo 2: the MLP itself (its norms act on
#: branch outputs). A family not listed is refused rather than guessed.
MID_SITE = {
    "llama": "post_attention_layernorm", "mistral": "post_attention_layernorm",
    "mixtral": "post_attention_layernorm", "qwen2": "post_attention_layernorm",
    "qwen3": "post_attention_layernorm", "qwen3_moe": "post_attention_layernorm",
    "gemma2": "pre_feedforward_layernorm", "gemma3_text": "pre_feedforward_layernorm",
    "olmo2": "mlp",
}
#: Parallel-residual blocks: attention and MLP both read the block input, so no mid-point exists.
PARALLEL_RESIDUAL = ("gpt_neox", "phi", "gptj", "cohere", "falcon")


def check_sites(model_type: str, sites) -> None:
    """Refuse `--sites resid_mid` on a family without a known mid-block point, before any work."""
    if Site.resid_mid not in [Site(s) for s in sites]:
        return
    if model_type in PARALLEL_RESIDUAL:
        raise UserError(f"--sites resid_mid: {model_type} blocks are parallel-residual (attention and MLP both "
                        "read the block input), so there is no mid-block residual stream; use resid_post")
    if model_type not in MID_SITE:
        raise UserError(f"--sites resid_mid: where the mid-block residual lies in {model_type!r} blocks is not known "
                        f"(known: {', '.join(sorted(MID_SITE))}); use resid_post")


def lm_head_logits(model):
    """`hidden [m, d] -> logits [m, vocab]` as the family's causal-LM head computes them, applied to
    final-norm'd hidden states: the output embedding plus Gemma's tanh soft-capping, Cohere's
    logit_scale and Granite's logits_scaling."""
    import torch

    head = model.get_output_embeddings()
    tc = model.config.get_text_config()
    cap = getattr(tc, "final_logit_softcapping", None)
    mul = getattr(tc, "logit_scale", None) if tc.model_type.startswith("cohere") else None
    div = getattr(tc, "logits_scaling", None) if tc.model_type.startswith("granite") else None

    def f(h, out=None):
        """`out`: a float32 [m, vocab] buffer (`HeadScratch`) the logits of a float32 Linear head are
        written into and scaled in place, the same bits as new tensors; otherwise unused."""
        h = h.to(head.weight.device)
        x = linear_into(h, head.weight, head.bias, out) if out is not None and f.fills_buffer else head(h)
        # in place only on our buffer: never under autograd, where tanh_ would break the backward
        return _scaled(x, mul, div, cap, inplace=x is out)

    #: whether `out` is used: a float32 Linear head (an engine keeps no logits buffer otherwise)
    f.fills_buffer = type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    return f


def _scaled(x, mul, div, cap, inplace: bool):
    """Cohere's multiplier, Granite's division and Gemma's soft cap (the same bits in place or not)."""
    if mul is not None:
        x = x.mul_(mul) if inplace else x * mul
    if div is not None:
        x = x.div_(div) if inplace else x / div
    if cap is not None:
        x = x.div_(cap).tanh_().mul_(cap) if inplace else (x / cap).tanh() * cap
    return x


def _load(torch, model: str, revision, dtype, hf, gguf_file, device_map):
    from transformers import AutoModelForCausalLM

    from tourray.model.gguf import dequantize_kwargs, resolve_gguf

    path, gguf = resolve_gguf(model, gguf_file)
    kw = {"revision": revision, "dtype": getattr(torch, dtype)}
    if gguf is not None:
        kw.update(gguf_file=gguf, **dequantize_kwargs())
    if hf is not None and hf.attn_implementation is not None:
        kw["attn_implementation"] = hf.attn_implementation
    if device_map is not None:
        kw["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


class HFEngine:
    """A transformers model with hooks on every decoder block, run on padded batches.

    `layers` x `sites` are hooked; only `store` of them are handed back as vectors. A hook casts its
    tensor straight into one preallocated [stored keys, B, T, d] buffer in the store dtype (the only
    copy a stored vector gets on the device: no float32 clone is kept while the forward goes on) and
    hands it to the `sink` at once, in the model's dtype on its device (inline statistics accumulate
    there, so no hooked tensor outlives its hook). Only the base model runs; the LM head is applied
    `hf.lm_head_positions` positions at a time, so float32 logits never take batch x length x vocab.
    """

    def __init__(self, model: str, revision: str | None, model_dtype: str, store_dtype: str,
                 layers: list[int], sites: list[Site], num_layers: int, device: str = "cpu",
                 store: list[int] | None = None, inner_sites: tuple[str, ...] = (), reference: str | None = None,
                 reference_revision: str | None = None, hf=None, gpus: float | None = None,
                 gguf_file: str | None = None, logits: tuple[str, int] | None = None):
        import torch

        self.torch = torch
        gpus = (1.0 if device != "cpu" else 0.0) if gpus is None else gpus
        if gpus > 0 and not torch.cuda.is_available():
            raise UserError(f"--gpus-per-actor {gpus:g}: CUDA was asked for but torch sees no GPU in this actor "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use --gpus-per-actor 0 "
                            "for a CPU run")
        # several whole GPUs per actor: shard the layers across them (accelerate's device_map)
        device_map = "auto" if gpus > 1 else None
        self.device = "cuda" if gpus > 0 else "cpu"
        self.chunk = 512 if hf is None else hf.lm_head_positions
        self.logits = logits  # --logits: ("top", K) or ("sample", N)
        self.store = getattr(torch, store_dtype)
        self.model = _load(torch, model, revision, model_dtype, hf, gguf_file, device_map)
        if device_map is None:
            self.model.to(self.device)
        self.base = self.model.get_decoder()
        self.head = lm_head_logits(self.model)
        out_emb = self.model.get_output_embeddings()
        self.head_device = out_emb.weight.device  # where the logits live
        self.scratch = HeadScratch(logits=self.head.fills_buffer)
        self.vocab = out_emb.weight.shape[0]
        # the reference (e.g. the unpruned original) runs on the same padded ids, for the per-token KL
        self.reference = self.ref_base = self.ref_head = None
        if reference is not None:
            self.reference = _load(torch, reference, reference_revision, model_dtype, hf, None, device_map)
            if device_map is None:
                self.reference.to(self.device)
            rv = self.reference.get_output_embeddings().weight.shape[0]
            if rv != self.vocab:
                raise UserError(f"--reference: its vocabulary has {rv} logits, the model {self.vocab}: "
                                "the two must share one tokenizer and LM head width")
            self.ref_base, self.ref_head = self.reference.get_decoder(), lm_head_logits(self.reference)
        self.model_type = text_model_type(self.model.config)
        check_sites(self.model_type, sites)
        _, blocks = find_blocks(self.model, num_layers)
        self._out, self._sink, self._lengths = None, None, None  # set for the batch being captured
        self.keys = []
        stored = set(layers if store is None else store)
        for layer in layers:
            for site in sites:
                if layer == -1 and site != Site.resid_post:
                    continue  # the embedding output has no mid-block site
                self.keys.append((layer, site.value))
                self._hook(blocks, layer, site)
        self.stored_keys = [k for k in self.keys if k[0] in stored]
        self._slot = {k: j for j, k in enumerate(self.stored_keys)}
        self.inner_keys = []
        for site in inner_sites:
            path = INNER_SITES[site][0]
            for layer in range(num_layers):
                mod = _submodule(blocks[layer], path)
                if mod is None:
                    raise UserError(f"inline statistics of {site}: block {layer} ({type(blocks[layer]).__name__}) "
                                    f"has no {path}")
                key = (layer, site)
                self.inner_keys.append(key)
                mod.register_forward_pre_hook(lambda m, args, key=key: self._keep(key, args[0]))
        tc = self.model.config.get_text_config()
        self.num_heads, self.hidden_size = tc.num_attention_heads, tc.hidden_size
        # hooks would see only the tokens after the prefix: the prefix cache is for tokens-only captures
        cached = (hf is None or hf.prefix_cache) and not self.keys and not self.inner_keys and device_map is None
        self.prefix_cache = PrefixCache(self.base) if cached else None
        self.ref_prefix_cache = PrefixCache(self.ref_base) if cached and self.reference is not None else None

    @classmethod
    def from_config(cls, cfg, layers: list[int], num_layers: int, stored: list[int], inner_sites: tuple[str, ...]):
        return cls(cfg.model, cfg.revision, cfg.resolved_model_dtype, cfg.store_dtype.value, layers, cfg.sites,
                   num_layers, device="cuda" if cfg.gpus_per_actor > 0 else "cpu", store=stored,
                   inner_sites=inner_sites, reference=cfg.reference, reference_revision=cfg.reference_revision, hf=cfg.hf, gpus=cfg.gpus_per_actor,
                   gguf_file=getattr(cfg, "gguf_file", None), logits=cfg.logits_spec)

    def _keep(self, key, t) -> None:
        """In the hook, while `t` is what the model computed (later in-place kernels may change it):
        cast-copy a stored key into its slot, hand every key to the sink."""
        j = self._slot.get(key)
        if j is not None and self._out is not None:
            self._out[j].copy_(t)
        if self._sink is not None:
            self._sink({key: t}, self._lengths)

    @staticmethod
    def _first(args, kwargs):
        return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))

    def _hook(self, blocks, layer: int, site: Site) -> None:
        key = (layer, site.value)
        keep = lambda t: self._keep(key, t)  # noqa: E731

        if layer == -1:  # input of block 0 = embedding output
            blocks[0].register_forward_pre_hook(lambda m, args, kwargs: keep(self._first(args, kwargs)),
                                                with_kwargs=True)
        elif site == Site.resid_post:
            blocks[layer].register_forward_hook(lambda m, args, out: keep(out[0] if isinstance(out, tuple) else out))
        else:
            mod = _submodule(blocks[layer], MID_SITE[self.model_type])
            if mod is None:
                raise UserError(f"--sites resid_mid: block {layer} ({type(blocks[layer]).__name__}) has no "
                                f"{MID_SITE[self.model_type]}")
            mod.register_forward_pre_hook(lambda m, args, kwargs: keep(self._first(args, kwargs)), with_kwargs=True)

    def capture(self, batch: list[np.ndarray], sink=None, reference: list[RefSupport] | None = None,
                prefix: int = 0) -> list[Captured]:
        """Forward one padded batch; `sink(tensors, lengths)` (optional) sees each hooked tensor
        [B, T, ...] in the model dtype, from inside its hook, in layer order. `reference`: each
        sample's stored reference distribution (--reference-run), for kl_ref without a second model.
        `prefix`: the first tokens every sequence of the batch (and of its group) shares; a
        tokens-only capture runs them once (`PrefixCache`)."""
        torch = self.torch
        n = [len(x) for x in batch]
        ids, mask = right_padded(batch)
        with torch.inference_mode():
            dev = self.model.get_input_embeddings().weight.device
            ids, mask = ids.to(dev), mask.to(dev)
            if self.stored_keys:
                self._out = torch.empty((len(self.stored_keys), *ids.shape, self.hidden_size), dtype=self.store,
                                        device=dev)
            self._sink, self._lengths = sink, n
            use = self.prefix_cache is not None and prefix >= PrefixCache.MIN_TOKENS
            try:
                hidden = self.prefix_cache(ids, mask, prefix) if use else \
                    self.base(input_ids=ids, attention_mask=mask, use_cache=False)[0]
            finally:
                out_buf, self._out, self._sink, self._lengths = self._out, None, None, None
            # one device-to-host copy of every stored vector of the batch: [K, B, T, d]; on a GPU the
            # device buffer is let go before the LM head and the reference run
            host = None if out_buf is None else out_buf.cpu()
            del out_buf
            ref_hidden = None if self.reference is None else self.ref_prefix_cache(ids, mask, prefix) if use else \
                self.ref_base(input_ids=ids, attention_mask=mask, use_cache=False)[0]
            s, e, kl, sup = self._stats(hidden, ref_hidden, ids, mask, n, batch, reference)
        out = []
        for i, length in enumerate(n):
            vecs = {}
            for j, k in enumerate(self.stored_keys):
                v = host[j, i, :length]
                vecs[k] = v.numpy() if self.store != torch.bfloat16 else v.view(torch.int16).numpy().view(np.uint16)
            out.append(Captured(s[i], e[i], vecs, kl_ref=None if kl is None else kl[i],
                                logits=None if sup is None else sup[i]))
        return out

    def _stats(self, hidden, ref_hidden, ids, mask, n, batch=None, reference=None):
        """Per-sample surprisal, entropy (and KL to the reference model or stored reference, and the
        --logits support), nan at position 0: the LM head and float32 log-softmax run over the
        batch's predicting positions `self.chunk` at a time."""
        torch = self.torch
        pred = mask[:, 1:].bool()  # position t predicts token t+1 of the same sample
        h = hidden[:, :-1][pred]
        nxt = ids[:, 1:][pred]
        rh = None if ref_hidden is None else ref_hidden[:, :-1][pred.to(ref_hidden.device)]
        rs = None if reference is None else _flat_reference(torch, reference, n, h.device)
        u = None
        if self.logits is not None and self.logits[0] == "sample":  # rows in the same (row-major) order
            u = np.concatenate([support_uniforms(np.asarray(x), self.logits[1]) for x in batch])
        parts, sup_parts = [], []
        for a in range(0, h.shape[0], self.chunk):
            hc = h[a : a + self.chunk]
            lg, lp, tmp = self.scratch(len(hc), self.vocab, self.head_device)
            logits = self.head(hc, out=lg)
            ref = None if rh is None else self.ref_head(rh[a : a + self.chunk]).to(logits.device)
            support = None if self.logits is None else \
                (lambda lp, a=a: logit_support(lp, self.logits, None if u is None else u[a : a + self.chunk]))
            rsc = None if rs is None else tuple(x[a : a + self.chunk].to(logits.device) for x in rs[:3])
            cs, ce, ck, *sp = token_stats(logits, nxt[a : a + self.chunk].to(logits.device), ref, support, rsc,
                                             scratch=(lp, tmp))
            if ck is not None and rs is not None:
                ck = ck.masked_fill(~rs[3][a : a + self.chunk].to(ck.device), float("nan"))  # no stored row
            sup_parts += sp
            parts.append(torch.stack([cs, ce] + ([] if ck is None else [ck])))
        flat = torch.cat(parts, 1).cpu().numpy() if parts else np.zeros((3, 0), np.float32)
        res = [[], [], []]
        off = 0
        for length in n:
            m = length - 1
            for r in range(flat.shape[0] if parts else 3):
                col = np.full(length, np.nan, dtype=np.float32)
                col[1:] = flat[r, off : off + max(m, 0)]
                res[r].append(col)
            off += max(m, 0)
        sup = None if self.logits is None else Support.split(sup_parts, n)
        return res[0], res[1], (res[2] if ref_hidden is not None or rs is not None else None), sup


class PrefixCache:
    """The key/value cache of a token prefix every sequence of a batch shares (the system prompt and
    chat template before each text), computed once (batch 1) and reused while the prefix is the
    same: a batch then runs only its tokens after the prefix, attending to the cached keys and values,
    and the prefix's final hidden states are copied in front. The caller passes the prefix length of
    the whole group (a fixed slice of the run), so a resumed group computes exactly what it did."""

    MIN_TOKENS = 16  # below this the saving does not pay for the copy of the cache

    def __init__(self, base):
        import inspect

        self.base = base
        # transformers 5.x calls it `cache`; 4.x `past_key_values`
        self.kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.ids = self.hidden = self.kv = None

    def __call__(self, ids, mask, prefix: int):
        import copy

        import torch

        head = ids[0, :prefix]
        if self.ids is None or not torch.equal(self.ids, head):
            out = self.base(input_ids=ids[:1, :prefix], use_cache=True)
            self.ids, self.hidden = head.clone(), out[0]
            self.kv = out[self.kw] if self.kw in out else out["past_key_values"]
        kv = copy.deepcopy(self.kv)  # the forward appends to it
        kv.batch_repeat_interleave(ids.shape[0])
        rest = self.base(input_ids=ids[:, prefix:], attention_mask=mask, use_cache=True, **{self.kw: kv})[0]
        return torch.cat([self.hidden.expand(ids.shape[0], -1, -1), rest], 1)


def _flat_reference(torch, reference: list[RefSupport], n: list[int], device):
    """The stored reference rows laid out like the batch's predicting positions (sample after
    sample, n - 1 each): (ids, logprobs, rest, has_row); the row of token t sits at position t - 1."""
    k = max((r.ids.shape[1] for r in reference), default=1)
    m = sum(max(x - 1, 0) for x in n)
    ids = np.zeros((m, k), np.int64)
    lp = np.full((m, k), -np.inf, np.float32)
    rest = np.zeros(m, np.float32)
    has = np.zeros(m, bool)
    off = 0
    for r, length in zip(reference, n):
        rows = len(r.rest)
        if rows:
            sl = slice(off + r.start - 1, off + r.start - 1 + rows)
            ids[sl], lp[sl], rest[sl], has[sl] = r.ids, r.logprobs, r.rest, True
        off += max(length - 1, 0)
    return tuple(torch.from_numpy(x).to(device) for x in (ids, lp, rest, has))
