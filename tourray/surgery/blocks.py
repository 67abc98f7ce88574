"""Model surgery for depth (layer) pruning of a transformers decoder-only causal LM, and the pruned
checkpoint folder.

Works on any model whose decoder blocks are a `ModuleList` (Llama, Qwen2/3, Mistral, Gemma, ...):
`remove_blocks` deletes blocks and keeps the KV cache and config consistent, `fold_mlp_patch` /
`fold_embedding_patch` fold a ReplaceMe linear patch (arXiv 2505.02819) into the weights so the pruned
model stays a plain checkpoint, `write_checkpoint` writes the folder atomically, and `skipping` makes the
ORIGINAL model skip blocks: the independent reference a pruned model is checked against.

Conventions: row vectors (a hidden state h is a row, a patch acts as h @ T), block indices count from 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import operator
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tourray.errors import UserError

log = logging.getLogger("tourray")

#: The provenance file a pruned checkpoint carries (what was removed, from which model, with which patch).
PROVENANCE = "tourray_prune.json"

#: Config fields that count layers from the bottom ("layers below k are X"): after pruning, the count of
#: kept layers that were below k keeps every kept layer on its side of the threshold (kept order is preserved).
_THRESHOLD_FIELDS = ("max_window_layers", "first_k_dense_replace")
#: Config fields that list layer indices (not one entry per layer): remapped to the new indices.
_INDEX_LIST_FIELDS = ("mlp_only_layers", "moe_layers")
#: Names of MLP output projections, as paths inside a block (`y = x W^T (+ b)`, W is [d, d_ff]).
_MLP_OUT = ("mlp.down_proj", "feed_forward.down_proj")
#: Norms some architectures (Gemma2/3, Olmo2) apply to the MLP output before the residual add: a patch on
#: the MLP output can then not be folded into the down projection (the norm is not linear).
_POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffw_norm")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _num_layers(model) -> int:
    n = getattr(_text_config(model), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise UserError(f"{type(model).__name__}: its config has no num_hidden_layers; not a decoder-only LM")
    return n


def _blocks(model):
    """(path, ModuleList) of the decoder blocks."""
    from tourray.model.identity import find_blocks

    return find_blocks(model, _num_layers(model))


def check_removed(removed, n: int) -> list[int]:
    """The sorted block indices, or a UserError naming the bad one (out of range, duplicate, all)."""
    try:
        idx = [operator.index(i) for i in removed]
    except TypeError:
        raise UserError(f"blocks to remove must be integers, got {list(removed)!r}") from None
    if not idx:
        raise UserError("no blocks to remove: give at least one block index")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise UserError(f"block {bad[0]} is out of range: the model has {n} blocks, 0..{n - 1}")
    dup = sorted({i for i in idx if idx.count(i) > 1})
    if dup:
        raise UserError(f"block {dup[0]} is listed more than once in the blocks to remove")
    if len(idx) == n:
        raise UserError(f"cannot remove every block: the model has {n} blocks and all {n} are listed")
    return sorted(idx)


def remove_blocks(model, removed: list[int]) -> None:
    """Delete decoder blocks `removed` in place, so the model saves and reloads as a plain, shallower model.

    The kept blocks are renumbered: every sub-module's `layer_idx` becomes the block's new index (the KV
    cache is a list indexed by it, so `generate(use_cache=True)` would otherwise write past its end or into
    another block's slot). The text config follows: `num_hidden_layers`; every list with one entry per
    layer (`layer_types`, `no_rope_layers`, ...: any list whose length was the old layer count); threshold
    counts (`max_window_layers`: Qwen2/3 blocks at index >= it use the sliding window; re-counted over the
    kept blocks, which with the sliced `layer_types` keeps each kept block's attention exactly as it was);
    and layer-index lists (`mlp_only_layers`, `moe_layers`). A fresh model built from the new config on the
    meta device must have the pruned model's parameter names and shapes, or the config has a layer-count
    dependency this function does not know, and the model is left as it was.
    """
    prefix, blocks = _blocks(model)
    tc = _text_config(model)
    n = len(blocks)
    gone = check_removed(removed, n)
    if getattr(tc, "is_heterogeneous", False):
        raise UserError(f"{type(model).__name__}: configs with per-layer overrides (per_layer_config) cannot be "
                        "pruned by tourray yet")
    kept = [i for i in range(n) if i not in set(gone)]
    new_of = {old: new for new, old in enumerate(kept)}

    updates: dict[str, object] = {"num_hidden_layers": len(kept)}
    for name in _THRESHOLD_FIELDS:
        k = getattr(tc, name, None)
        if isinstance(k, int) and not isinstance(k, bool):
            updates[name] = sum(1 for i in kept if i < k)
    for name in _INDEX_LIST_FIELDS:
        v = getattr(tc, name, None)
        if isinstance(v, (list, tuple)):
            updates[name] = type(v)(new_of[i] for i in v if i in new_of)
    for name, v in list(vars(tc).items()):
        # One entry per layer. Token ids and class names can be lists too, and could by chance have L entries.
        if (isinstance(v, (list, tuple)) and len(v) == n and name not in updates and not name.startswith("_")
                and name != "architectures" and not name.endswith(("_token_id", "_token_ids"))):
            updates[name] = type(v)(v[i] for i in kept)

    old = {name: getattr(tc, name, None) for name in updates}
    for name, v in updates.items():
        setattr(tc, name, v)
    try:
        _check_structure(model, prefix, new_of)
    except BaseException:
        for name, v in old.items():
            setattr(tc, name, v)
        raise

    for i in reversed(gone):
        del blocks[i]
    for new, block in enumerate(blocks):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new
    log.info("removed blocks %s of %d; %d left", gone, n, len(kept))


def _check_structure(model, prefix: str, new_of: dict[int, int]) -> None:
    """Refuse when a model built from the (already updated) config would not hold the kept blocks'
    parameters under their new names: reloading the checkpoint would drop or re-initialise weights."""
    import torch

    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as e:  # a class that cannot be built bare: the reload is then the only check
        log.warning("%s: could not rebuild it from the pruned config to check its structure (%s: %s)",
                    type(model).__name__, type(e).__name__, e)
        return
    want = {}
    for k, v in model.state_dict().items():
        if k.startswith(prefix + "."):
            i, rest = k[len(prefix) + 1:].split(".", 1)
            if int(i) not in new_of:
                continue
            k = f"{prefix}.{new_of[int(i)]}.{rest}"
        want[k] = tuple(v.shape)
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if want != got:
        first = sorted(set(want.items()) ^ set(got.items()))[0][0]
        raise UserError(f"{type(model).__name__}: with blocks removed, its config describes another structure "
                        f"(first difference: {first}): a config field depends on the layer count in a way tourray "
                        "does not know, so tourray cannot prune this model")


def _square(T, d: int, what: str) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (d, d):
        raise UserError(f"{what}: the patch must be {d} x {d} (the hidden size), got {' x '.join(map(str, T.shape))}")
    if not np.isfinite(T).all():
        raise UserError(f"{what}: the patch holds inf or nan")
    return T


def _mlp_out(block, index: int):
    import torch

    for path in _MLP_OUT:
        mod = block
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, torch.nn.Linear):
            break
    else:
        raise UserError(f"block {index} ({type(block).__name__}) has no MLP output projection "
                        f"({' or '.join(_MLP_OUT)}; a mixture of experts?): cannot fold a patch into it")
    norms = [n for n in _POST_MLP_NORMS if getattr(block, n, None) is not None]
    if norms:
        raise UserError(f"block {index} ({type(block).__name__}) normalises its MLP output ({norms[0]}) before the "
                        "residual add: a linear patch on that output cannot be folded into the down projection")
    return mod


def fold_mlp_patch(model, block: int, T: np.ndarray) -> None:
    """Fold the ReplaceMe patch into block `block` (its index in the model as it is now): the MLP output m
    that the block adds to the residual stream becomes m @ T, with no new module, so the pruned model
    stays a plain checkpoint of its architecture.

    HF's Linear computes y = x W^T + b, so y @ T = x (T^T W)^T + b @ T: `down_proj.weight <- T^T @ W`,
    `bias <- b @ T`. Computed in float64 (T is the solver's float64 map) and cast back to the weight dtype.
    """
    import torch

    _, blocks = _blocks(model)
    n = len(blocks)
    if not isinstance(block, (int, np.integer)) or not 0 <= block < n:
        raise UserError(f"block {block} is out of range: the model has {n} blocks, 0..{n - 1}")
    lin = _mlp_out(blocks[block], int(block))
    T = _square(T, lin.out_features, f"block {block}")
    with torch.no_grad():
        w = lin.weight
        t = torch.from_numpy(T).to(device=w.device)
        w.copy_((t.T @ w.to(torch.float64)).to(w.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.to(torch.float64) @ t).to(lin.bias.dtype))


def _untie(model) -> bool:
    """Give the LM head its own copy of a weight it shares with the embedding; True when it did.

    Every config that says `tie_word_embeddings` is set False (the flag lives on the top config or on the
    text config depending on the architecture), and the model's cached tying map is recomputed, so neither
    `save_pretrained` (which drops aliased tensors) nor a reload ties them again."""
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or (head.weight is not emb.weight and head.weight.data_ptr() != emb.weight.data_ptr()):
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    configs = {id(c): c for c in (model.config, _text_config(model))}
    for mod in model.modules():
        c = getattr(mod, "config", None)
        if c is not None and hasattr(mod, "get_expanded_tied_weights_keys"):
            configs[id(c)] = c
    for c in configs.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    for mod in model.modules():
        if hasattr(mod, "all_tied_weights_keys") and hasattr(mod, "get_expanded_tied_weights_keys"):
            mod.all_tied_weights_keys = mod.get_expanded_tied_weights_keys(all_submodels=True)
    return True


def fold_embedding_patch(model, T: np.ndarray) -> None:
    """Fold a patch into the token embedding: its output e becomes e @ T (`weight <- E @ T`, float64).

    For a removed span that starts at block 0, where no earlier block's MLP can carry the patch. A head
    tied to the embedding is untied first, keeping the original weight, so the logits' read-out is unchanged.
    """
    import torch

    emb = model.get_input_embeddings()
    w = emb.weight
    T = _square(T, w.shape[1], "embedding")
    if _untie(model):
        log.info("untied the LM head from the embedding before patching the embedding")
    with torch.no_grad():
        t = torch.from_numpy(T).to(device=w.device)
        w.copy_((w.to(torch.float64) @ t).to(w.dtype))


def check_out(out_dir: str | os.PathLike) -> Path:
    """`out_dir` as a Path, or a UserError when it cannot take a new checkpoint (a file, or a non-empty
    folder): callable before the slow work, and called again by `write_checkpoint`."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out_dir} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out: {out_dir} is not empty; give a new or empty folder")
    return out


def write_checkpoint(model, source_dir: str | os.PathLike, out_dir: str | os.PathLike, provenance: dict) -> Path:
    """Write the (pruned) model as a checkpoint folder `out_dir`: safetensors weights and config, the
    tokenizer with its chat template and the generation config of `source_dir`, and `tourray_prune.json`.

    The folder appears whole or not at all: it is built beside `out_dir` and renamed at the end, and a
    failure leaves nothing. A non-empty `out_dir` is refused (a pruned folder is never overwritten)."""
    out = check_out(out_dir)
    src = Path(source_dir).expanduser()
    text = json.dumps(provenance, indent=2, sort_keys=True) + "\n"  # a TypeError here is the caller's bug
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{source_dir}: cannot load its tokenizer to copy it into the pruned checkpoint: {first}") \
            from None

    from tourray.runtime import building_folder

    with building_folder(out, "prune") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
        (tmp / PROVENANCE).write_text(text)
    return out


@contextlib.contextmanager
def skipping(model, removed: list[int]) -> Iterator[None]:
    """Within the block, the ORIGINAL model skips blocks `removed`: each returns its input hidden states.

    The independent reference for a pruned model (no block deleted, no index or config changed). Forward
    hooks replace the output, so the skipped blocks still run and fill their KV cache slots: a forward that
    is given a cache but no positions reads the cache length from slot 0, and an identity in place of block
    0 would leave that slot empty (wrong positions on every later step; `generate` passes positions). Decoder
    blocks return a tensor or (older transformers, some architectures) a tuple whose first entry is the
    hidden states; both are handled. The hooks are removed on exit, also on error.
    """
    import torch

    _, blocks = _blocks(model)
    gone = check_removed(removed, len(blocks))

    def hook(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, torch.Tensor):
            return h
        if isinstance(output, tuple):
            return (h, *output[1:])
        if isinstance(output, list):
            return [h, *output[1:]]
        raise TypeError(f"{type(module).__name__} returned a {type(output).__name__}; cannot skip it")

    handles = [blocks[i].register_forward_hook(hook, with_kwargs=True) for i in gone]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
