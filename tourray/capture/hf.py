"""`HFEngine`: a transformers model with hooks on every decoder block, run on padded batches."""

from __future__ import annotations

import numpy as np

from tourray.capture.engine import INNER_SITES, Captured, _submodule, find_blocks, kl_divergence, surprisal_entropy
from tourray.config import Site
from tourray.errors import UserError

_MID_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm")


class HFEngine:
    """A transformers model with hooks on every decoder block, run on padded batches.

    `layers` x `sites` are hooked; only `store` of them are converted to the store dtype and handed
    back as vectors. A `sink` passed to `capture` sees every hooked tensor first, in the model's
    dtype and on its device, before any cast (inline statistics accumulate there).
    """

    def __init__(self, model: str, revision: str | None, model_dtype: str, store_dtype: str,
                 layers: list[int], sites: list[Site], num_layers: int, device: str = "cpu",
                 store: list[int] | None = None, inner_sites: tuple[str, ...] = (), reference: str | None = None,
                 reference_revision: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
        self.store = getattr(torch, store_dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=getattr(torch, model_dtype))
        self.model.to(self.device).eval()
        # the reference (e.g. the unpruned original) runs on the same padded ids, for the per-token KL
        self.reference = None if reference is None else AutoModelForCausalLM.from_pretrained(
            reference, revision=reference_revision, dtype=getattr(torch, model_dtype)).to(self.device).eval()
        _, blocks = find_blocks(self.model, num_layers)
        self._buf: dict[tuple[int, str], object] = {}
        self.keys = []
        stored = set(layers if store is None else store)
        for layer in layers:
            for site in sites:
                if layer == -1 and site != Site.resid_post:
                    continue  # the embedding output has no mid-block site
                self.keys.append((layer, site.value))
                self._hook(blocks, layer, site)
        self.stored_keys = [k for k in self.keys if k[0] in stored]
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
        self.num_heads = tc.num_attention_heads

    @classmethod
    def from_config(cls, cfg, layers: list[int], num_layers: int, stored: list[int], inner_sites: tuple[str, ...]):
        return cls(cfg.model, cfg.revision, cfg.resolved_model_dtype, cfg.store_dtype.value, layers, cfg.sites,
                   num_layers, device="cuda" if cfg.gpus_per_actor > 0 else "cpu", store=stored,
                   inner_sites=inner_sites, reference=cfg.reference)

    def _keep(self, key, t) -> None:
        # a copy, never a view: later in-place kernels must not change what was captured
        self._buf[key] = t.detach().clone()

    def _hook(self, blocks, layer: int, site: Site) -> None:
        key = (layer, site.value)
        keep = lambda t: self._keep(key, t)  # noqa: E731

        if layer == -1:  # input of block 0 = embedding output
            blocks[0].register_forward_pre_hook(
                lambda m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        elif site == Site.resid_post:
            blocks[layer].register_forward_hook(lambda m, args, out: keep(out[0] if isinstance(out, tuple) else out))
        else:
            norm = next((getattr(blocks[layer], n) for n in _MID_NORMS if hasattr(blocks[layer], n)), None)
            if norm is None:
                raise UserError(f"--sites resid_mid: block {layer} ({type(blocks[layer]).__name__}) has none of {_MID_NORMS}")
            norm.register_forward_pre_hook(lambda m, args: keep(args[0]))

    def capture(self, batch: list[np.ndarray], sink=None) -> list[Captured]:
        """Forward one padded batch; `sink(tensors, lengths)` (optional) sees the hooked tensors
        [B, T, ...] in the model dtype before they are cast and copied to the host."""
        torch = self.torch
        n = [len(x) for x in batch]
        ids = torch.zeros((len(batch), max(n)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(batch):
            ids[i, : n[i]] = torch.from_numpy(x)
            mask[i, : n[i]] = 1
        self._buf.clear()
        with torch.inference_mode():
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            if sink is not None:
                sink(self._buf, n)
            store = {k: self._buf[k].to(self.store) for k in self.stored_keys}
            self._buf.clear()
            ref = None if self.reference is None else \
                self.reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
            if ref is not None and ref.shape[-1] != logits.shape[-1]:
                raise UserError(f"--reference: its vocabulary has {ref.shape[-1]} logits, the model {logits.shape[-1]}: "
                                "the two must share one tokenizer and LM head width")
            out = []
            for i, length in enumerate(n):
                s, e = surprisal_entropy(logits[i, :length], ids[i, :length])
                vecs = {k: v[i, :length].cpu().numpy() if self.store != torch.bfloat16
                        else v[i, :length].cpu().view(torch.int16).numpy().view(np.uint16)
                        for k, v in store.items()}
                kl = None if ref is None else kl_divergence(ref[i, :length], logits[i, :length])
                out.append(Captured(s, e, vecs, kl_ref=kl))
            for k, v in store.items():
                finite = torch.isfinite(v).all(-1)  # [B, T]
                for i, length in enumerate(n):
                    if out[i].not_finite is None and not bool(finite[i, :length].all()):
                        out[i].not_finite = k
        return out
