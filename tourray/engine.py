"""Engines run a model on token ids and hand back, per sample, surprisal, entropy and the hooked
residual-stream vectors (`Captured`). The capture stage writes whatever an engine returns, so every
engine fills the very same tables. `HFEngine` runs transformers with hooks on every decoder block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tourray.config import Site
from tourray.errors import UserError

_MID_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm")


def find_blocks(model, num_layers: int):
    """The decoder blocks of any transformers causal LM: the outermost ModuleList of that length."""
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers:
            return name, mod
    raise UserError(f"cannot find a list of {num_layers} decoder blocks in {type(model).__name__}")


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


def surprisal_entropy(logits, ids, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced -log p(token_t | <t) and the entropy of the predicting distribution, in nats,
    from a float32 log-softmax; position 0 has neither (nan). Chunked to bound memory at large vocab."""
    import torch

    n = logits.shape[0]
    s = torch.full((n,), float("nan"))
    e = torch.full((n,), float("nan"))
    for a in range(0, n - 1, chunk):
        b = min(n - 1, a + chunk)
        lp = torch.log_softmax(logits[a:b].float(), dim=-1)
        s[a + 1 : b + 1] = -lp.gather(1, ids[a + 1 : b + 1, None])[:, 0].cpu()
        e[a + 1 : b + 1] = -(lp.exp() * lp).sum(-1).cpu()
    return s.numpy(), e.numpy()


def kl_divergence(ref_logits, logits, chunk: int = 512) -> np.ndarray:
    """KL(p_ref || p) in nats per position, from float32 log-softmaxes of both models' full logits,
    aligned like `surprisal_entropy`: position t holds the KL of the distributions that predicted
    token t (nan at position 0)."""
    import torch

    n = logits.shape[0]
    kl = torch.full((n,), float("nan"))
    for a in range(0, n - 1, chunk):
        b = min(n - 1, a + chunk)
        lr = torch.log_softmax(ref_logits[a:b].float(), dim=-1)
        lp = torch.log_softmax(logits[a:b].float(), dim=-1)
        kl[a + 1 : b + 1] = (lr.exp() * (lr - lp)).sum(-1).clamp_min(0).cpu()
    return kl.numpy()
