"""Checkpoint surgery that keeps a standard HF checkpoint: function-preserving folds (one residual
rotation, FFN-neuron and attention-head permutations) and, with the same algebra, width pruning
(neuron / head subsets) and SliceGPT-style slicing of the residual width.

The maths (row vectors: a hidden state h is a row, HF's Linear is y = x W^T + b):
- RMSNorm commutes with an orthogonal Q only when its weight is all ones, so each residual norm's
  weight g is first absorbed into the linears that read it (W <- W diag(g)) and set to ones.
- The residual stream becomes h Q: embedding E <- E Q; every linear reading it (q/k/v, gate/up, the
  LM head) W <- W Q; every linear writing it (o_proj, down_proj) W <- Q^T W, bias b <- b Q. The SAME
  Q everywhere: a different Q per block would need Q_l^T Q_(l+1) on the residual path (refused).
- Q may be semi-orthogonal, d x K with K < d (`slice`): the stream is projected onto K directions
  (lossy). The RMSNorm over K channels must still divide by the d-channel mean square: its eps becomes
  eps d/K and sqrt(d/K) is folded into the linears that read it; q_norm/k_norm (Qwen3), which share
  that eps, get inputs scaled by sqrt(d/K) so that they are unchanged.
- Neurons: gate/up rows and down_proj columns are re-indexed together; heads: q rows, o_proj columns
  by head, k/v rows by key/value group, never splitting a group from its key/value head (GQA).

Weights are streamed tensor by tensor, one safetensors shard at a time, and each matrix is folded in
float64 blocks of BLOCK elements written into its own dtype: memory is the current shard's output plus
a few 64 MB blocks, whatever the checkpoint's size (only every norm weight, d floats per block, is read
up front). bench/bench_fold.py measures it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from tourray.config import BaseConfig
from tourray.errors import UserError

log = logging.getLogger("tourray")

#: The provenance file a folded / width-pruned checkpoint carries.
PROVENANCE = "tourray_fold.json"
#: Files of weights the surgery does not rewrite: copying them would ship the unfolded model beside the folded one.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
#: Pre-norm families whose blocks are exactly: RMSNorm -> attention -> add, RMSNorm -> gated MLP -> add.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: Why the other families are refused, where it is known.
REFUSED = {
    "gemma": "Gemma's RMSNorm scales by (1 + weight) and its embedding by sqrt(d): not supported yet",
    "gemma2": "Gemma2 normalises the attention and MLP outputs before the residual add (sandwich norms): a norm "
              "weight there cannot be absorbed into a linear, so a residual rotation changes the function",
    "gemma3": "Gemma3 normalises the attention and MLP outputs before the residual add (sandwich norms): a norm "
              "weight there cannot be absorbed into a linear, so a residual rotation changes the function",
    "olmo2": "OLMo2 normalises the block outputs (post-norm) before the residual add: a rotation does not fold",
    "gpt_neox": "GPT-NeoX uses LayerNorm (mean subtraction, bias) and parallel residuals: not supported",
    "phi": "Phi uses LayerNorm and a parallel attention/MLP block: not supported",
}
#: Elements per float64 block of a folded matrix (64 MB): the fold's memory is the shard plus a few blocks.
BLOCK = 1 << 23
#: Orthogonality tolerance of a residual rotation: max |Q^T Q - I|.
ORTH_TOL = 1e-6
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# -- the architecture ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What the surgery needs to know of a checkpoint's config."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool
    eps: float
    head_norms: bool      # q_norm / k_norm on each head (Qwen3)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, cfg: dict, where: str) -> "Layout":
        mt = cfg.get("model_type")
        if mt not in FAMILIES:
            why = REFUSED.get(mt, "tourray knows the weight layout of " + ", ".join(FAMILIES) + " only")
            raise UserError(f"{where}: model_type {mt!r}: {why}")
        heads = cfg["num_attention_heads"]
        return cls(model_type=mt, hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, ffn=cfg["intermediate_size"],
                   tied=bool(cfg.get("tie_word_embeddings", False)), eps=float(cfg.get("rms_norm_eps", 1e-6)),
                   head_norms=mt == "qwen3")


def read_layout(model: str | Path, flag: str = "--model") -> Layout:
    """The Layout of checkpoint folder `model`, or the UserError (naming `flag`) saying why it has none."""
    return Layout.of(read_config(model, flag)[1], f"{flag} {model}")


def read_config(model: str | Path, flag: str = "--model") -> tuple[Path, dict]:
    """The checkpoint folder and its config.json, or a UserError saying why it cannot be folded."""
    src = Path(model).expanduser()
    if not (src / "config.json").is_file():
        raise UserError(f"{flag} {model}: not a checkpoint folder (no config.json); fold works on local "
                        "safetensors checkpoints (import a GGUF with `tourray model import-gguf`)")
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{flag} {model}: cannot read config.json: {e}") from None
    if "text_config" in cfg:
        raise UserError(f"{flag} {model}: a multimodal config (text_config): fold works on decoder-only LMs")
    return src, cfg


def weight_files(src: Path) -> list[Path]:
    """The checkpoint's safetensors shards, in index order."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / f for f in files]
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    raise UserError(f"--model {src}: no model.safetensors (or index): fold streams safetensors shards; re-save "
                    "other formats with save_pretrained(safe_serialization=True)")


# -- what to do -------------------------------------------------------------------------------------
@dataclass
class Surgery:
    """One pass over a checkpoint. `residual`: Q [d, K] (orthogonal when K == d, else orthonormal
    columns: slicing); `neurons[i]` / `heads[i]` / `groups[i]`: block i's FFN neurons / query heads /
    key-value groups, in their new order (a permutation, or a subset when pruning). Blocks not listed
    keep theirs. Every block must end with the same counts (a standard config)."""

    residual: np.ndarray | None = None
    neurons: dict[int, np.ndarray] = field(default_factory=dict)
    heads: dict[int, np.ndarray] = field(default_factory=dict)
    groups: dict[int, np.ndarray] = field(default_factory=dict)

    def check(self, lay: Layout) -> dict:
        """Validate against the layout; the config fields that change."""
        upd: dict = {}
        q = self.residual
        if q is not None:
            if q.ndim != 2 or q.shape[0] != lay.hidden or not 1 <= q.shape[1] <= lay.hidden:
                raise UserError(f"residual_rotation: must be {lay.hidden} x K (K <= {lay.hidden}, the hidden size), "
                                f"got {' x '.join(map(str, q.shape))}")
            if not np.isfinite(q).all():
                raise UserError("residual_rotation: holds inf or nan")
            err = float(np.abs(q.T @ q - np.eye(q.shape[1])).max())
            if err > ORTH_TOL:
                raise UserError(f"residual_rotation: not orthogonal: max |Q^T Q - I| = {err:.2e} > {ORTH_TOL:g}")
            upd["hidden_size"] = q.shape[1]
            if q.shape[1] < lay.hidden:
                upd["rms_norm_eps"] = lay.eps * lay.hidden / q.shape[1]
        for what, table, total, key in (("neurons", self.neurons, lay.ffn, "intermediate_size"),
                                        ("query heads", self.heads, lay.heads, None),
                                        ("key/value groups", self.groups, lay.kv_heads, None)):
            sizes = set()
            for i, idx in table.items():
                if not 0 <= i < lay.layers:
                    raise UserError(f"layers.{i}: the model has {lay.layers} blocks, 0..{lay.layers - 1}")
                idx = np.asarray(idx)
                if idx.ndim != 1 or len(idx) == 0 or len(set(idx.tolist())) != len(idx) or idx.min() < 0 or idx.max() >= total:
                    raise UserError(f"layers.{i}: {what}: need distinct indices in 0..{total - 1}, got {len(idx)} "
                                    f"entries{' with repeats' if len(set(idx.tolist())) != len(idx) else ''}")
                sizes.add(len(idx))
            if sizes and (len(sizes) > 1 or (sizes != {total} and len(table) != lay.layers)):
                raise UserError(f"{what}: every block must keep the same number (a standard config); got "
                                f"{sorted(sizes)} over {len(table)} of {lay.layers} blocks")
            if key and sizes:
                upd[key] = sizes.pop()
        kept_groups = lay.kv_heads
        if self.groups:
            kept_groups = len(next(iter(self.groups.values())))
            upd["num_key_value_heads"] = kept_groups
            upd["num_attention_heads"] = kept_groups * lay.group
        for i, h in self.heads.items():
            g = self.groups.get(i)
            h = np.asarray(h)
            n_groups = lay.kv_heads if g is None else len(g)
            if len(h) % n_groups:
                raise UserError(f"layers.{i}: {len(h)} query heads cannot be split evenly over {n_groups} key/value heads")
            per = len(h) // n_groups
            owner = (h // lay.group).reshape(n_groups, per)  # old group of each new head, by new group
            bad = [j for j in range(n_groups) if not (owner[j] == (owner[j, 0] if g is None else g[j])).all()]
            if bad:
                j = bad[0]
                raise UserError(f"layers.{i}: head_permutation: new heads {per * j}..{per * j + per - 1} come from "
                                f"key/value groups {sorted(set(owner[j].tolist()))}: a query head must stay with its "
                                "key/value head (GQA), so each group of new heads must come from one old group")
            if g is None and (owner[:, 0] != np.arange(n_groups)).any():
                if sorted(owner[:, 0].tolist()) != list(range(n_groups)):
                    raise UserError(f"layers.{i}: head_permutation: the new groups come from old groups "
                                    f"{owner[:, 0].tolist()}: each key/value group must be used exactly once")
                self.groups[i] = owner[:, 0].copy()  # whole groups move: their key/value heads with them
            upd["num_attention_heads"] = len(h)
        heads = upd.get("num_attention_heads", lay.heads)  # the heads the checkpoint ENDS with (pruning)
        if q is not None and q.shape[1] % heads:  # transformers' config validation, even with an explicit head_dim
            ok = [k for k in range(heads, lay.hidden, heads)][-3:]
            raise UserError(f"residual width {q.shape[1]}: transformers refuses a hidden size that is not a multiple "
                            f"of the {heads} attention heads{' kept' if heads != lay.heads else ''}; "
                            f"e.g. {', '.join(map(str, ok))}")
        if "num_attention_heads" in upd or "hidden_size" in upd:
            upd["head_dim"] = lay.head_dim  # explicit: Llama's default hidden / heads would change
        if q is not None and lay.tied:
            upd["tie_word_embeddings"] = False
        return upd

    def describe(self) -> dict:
        return dict(residual=None if self.residual is None else list(self.residual.shape),
                    neurons={i: len(v) for i, v in self.neurons.items()},
                    heads={i: len(v) for i, v in self.heads.items()},
                    groups={i: len(v) for i, v in self.groups.items()})


class _Fold:
    """The per-tensor algebra of one Surgery on one layout (float64 blocks, cast back to each tensor's dtype)."""

    def __init__(self, s: Surgery, lay: Layout, norms: dict):
        import torch

        self.s, self.lay, self.norms = s, lay, norms
        self.q = None if s.residual is None else torch.from_numpy(np.asarray(s.residual, np.float64))
        k = lay.hidden if self.q is None else self.q.shape[1]
        self.scale = (lay.hidden / k) ** 0.5  # slicing: the RMSNorm correction, folded into its readers

    def _rows(self, i: int, name: str) -> "np.ndarray | None":
        """Output-row index of a projection in block i (heads / groups / neurons), or None."""
        hd = self.lay.head_dim
        heads, groups = self.s.heads.get(i), self.s.groups.get(i)
        if name == "q_proj":
            if heads is None and groups is None:
                return None
            if heads is None:  # whole groups move: their query heads with them
                heads = (np.asarray(groups)[:, None] * self.lay.group + np.arange(self.lay.group)).ravel()
            return (np.asarray(heads)[:, None] * hd + np.arange(hd)).ravel()
        if name in ("k_proj", "v_proj"):
            return None if groups is None else (np.asarray(groups)[:, None] * hd + np.arange(hd)).ravel()
        if name in ("gate_proj", "up_proj", "down_proj"):
            n = self.s.neurons.get(i)
            return None if n is None else np.asarray(n)
        if name == "o_proj":
            return self._rows(i, "q_proj")
        raise AssertionError(name)

    def __call__(self, name: str, t):
        """{name: tensor} replacing tensor `name` (the embedding may also give the untied LM head)."""
        import torch

        q, lay = self.q, self.lay
        out: dict = {}
        if name == "model.embed_tokens.weight":
            if q is not None and lay.tied:
                out["lm_head.weight"] = self._read(t, self.norms.get("model.norm.weight"))
            out[name] = self._read(t, None)
        elif name == "lm_head.weight":
            out[name] = self._read(t, self.norms.get("model.norm.weight"))
        elif name == "model.norm.weight":
            out[name] = t if q is None else torch.ones(q.shape[1], dtype=t.dtype)
        else:
            m = _LAYER.match(name)
            if not m:
                raise UserError(f"{name}: a tensor tourray's fold does not know for model_type {lay.model_type}; "
                                "refusing rather than guessing")
            out[name] = self._block(int(m.group(1)), m.group(2), t)
        return {k: v.contiguous() for k, v in out.items()}

    def _read(self, t, g, extra: float = 1.0):
        """A linear reading the normalised residual (or the embedding, g None): absorb the norm weight g,
        then rotate (or slice): (t * g * scale * extra) @ Q. In float64 row block by row block, written
        into a tensor of t's dtype: memory stays a few blocks above the output, whatever the vocabulary."""
        import torch

        if self.q is None:
            return t
        gs = None if g is None else g.to(torch.float64) * (self.scale * extra)
        out = torch.empty((t.shape[0], self.q.shape[1]), dtype=t.dtype)
        step = max(1, BLOCK // t.shape[1])
        for a in range(0, t.shape[0], step):
            w = t[a:a + step].to(torch.float64)  # may BE t's rows (float64 input): never written in place
            out[a:a + step] = ((w if gs is None else w * gs) @ self.q).to(t.dtype)
        return out

    def _write(self, t):
        """A linear writing the residual: Q^T t, column block by column block (see `_read`)."""
        import torch

        if self.q is None:
            return t
        out = torch.empty((self.q.shape[1], t.shape[1]), dtype=t.dtype)
        step = max(1, BLOCK // t.shape[0])
        for a in range(0, t.shape[1], step):
            out[:, a:a + step] = (self.q.T @ t[:, a:a + step].to(torch.float64)).to(t.dtype)
        return out

    def _block(self, i: int, rest: str, w):
        import torch

        q = self.q
        parts = rest.split(".")
        if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            return w if q is None else w.new_ones(q.shape[1])
        if parts[0] == "self_attn" and parts[1] in ("q_norm", "k_norm"):
            return w  # per head_dim, after the projection: untouched (heads move whole)
        if len(parts) != 3 or parts[0] not in ("self_attn", "mlp") or parts[2] not in ("weight", "bias"):
            raise UserError(f"model.layers.{i}.{rest}: a tensor tourray's fold does not know for model_type "
                            f"{self.lay.model_type}; refusing rather than guessing")
        proj, kind = parts[1], parts[2]
        rows = self._rows(i, proj)
        if proj in ("o_proj", "down_proj"):  # writes the residual: columns are heads / neurons
            if kind == "weight":
                return self._write(w if rows is None else w[:, torch_index(rows)])
            return w if q is None else (w.to(torch.float64) @ q).to(w.dtype)
        if rows is not None:  # reads the residual: rows are heads / groups / neurons
            w = w[torch_index(rows)]
        if kind == "weight":
            norm = "input_layernorm" if parts[0] == "self_attn" else "post_attention_layernorm"
            extra = self.scale if (proj in ("q_proj", "k_proj") and self.lay.head_norms) else 1.0
            return self._read(w, self.norms.get(f"model.layers.{i}.{norm}.weight"), extra)
        if q is not None and proj in ("q_proj", "k_proj") and self.lay.head_norms:
            return (w.to(torch.float64) * self.scale).to(w.dtype)  # q_norm / k_norm see inputs scaled like the weight's
        return w


def torch_index(idx: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(idx, dtype=np.int64))


def _norm_names(lay: Layout) -> list[str]:
    return ["model.norm.weight"] + [f"model.layers.{i}.{n}.weight" for i in range(lay.layers)
                                    for n in ("input_layernorm", "post_attention_layernorm")]


def apply_surgery(model: str | Path, out_dir: str | Path, surgery: Surgery, provenance: dict,
                  progress: bool = False) -> dict:
    """Write `out_dir`: the checkpoint `model` with `surgery` applied, streamed shard by shard (each
    output shard replaces one input shard), its tokenizer and generation files copied, config updated,
    and `tourray_fold.json`. The folder appears whole or not at all."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tourray.surgery.blocks import check_out
    from tourray.runtime import building_folder

    t0 = time.perf_counter()
    out = check_out(out_dir)
    src, cfg = read_config(model)
    lay = Layout.of(cfg, f"--model {model}")
    updates = surgery.check(lay)
    _loadable({**cfg, **updates}, cfg, updates, f"--model {model}")
    files = weight_files(src)
    names = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            names.update({n: f for n in fh.keys()})
    norms = {}
    if surgery.residual is not None:
        for n in _norm_names(lay):
            if n not in names:
                raise UserError(f"--model {model}: no tensor {n}: not the {lay.model_type} layout tourray knows")
            with safe_open(str(names[n]), framework="pt") as fh:
                norms[n] = fh.get_tensor(n).to(dtype=torch.float64)
    if lay.tied and "lm_head.weight" in names:
        lay = Layout(**{**lay.__dict__, "tied": False})
    fold = _Fold(surgery, lay, norms)
    weight_map, total = {}, 0
    from tqdm import tqdm

    with building_folder(out, "fold") as tmp:
        tmp.mkdir()
        for f in tqdm(files, desc="fold", unit="shard", disable=not progress):
            shard = {}
            with safe_open(str(f), framework="pt") as fh:
                for n in fh.keys():
                    shard.update(fold(n, fh.get_tensor(n)))
            save_file(shard, str(tmp / f.name), metadata={"format": "pt"})
            for n, t in shard.items():
                weight_map[n] = f.name
                total += t.numel() * t.element_size()
            del shard
        if len(files) > 1 or files[0].name != "model.safetensors":
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        for p in src.iterdir():  # tokenizer, chat template, generation config, earlier provenance
            if p.is_file() and p.name != "config.json" and not p.name.startswith("model") and p.suffix not in WEIGHT_SUFFIXES:
                shutil.copy2(p, tmp / p.name)  # never stray weights (consolidated.safetensors, *.bin, *.gguf): stale
        new_cfg = {**cfg, **updates}
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
        from tourray.model.identity import model_revision

        record = dict(provenance, source_model=str(model), source_revision=model_revision(str(model), None),
                      surgery=surgery.describe(), config_changes=updates,
                      created_at=dt.datetime.now(dt.timezone.utc).isoformat())
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    params = parameters(out)
    log.info("wrote %s (%s) in %.1f s: %.2fM parameters", out, ", ".join(f"{k}={v}" for k, v in updates.items())
             or "same config", time.perf_counter() - t0, params / 1e6)
    return dict(out=str(out), config_changes=updates, parameters=params, seconds=round(time.perf_counter() - t0, 2))


def _loadable(new_cfg: dict, cfg: dict, updates: dict, where: str) -> None:
    """Refuse, before anything is written, a new config the installed transformers would not load (e.g.
    LlamaConfig: hidden_size a multiple of num_attention_heads, which head pruning can break even when
    the width is unchanged). A source config transformers already refuses is not the fold's doing: skipped."""
    if not updates:
        return
    from transformers import AutoConfig

    def error(c: dict) -> str | None:
        try:
            AutoConfig.for_model(**c)
        except Exception as e:  # transformers' strict-dataclass validation errors are not ValueErrors
            return " ".join(str(e).split())
        return None

    why = error(new_cfg)
    if why is None:
        return
    if error(cfg) is not None:
        log.warning("%s: transformers refuses the source config too; not checking the new one: %s", where, why)
        return
    changes = ", ".join(f"{k}={v}" for k, v in updates.items())
    raise UserError(f"{where}: the surgery's config ({changes}) is one transformers refuses to load: {why}")


def parameters(folder: str | Path) -> int:
    """Parameter count of a safetensors checkpoint, from its headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for f in weight_files(Path(folder)):
        with safe_open(str(f), framework="pt") as fh:
            total += sum(int(np.prod(fh.get_slice(n).get_shape())) for n in fh.keys())
    return total


# -- tourray fold -----------------------------------------------------------------------------------
SPEC_HELP = """\
The spec is JSON (paths relative to the spec file):
  {"residual_rotation": "Q.npy",                      orthogonal d x d, float64 .npy
   "layers": {"3": {"neuron_permutation": [...],      d_ff indices: new neuron j = old neuron p[j]
                    "head_permutation": [...]}}}     query-head indices: new head j = old head p[j]
Row-vector convention: the folded model's residual stream is h @ Q for the original's h.
head_permutation may reorder heads within their key/value group, or whole groups (each group of
consecutive new heads must come from one old group; its key/value head moves with it).
Not folded, and refused: a rotation per layer ("layers": {"i": {"rotation": ...}}): blocks with
different bases need Q_i^T Q_(i+1) on the residual path, which no weight holds, so the function
would change (the seeds' per-layer fold)."""


class LayerSpec(BaseConfig):
    """One block's entry in a fold spec."""

    neuron_permutation: list[int] | None = Field(None, description="New FFN neuron j = old neuron p[j] (all d_ff of them).")
    head_permutation: list[int] | None = Field(None, description="New query head j = old head p[j] (all heads; GQA groups kept).")
    rotation: object = Field(None, description="Refused: see the spec help.")

    @field_validator("rotation")
    @classmethod
    def _refuse(cls, v):
        if v is not None:
            raise ValueError("a rotation per layer is not a fold: blocks in different bases need Q_i^T Q_(i+1) on the "
                             "residual path, so the function would change; give one residual_rotation for the whole model")
        return v


class FoldSpec(BaseConfig):
    """A fold spec (see SPEC_HELP)."""

    residual_rotation: str | None = Field(None, description="Path of an orthogonal d x d .npy (relative to the spec).")
    layers: dict[int, LayerSpec] = Field(default_factory=dict, description="Per-block permutations, by block index.")


class FoldConfig(BaseConfig):
    """`tourray fold`: every field is a flag."""

    model: str = Field(description="Checkpoint folder (safetensors) to fold.")
    spec: str = Field(description="Transforms spec JSON (see below).")
    out: str = Field(description="Checkpoint folder to write (new or empty).")


def read_spec(path: str | Path, lay: Layout) -> Surgery:
    """The Surgery a spec file describes, every permutation checked to be one."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise UserError(f"--spec {path}: cannot read it: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--spec {path}: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"--spec {path}: must be a JSON object (residual_rotation, layers)")
    spec = FoldSpec.parse(data, source=f"--spec {path}")
    s = Surgery()
    if spec.residual_rotation:
        qp = (p.parent / spec.residual_rotation).expanduser()
        try:
            s.residual = np.load(qp, allow_pickle=False).astype(np.float64)
        except (OSError, ValueError) as e:
            raise UserError(f"--spec {path}: residual_rotation {qp}: cannot load it as .npy: {e}") from None
        if s.residual.shape != (lay.hidden, lay.hidden):
            raise UserError(f"--spec {path}: residual_rotation {qp} is {' x '.join(map(str, s.residual.shape))}; "
                            f"a fold needs {lay.hidden} x {lay.hidden} (slicing is `tourray prune width --hidden`)")
    for i, ls in spec.layers.items():
        for what, perm, n, table in (("neuron_permutation", ls.neuron_permutation, lay.ffn, s.neurons),
                                     ("head_permutation", ls.head_permutation, lay.heads, s.heads)):
            if perm is None:
                continue
            if sorted(perm) != list(range(n)):
                raise UserError(f"--spec {path}: layers.{i}.{what}: not a permutation of 0..{n - 1} "
                                f"({len(perm)} entries)")
            table[i] = np.asarray(perm, dtype=np.int64)
    if s.residual is None and not s.neurons and not s.heads:
        raise UserError(f"--spec {path}: nothing to fold (no residual_rotation, no permutations)")
    return s


def run_fold(cfg: FoldConfig, progress: bool = True) -> dict:
    surgery = read_spec(cfg.spec, read_layout(cfg.model))
    return apply_surgery(cfg.model, cfg.out, surgery, dict(kind="fold", spec=str(Path(cfg.spec).resolve()),
                                                      spec_text=json.loads(Path(cfg.spec).read_text())),
                         progress=progress)
