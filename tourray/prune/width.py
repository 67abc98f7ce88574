"""`tourray prune width`: fewer FFN neurons, attention heads and (SliceGPT-style) residual channels in
every block, chosen from the lake's statistics, written as a standard checkpoint by `tourray.surgery.fold`.

Scores (per block, from the capture's inline statistics: `--stats units` (or moments) keeps per-channel moments of
the MLP activation, the down_proj input, and of each head's output norm, the o_proj input):
- magnitude: mean |a| of the channel (neurons) / mean head-output norm (heads);
- variance: the channel's variance over tokens;
- activation-norm: the RMS of what the unit writes to the residual stream, sqrt(E[a^2]) times the norm
  of its output weights (down_proj column; o_proj columns of the head / sqrt(head_dim)): a unit with
  large activations but tiny output weights contributes little.
The same number is kept in every block (the config stays standard): the top fraction of neurons; per
key/value group the same number of its query heads (`--head-unit query`), or whole groups with their
key/value head (`--head-unit group`). Kept units keep their original order.

`--hidden K` slices the residual width: one orthonormal basis for the whole model, the top K
eigenvectors of the sum over stored layers of each layer's uncentred second moment (normalised by its
trace, all tokens: the attention sink's massive activation must survive), folded like a rotation with
the RMSNorm correction (tourray/surgery/fold.py). Lossy by design: the QA report measures the loss.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tourray.lake import tables as lk
from tourray.config import EMBED_LAYER, BaseConfig, StorageOptions, storage_options_field
from tourray.errors import UserError

log = logging.getLogger("tourray")

SCORES = ("magnitude", "variance", "activation-norm")


class WidthConfig(BaseConfig):
    """`tourray prune width`: every field is a flag."""

    model: str = Field(description="The checkpoint folder the run captured (safetensors).")
    lake: str = Field("lake", description="Lake holding the run's statistics.")
    storage_options: StorageOptions = storage_options_field()
    run: str = Field(description="Run captured with --stats units or moments (per-channel MLP and per-head statistics); "
                                 "--hidden also needs its stored resid_post vectors.")
    keep_heads: float = Field(1.0, gt=0, le=1, description="Fraction of query heads kept per block (per key/value group with --head-unit query).")
    keep_neurons: float = Field(1.0, gt=0, le=1, description="Fraction of FFN neurons kept per block.")
    hidden: int | None = Field(None, gt=0, description="Residual width to slice to (SliceGPT: top principal directions of the residual stream); default: unchanged.")
    method: Literal["magnitude", "variance", "activation-norm"] = Field("activation-norm", description="Unit score: magnitude (mean |a|), variance, activation-norm (RMS of the unit's write to the residual stream).")
    head_unit: Literal["query", "group"] = Field("query", description="query: keep the same number of query heads in every key/value group; group: keep whole groups (fewer key/value heads).")
    out: str = Field(description="Checkpoint folder to write (new or empty).")


def kept_count(frac: float, total: int) -> int:
    """How many of `total` units a keep fraction keeps (at least one): one rounding for every caller."""
    return max(1, min(total, int(round(frac * total))))


def unit_moments(lake: lk.Lake, run: str, layers: int) -> tuple[list, list]:
    """Per block: merged moments of the MLP activation channels and of the head-output norms."""
    from tourray.stats.inline import INLINE_SELECTION
    from tourray.stats.stream import complete_samples, source_digest
    from tourray.stats.tasks import read_moments

    if not lake.exists("moments"):
        raise UserError(f"--run {run}: the lake has no statistics; capture the run with --stats units (or moments)")
    source = source_digest(complete_samples(lake, run))
    sel = INLINE_SELECTION.key()
    mlp = [read_moments(lake, run, "mlp_act", sel, source, "mlp", i) for i in range(layers)]
    heads = [read_moments(lake, run, "head_out", sel, source, "head", i) for i in range(layers)]
    missing = [i for i in range(layers) if mlp[i] is None or heads[i] is None]
    if missing:
        raise UserError(f"--run {run}: no inline MLP / head statistics for block {missing[0]} (of its complete samples); "
                        "capture it with `tourray capture --stats units` (or moments; add --store none to keep no vectors)")
    return mlp, heads


def _out_norms(model: str, lay, name: str, per: int) -> np.ndarray:
    """[layers, units]: the norm of each unit's output weights (columns of o_proj / down_proj)."""
    from safetensors import safe_open

    from tourray.surgery.fold import weight_files

    want = {f"model.layers.{i}.{name}.weight": i for i in range(lay.layers)}
    out = [None] * lay.layers
    for f in weight_files(Path(model)):
        with safe_open(str(f), framework="pt") as fh:
            for n in fh.keys():
                if n in want:
                    w = fh.get_tensor(n).double().numpy()  # [d, units * per]
                    out[want[n]] = np.sqrt((w.reshape(w.shape[0], -1, per) ** 2).sum((0, 2)) / per)
    return np.stack(out)


def scores(cfg: WidthConfig, lay, mlp: list, heads: list) -> tuple[np.ndarray, np.ndarray]:
    """[layers, d_ff] neuron scores and [layers, heads] head scores (higher = keep)."""
    def one(m):
        if cfg.method == "magnitude":
            return np.asarray(m.abs_mean)
        if cfg.method == "variance":
            return np.asarray(m.var)
        return np.sqrt(np.asarray(m.var) + np.asarray(m.mean) ** 2)

    n, h = np.stack([one(m) for m in mlp]), np.stack([one(m) for m in heads])
    if n.shape[1] != lay.ffn or h.shape[1] != lay.heads:
        raise UserError(f"--run {cfg.run}: its statistics have {n.shape[1]} MLP channels and {h.shape[1]} heads, "
                        f"--model {cfg.model} has {lay.ffn} and {lay.heads}: not the model the run captured")
    if cfg.method == "activation-norm":
        n = n * _out_norms(cfg.model, lay, "mlp.down_proj", 1)
        h = h * _out_norms(cfg.model, lay, "self_attn.o_proj", lay.head_dim) * np.sqrt(lay.head_dim)
    return n, h


def choose(cfg: WidthConfig, lay, neuron_scores: np.ndarray, head_scores: np.ndarray):
    """The Surgery's unit indices: top neurons; heads per group or whole groups (original order kept)."""
    from tourray.surgery.fold import Surgery

    s = Surgery()
    if cfg.keep_neurons < 1:
        k = kept_count(cfg.keep_neurons, lay.ffn)
        s.neurons = {i: np.sort(np.argsort(-neuron_scores[i], kind="stable")[:k]) for i in range(lay.layers)}
    if cfg.keep_heads < 1:
        if cfg.head_unit == "group":
            k = kept_count(cfg.keep_heads, lay.kv_heads)
            if k == lay.kv_heads:
                raise UserError(f"--keep-heads {cfg.keep_heads} --head-unit group: keeps all {lay.kv_heads} key/value "
                                "groups once rounded; lower it, or use --head-unit query")
            by_group = head_scores.reshape(lay.layers, lay.kv_heads, lay.group).sum(-1)
            s.groups = {i: np.sort(np.argsort(-by_group[i], kind="stable")[:k]) for i in range(lay.layers)}
        else:
            k = kept_count(cfg.keep_heads, lay.group)
            if k == lay.group:
                raise UserError(f"--keep-heads {cfg.keep_heads}: keeps all {lay.group} query heads of each key/value "
                                "group; lower it, or use --head-unit group")
            s.heads = {}
            for i in range(lay.layers):
                g = head_scores[i].reshape(lay.kv_heads, lay.group)
                s.heads[i] = np.concatenate([j * lay.group + np.sort(np.argsort(-g[j], kind="stable")[:k])
                                             for j in range(lay.kv_heads)])
    return s


def slicing_basis(lake: lk.Lake, run: str, k: int, d: int) -> tuple[np.ndarray, dict]:
    """Q [d, k]: the top-k eigenvectors of the trace-normalised sum of every stored resid_post layer's
    uncentred second moment, over all tokens; and what it keeps (explained fraction per layer)."""
    from tourray.stats.stream import Selection, complete_samples, source_digest
    from tourray.stats.tasks import StatsConfig, read_moments, run_stats, stored_layers

    from tourray.prune.plan import run_row

    row = run_row(lake, run)
    layers = [l for l in stored_layers(row) if l != EMBED_LAYER] if "resid_post" in row["sites"] else []
    if not layers:
        raise UserError(f"--hidden: run {run} stored no resid_post vectors: the slicing basis comes from them")
    sel = Selection(text_only=False)
    # exactly the stored blocks: a run may hook more (for inline statistics) than it stores
    run_stats(StatsConfig(lake=lake.root, storage_options=lake.storage_options or {}, run=run,
                          layers=",".join(map(str, layers)), pairs="none", text_only=False), progress=False)
    source = source_digest(complete_samples(lake, run))
    total = np.zeros((d, d))
    seconds = {}
    for l in layers:
        m = read_moments(lake, run, "resid_post", sel.key(), source, "layer", l)
        c = m.m2 / m.w + np.outer(m.mean, m.mean)
        seconds[l] = c
        total += c / np.trace(c)
    lam, v = np.linalg.eigh((total + total.T) / 2)
    q = v[:, ::-1][:, :k]
    kept = {int(l): float(np.trace(q.T @ c @ q) / np.trace(c)) for l, c in seconds.items()}
    return np.ascontiguousarray(q), dict(layers=layers, kept_energy=kept, tokens=int(m.n))


def run_width(cfg: WidthConfig, progress: bool = True) -> dict:
    """Check, score, choose, fold: the narrower checkpoint and what was kept."""
    from tourray.surgery.fold import apply_surgery, parameters, read_layout
    from tourray.model.identity import model_revision
    from tourray.surgery.blocks import check_out
    from tourray.prune.plan import run_row

    check_out(cfg.out)
    lay = read_layout(cfg.model)
    if cfg.keep_heads == 1 and cfg.keep_neurons == 1 and cfg.hidden is None:
        raise UserError("nothing to prune: give --keep-heads or --keep-neurons below 1, or --hidden")
    if cfg.hidden is not None and cfg.hidden >= lay.hidden:
        raise UserError(f"--hidden {cfg.hidden}: must be below the model's hidden size {lay.hidden}")
    if cfg.hidden is not None:
        from tourray.surgery.fold import Surgery

        Surgery(residual=np.eye(lay.hidden)[:, :cfg.hidden]).check(lay)  # a width transformers can reload
    lake = lk.Lake(cfg.lake, cfg.storage_options)
    if not lake.exists("runs"):
        raise UserError(f"--lake {cfg.lake}: no runs table (not a tourray lake?)")
    row = run_row(lake, cfg.run)
    revision = model_revision(cfg.model, None)
    if row["model_revision"] != revision:
        raise UserError(f"--run {cfg.run} captured model revision {row['model_revision']}, --model {cfg.model} is "
                        f"{revision}: width scores must come from this model's activations")
    surgery, info = None, {}
    if cfg.keep_heads < 1 or cfg.keep_neurons < 1:
        mlp, heads = unit_moments(lake, cfg.run, lay.layers)
        ns, hs = scores(cfg, lay, mlp, heads)
        surgery = choose(cfg, lay, ns, hs)
        info["tokens"] = int(mlp[0].n)
        if surgery.neurons:
            info["neuron_score_kept"] = float(np.mean([ns[i][surgery.neurons[i]].sum() / ns[i].sum() for i in surgery.neurons]))
    else:
        from tourray.surgery.fold import Surgery

        surgery = Surgery()
    if cfg.hidden is not None:
        surgery.residual, info["slicing"] = slicing_basis(lake, cfg.run, cfg.hidden, lay.hidden)
    prov = dict(kind="prune width", run=cfg.run, lake=lake.root, method=cfg.method, keep_heads=cfg.keep_heads,
                keep_neurons=cfg.keep_neurons, head_unit=cfg.head_unit, hidden=cfg.hidden, evidence=info,
                table_versions={t: lake.dataset(t).version for t in ("runs", "samples", "moments") if lake.exists(t)})
    out = apply_surgery(cfg.model, cfg.out, surgery, prov, progress=progress)
    before = parameters(cfg.model)
    log.info("width-pruned %s: %.2fM -> %.2fM parameters (%.1f%%)", cfg.model, before / 1e6, out["parameters"] / 1e6,
             100 * out["parameters"] / before)
    return dict(out, parameters_before=before, evidence=info, residual=surgery.residual)

