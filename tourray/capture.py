"""Capture: teacher-forced forward passes with hooks on every decoder block, written to the lake.

    samples ──► ray.data (one block per group) ──map_batches(CaptureStage, actor pool)──► driver
                                                  │ model + hooks, built once per actor       │
                                                  └─► Lance fragments (written by the actor)  └─► commit

Bulk vectors never enter Ray's object store: each actor writes Lance fragments itself and returns
only their metadata. The driver commits a group's tables in a fixed order (blocks, tokens,
activations, then samples); a `samples` row therefore marks a complete sample, and a re-run first
deletes rows of samples that never got theirs (a killed run), then captures only what is missing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from tourray import corpus, lake as lk
from tourray.config import BaseConfig, Engine, ModelDtype, Site, StoreDtype, parse_layers
from tourray.errors import UserError
from tourray.stage import Stage

log = logging.getLogger("tourray")

#: Order in which a group's tables are committed; `samples` last marks the group complete.
COMMIT_ORDER = ("blocks", "tokens", "activations", "samples")


class CaptureConfig(BaseConfig):
    """Everything a capture needs. Every field is also a `tourray capture` flag."""

    model: str = Field(description="Hub id (e.g. Qwen/Qwen3-0.6B) or local checkpoint folder.")
    samples: str = Field(description="Folder of UTF-8 .txt files (any depth), or one .txt file.")
    run: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="Run name; re-running a name resumes it.")
    lake: str = Field("lake", description="Lake root: a local folder or a Lance URI (s3://...).")
    engine: Engine = Field(Engine.hf, description="Runtime that runs the model: hf (transformers).")
    tokenizer: str | None = Field(None, description="Tokenizer id or folder; defaults to the model's.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    store_dtype: StoreDtype = Field(StoreDtype.float16, description="dtype of stored vectors: float16 halves the bytes of float32; bfloat16 keeps float32's range.")
    model_dtype: ModelDtype = Field(ModelDtype.auto, description="dtype of the forward pass; auto = float32 on CPU, bfloat16 on GPU.")
    layers: str = Field("all", description="Layers to store: 'all' (embed + every block), 'blocks', 'embed,0,5,10-20', or 'none' (tokens only).")
    sites: list[Site] = Field([Site.resid_post], description="resid_post (block output) and/or resid_mid (after attention, before the MLP); comma-separated.")
    max_length: int = Field(2048, gt=1, description="Prompts longer than this many tokens are truncated (and flagged).")
    system_prompt: str | None = Field(None, description="File holding the system prompt; none by default.")
    chat_template: bool = Field(True, description="Use the tokenizer's chat template when it has one; else the plain '<system>\\n\\n<text>' format.")
    text_role: Literal["assistant", "user"] = Field("assistant", description="Chat role the text is teacher-forced as.")
    user_prompt: str = Field("Tell me about this stop.", description="User turn before an assistant-role text.")
    batch_size: int = Field(8, gt=0, description="Samples per forward pass (padded to the longest).")
    group_size: int = Field(32, gt=0, description="Samples per atomic commit: the unit a killed run loses.")
    actors: int = Field(1, gt=0, description="Most model actors (each holds one copy of the model).")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor; 0 runs on CPU.")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs Ray reserves per actor; fractional so 2 cores do not deadlock.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per actor; default: cores / actors.")
    address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS, else an embedded local Ray.")
    skip_invalid: bool = Field(False, description="Skip (and list) empty, whitespace-only or non-UTF-8 files instead of stopping.")

    @field_validator("sites", mode="before")
    @classmethod
    def _split_sites(cls, v):
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("sites")
    @classmethod
    def _sites_unique(cls, v):
        if not v:
            raise ValueError("at least one site")
        return sorted(set(v), key=list(Site).index)


# -- model identity (driver side, no weights loaded) ------------------------------------------
@dataclass
class ModelInfo:
    num_layers: int
    hidden_size: int
    model_revision: str
    tokenizer_sha256: str


def load_tokenizer(cfg: CaptureConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.model
    try:
        return AutoTokenizer.from_pretrained(name, revision=cfg.revision if not cfg.tokenizer else None)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer/--model: cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None


def inspect_model(cfg: CaptureConfig, tokenizer) -> ModelInfo:
    """Read depth, width and revision from the config and files, without loading weights."""
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise UserError(
            f"--model: {cfg.model!r} is not a checkpoint folder, and no hub model of that name could be "
            f"loaded ({str(e).splitlines()[0]})"
        ) from None
    tc = mc.get_text_config()
    return ModelInfo(tc.num_hidden_layers, tc.hidden_size, model_revision(cfg.model, cfg.revision), tokenizer_sha256(tokenizer))


def model_revision(model: str, revision: str | None) -> str:
    """Hub commit for hub models; sha256 of config + weight files for a local folder."""
    path = Path(model)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin") and not f.name.startswith("tokenizer"):
                h.update(f.name.encode())
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 24), b""):
                        h.update(chunk)
        return "sha256:" + h.hexdigest()
    from transformers.utils import cached_file

    cfg_path = Path(cached_file(model, "config.json", revision=revision))
    return cfg_path.parent.name  # .../snapshots/<commit>/config.json


def tokenizer_sha256(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)).encode())
    h.update((getattr(tok, "chat_template", None) or "").encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


# -- engine: transformers with hooks ----------------------------------------------------------
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


class HFEngine:
    """A transformers model with hooks on every decoder block, run on padded batches."""

    def __init__(self, cfg: CaptureConfig, layers: list[int], num_layers: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = "cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        dtype = cfg.model_dtype.value
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        self.model_dtype = dtype
        self.store = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.store_dtype.value]
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, revision=cfg.revision, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        _, blocks = find_blocks(self.model, num_layers)
        self._buf: dict[tuple[int, str], object] = {}
        self.keys = []
        for layer in layers:
            for site in cfg.sites:
                if layer == -1 and site != Site.resid_post:
                    continue  # the embedding output has no mid-block site
                self.keys.append((layer, site.value))
                self._hook(blocks, layer, site)

    def _hook(self, blocks, layer: int, site: Site) -> None:
        key = (layer, site.value)

        def keep(t):
            self._buf[key] = t.detach().to(self.store)

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

    def capture(self, batch: list[np.ndarray]) -> list[Captured]:
        torch = self.torch
        n = [len(x) for x in batch]
        ids = torch.zeros((len(batch), max(n)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(batch):
            ids[i, : n[i]] = torch.from_numpy(x)
            mask[i, : n[i]] = 1
        self._buf.clear()
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False).logits
            out = []
            for i, length in enumerate(n):
                s, e = surprisal_entropy(logits[i, :length], ids[i, :length].to(self.device))
                vecs = {k: self._buf[k][i, :length].cpu().numpy() if self.store != torch.bfloat16
                        else self._buf[k][i, :length].cpu().view(torch.int16).numpy().view(np.uint16)
                        for k in self.keys}
                out.append(Captured(s, e, vecs))
            for k in self.keys:
                finite = torch.isfinite(self._buf[k]).all(-1)  # [B, T]
                for i, length in enumerate(n):
                    if out[i].not_finite is None and not bool(finite[i, :length].all()):
                        out[i].not_finite = k
        self._buf.clear()
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


# -- the stage -------------------------------------------------------------------------------
class CaptureStage(Stage):
    """Ray Data stage: one call = one group of samples in, one row of fragment metadata out."""

    inputs = ("sample_id", "source", "category", "text", "sha256")
    _ROWS_PER_BATCH_BYTES = 8 << 20  # ~8 MB record batches: Lance's fast path (see FIELD_GUIDE)

    def __init__(self, cfg: CaptureConfig, lake_root: str, layers: list[int], hidden_size: int, num_layers: int):
        super().__init__()
        if cfg.gpus_per_actor == 0:
            import torch

            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.actors))
        from tourray.prompt import PromptFormat

        self.cfg, self.layers = cfg, layers
        self.lake = lk.Lake(lake_root)
        self.tok = load_tokenizer(cfg)
        self.fmt = PromptFormat(self.tok, corpus.read_system_prompt(cfg.system_prompt), cfg.text_role,
                                cfg.user_prompt, cfg.chat_template)
        self.engine = HFEngine(cfg, layers, num_layers)
        self.schemas = {t: lk.schema(t, store_dtype=cfg.store_dtype.value, hidden_size=hidden_size) for t in COMMIT_ORDER}
        self._pieces: dict[int, str] = {}

    def _token_text(self, ids: np.ndarray) -> list[str]:
        missing = [int(i) for i in set(ids.tolist()) if i not in self._pieces]
        for i, s in zip(missing, self.tok.batch_decode([[i] for i in missing])):
            self._pieces[i] = s
        return [self._pieces[int(i)] for i in ids]

    def process(self, batch: pa.Table) -> pa.Table:
        cfg, run = self.cfg, self.cfg.run
        rows = batch.to_pylist()
        enc = [self.fmt.encode(r["text"], cfg.max_length) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(enc[i].input_ids))
        tokens, blocks = [], []

        def activation_batches() -> Iterator[pa.RecordBatch]:
            pending, size = [], 0
            for a in range(0, len(order), cfg.batch_size):
                idx = order[a : a + cfg.batch_size]
                for i, cap in zip(idx, self.engine.capture([enc[i].input_ids for i in idx])):
                    sid, e = rows[i]["sample_id"], enc[i]
                    if cap.not_finite:
                        layer, site = cap.not_finite
                        raise UserError(
                            f"sample {rows[i]['source']} (id {sid}), layer {layer}, site {site}: values are not "
                            f"finite in {cfg.store_dtype.value}; use --store-dtype bfloat16 or float32")
                    tokens.append(self._tokens_table(sid, e, cap))
                    for (layer, site), h in cap.vectors.items():
                        n = len(h)
                        blocks.append((sid, layer, site, 0, n, hashlib.sha256(np.ascontiguousarray(h)).hexdigest()))
                        pending.append((sid, layer, site, h))
                        size += h.nbytes
                        if size >= self._ROWS_PER_BATCH_BYTES:
                            yield self._activations_batch(pending)
                            pending, size = [], 0
            if pending:
                yield self._activations_batch(pending)

        frags = {}
        acts = activation_batches()
        if self.layers:
            frags["activations"] = self.lake.write_fragments("activations", acts, self.schemas["activations"])
        else:
            for _ in acts:
                pass
        frags["tokens"] = self.lake.write_fragments("tokens", pa.concat_tables(tokens), self.schemas["tokens"])
        frags["blocks"] = self.lake.write_fragments("blocks", pa.table({
            "run": [run] * len(blocks),
            "sample_id": [b[0] for b in blocks],
            "layer": pa.array([b[1] for b in blocks], pa.int16()),
            "site": [b[2] for b in blocks],
            "pos_start": pa.array([b[3] for b in blocks], pa.int32()),
            "pos_end": pa.array([b[4] for b in blocks], pa.int32()),
            "sha256": [b[5] for b in blocks],
        }, schema=self.schemas["blocks"]), self.schemas["blocks"]) if blocks else []
        samples = pa.table({
            "run": [run] * len(rows),
            **{c: [r[c] for r in rows] for c in ("sample_id", "source", "category", "text", "sha256")},
            "n_tokens": pa.array([len(e.input_ids) for e in enc], pa.int32()),
            "truncated": [e.truncated for e in enc],
        }, schema=self.schemas["samples"])
        frags["samples"] = self.lake.write_fragments("samples", samples, self.schemas["samples"])
        n_tokens = sum(len(e.input_ids) for e in enc)
        self.stats["samples"] += len(rows)
        self.stats["tokens"] += n_tokens
        return pa.table({
            "fragments": [json.dumps(frags)],
            "n_samples": [len(rows)],
            "n_tokens": [n_tokens],
            "truncated": [[r["source"] for r, e in zip(rows, enc) if e.truncated]],
            "bytes": [sum(b[4] - b[3] for b in blocks) * self._row_bytes()],
        })

    def _row_bytes(self) -> int:
        return self.schemas["activations"].field("h").type.list_size * (4 if self.cfg.store_dtype == StoreDtype.float32 else 2)

    def _tokens_table(self, sid: str, e, cap: Captured) -> pa.Table:
        from tourray.prompt import SEGMENTS

        n = len(e.input_ids)
        in_text = e.char_start >= 0
        return pa.table({
            "run": [self.cfg.run] * n,
            "sample_id": [sid] * n,
            "pos": pa.array(np.arange(n, dtype=np.int32)),
            "token_id": pa.array(e.input_ids.astype(np.int32)),
            "token": self._token_text(e.input_ids),
            "char_start": pa.array(e.char_start, mask=~in_text),
            "char_end": pa.array(e.char_end, mask=~in_text),
            "segment": [SEGMENTS[s] for s in e.segment],
            "surprisal": pa.array(cap.surprisal, mask=np.isnan(cap.surprisal)),
            "entropy": pa.array(cap.entropy, mask=np.isnan(cap.entropy)),
        }, schema=self.schemas["tokens"])

    def _activations_batch(self, pending) -> pa.RecordBatch:
        n = [len(h) for *_, h in pending]
        total = sum(n)
        h = np.concatenate([h for *_, h in pending])
        return pa.RecordBatch.from_arrays([
            pa.array([self.cfg.run] * total),
            pa.array(np.repeat([p[0] for p in pending], n).tolist()),
            pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in n])),
            pa.array(np.repeat(np.array([p[1] for p in pending], np.int16), n)),
            pa.array(np.repeat([p[2] for p in pending], n).tolist()),
            lk.vectors_to_arrow(h, self.cfg.store_dtype.value),
        ], schema=self.schemas["activations"])

# -- the driver ------------------------------------------------------------------------------
@dataclass
class Plan:
    """What the driver resolved before any work: refusals happen while building it."""

    cfg: CaptureConfig
    lake: lk.Lake
    samples: list[corpus.Sample]
    skipped: list[str]
    layers: list[int]
    info: ModelInfo
    run_row: dict


def plan_capture(cfg: CaptureConfig) -> Plan:
    """Validate everything (samples, model, layers, run identity, table schemas) without writing."""
    from tourray.runtime import in_ray_job

    if in_ray_job() and "://" not in cfg.lake and not Path(cfg.lake).is_absolute():
        raise UserError(f"--lake {cfg.lake!r} is relative, but this is a Ray job running in a temporary copy of "
                        "the working dir: pass an absolute path or a URI (s3://...) so the lake outlives the job")
    samples, skipped = corpus.load_samples(cfg.samples, cfg.skip_invalid)
    system_prompt = corpus.read_system_prompt(cfg.system_prompt)
    tok = load_tokenizer(cfg)
    info = inspect_model(cfg, tok)
    layers = parse_layers(cfg.layers, info.num_layers)
    lake = lk.Lake(cfg.lake)
    row = run_row(cfg, info, layers, samples, system_prompt)
    existing = lake.read("runs", filter=f"run = {lk.sql_quote(cfg.run)}").to_pylist()
    if existing:
        changes = run_changes(existing[0], row)
        if changes:
            raise UserError(f"run {cfg.run!r} already exists in {lake.root} with other inputs; use a new --run.\n  "
                            + "\n  ".join(changes))
    for table in ("activations",) if layers else ():
        if lake.exists(table):
            lake.ensure(table, lk.schema(table, store_dtype=cfg.store_dtype.value, hidden_size=info.hidden_size))
    return Plan(cfg, lake, samples, skipped, layers, info, row)


def run_row(cfg: CaptureConfig, info: ModelInfo, layers: list[int], samples, system_prompt: str) -> dict:
    import tourray

    prompt = dict(chat_template=cfg.chat_template, text_role=cfg.text_role, user_prompt=cfg.user_prompt,
                  max_length=cfg.max_length)
    manifest = dict(
        config=cfg.model_dump(mode="json"),
        prompt=prompt,
        samples_root=str(Path(cfg.samples).resolve()),
        samples={s.source: s.sha256 for s in samples},
        versions=library_versions(),
    )
    return dict(
        run=cfg.run, model=cfg.model, model_revision=info.model_revision,
        tokenizer=cfg.tokenizer or cfg.model, tokenizer_sha256=info.tokenizer_sha256,
        engine=cfg.engine.value, model_dtype=cfg.model_dtype.value if cfg.model_dtype != ModelDtype.auto else
        ("bfloat16" if cfg.gpus_per_actor > 0 else "float32"),
        store_dtype=cfg.store_dtype.value, num_layers=info.num_layers, hidden_size=info.hidden_size,
        layers=layers, sites=[s.value for s in cfg.sites],
        system_prompt_sha256=corpus.sha256_bytes(system_prompt.encode()),
        tourray_version=tourray.__version__, tourray_commit=git_commit(),
        created_at=dt.datetime.now(dt.timezone.utc), manifest=json.dumps(manifest),
    )


#: Fields of a run that must not change when a capture resumes it.
IDENTITY = ("model", "model_revision", "tokenizer", "tokenizer_sha256", "engine", "model_dtype", "store_dtype",
            "num_layers", "hidden_size", "layers", "sites", "system_prompt_sha256")


def run_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between a stored run and the one asked for."""
    out = [f"{k}: {old[k]!r} in the lake, {new[k]!r} now" for k in IDENTITY if old[k] != new[k]]
    om, nm = json.loads(old["manifest"]), json.loads(new["manifest"])
    if om["prompt"] != nm["prompt"]:
        out.append(f"prompt format: {om['prompt']} in the lake, {nm['prompt']} now")
    a, b = om["samples"], nm["samples"]
    for label, names in (("added", sorted(b.keys() - a.keys())), ("removed", sorted(a.keys() - b.keys())),
                         ("changed", sorted(k for k in a.keys() & b.keys() if a[k] != b[k]))):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            out.append(f"texts {label}: {len(names)} ({', '.join(names[:5])}{more})")
    return out


def git_commit() -> str | None:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "ray", "pylance", "pyarrow", "duckdb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def prepare_lake(plan: Plan) -> set[str]:
    """Create missing tables and the run row, delete rows of half-committed samples (a killed
    run), and return the ids of samples already complete."""
    cfg, lake, q = plan.cfg, plan.lake, lk.sql_quote(plan.cfg.run)
    params = dict(store_dtype=cfg.store_dtype.value, hidden_size=plan.info.hidden_size)
    for table in ("activations",) * bool(plan.layers) + ("runs", "samples", "tokens", "blocks"):
        lake.ensure(table, lk.schema(table, **params))
    if not lake.read("runs", ["run"], filter=f"run = {q}").num_rows:
        lake.append("runs", pa.Table.from_pylist([plan.run_row], schema=lk.schema("runs")), lk.schema("runs"))
    done = set(lake.read("samples", ["sample_id"], filter=f"run = {q}").column(0).to_pylist())
    started = set()
    for table in ("blocks", "tokens"):
        started |= set(lake.read(table, ["sample_id"], filter=f"run = {q}").column(0).unique().to_pylist())
    orphans = sorted(started - done)
    if orphans:
        log.warning("run %s: removing rows of %d sample(s) whose capture was interrupted", cfg.run, len(orphans))
        ids = ", ".join(lk.sql_quote(s) for s in orphans)
        for table in ("activations", "tokens", "blocks"):
            lake.delete(table, f"run = {q} AND sample_id IN ({ids})")
    return done


def build_capture(plan: Plan, pending: list[corpus.Sample]):
    """The lazy Ray Data pipeline: one block per group of samples -> CaptureStage actor pool."""
    import ray

    cfg = plan.cfg
    groups = [corpus.to_table(pending[i : i + cfg.group_size]) for i in range(0, len(pending), cfg.group_size)]
    return ray.data.from_arrow(groups).map_batches(
        CaptureStage,
        fn_constructor_kwargs=dict(cfg=cfg, lake_root=plan.lake.root, layers=plan.layers,
                                   hidden_size=plan.info.hidden_size, num_layers=plan.info.num_layers),
        batch_size=cfg.group_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )


def run_capture(cfg: CaptureConfig, progress: bool = True) -> dict:
    """Plan, then capture what is missing, committing each group as its result arrives."""
    from tqdm import tqdm

    from tourray.runtime import init_ray

    t0 = time.perf_counter()
    plan = plan_capture(cfg)
    done = prepare_lake(plan)
    pending = [s for s in plan.samples if s.sample_id not in done]
    summary = dict(run=cfg.run, lake=plan.lake.root, samples=len(plan.samples), already_done=len(plan.samples) - len(pending),
                   captured=0, tokens=0, bytes=0, groups=0, truncated=[], skipped_invalid=plan.skipped)
    log.info("run %s: %d samples, %d already committed, %d to capture (layers %s, sites %s, %s)",
             cfg.run, len(plan.samples), summary["already_done"], len(pending),
             compact_layers(plan.layers), ",".join(s.value for s in cfg.sites), cfg.store_dtype.value)
    if pending:
        init_ray(cfg.address)
        bar = tqdm(total=len(pending), unit="sample", disable=not progress, dynamic_ncols=True)
        t1 = time.perf_counter()
        try:
            for row in build_capture(plan, pending).iter_rows():
                frags = json.loads(row["fragments"])
                for table in COMMIT_ORDER:
                    plan.lake.commit(table, frags.get(table, []))
                summary["groups"] += 1
                summary["captured"] += row["n_samples"]
                summary["tokens"] += row["n_tokens"]
                summary["bytes"] += row["bytes"]
                for src in row["truncated"]:
                    log.warning("truncated %s to --max-length %d tokens", src, cfg.max_length)
                summary["truncated"] += list(row["truncated"])
                dt_s = time.perf_counter() - t1
                bar.update(row["n_samples"])
                bar.set_postfix_str(f"{summary['captured'] / dt_s:.2f} samples/s, {summary['tokens'] / dt_s:,.0f} tokens/s")
        except Exception as e:  # noqa: BLE001 - surface a user error raised inside an actor as itself
            raise user_error_in(e) or e
        finally:
            bar.close()
        summary["capture_seconds"] = round(time.perf_counter() - t1, 2)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if summary["seconds"] > 0:
        summary["tokens_per_s"] = round(summary["tokens"] / summary.get("capture_seconds", summary["seconds"]) if summary["tokens"] else 0, 1)
    record_summary(plan.lake, cfg.run, summary)
    return summary


def record_summary(lake: lk.Lake, run: str, summary: dict) -> None:
    """Append this invocation's summary to the run's manifest (kept with the run in the lake)."""
    q = lk.sql_quote(run)
    row = lake.read("runs", ["manifest"], filter=f"run = {q}").to_pylist()[0]
    manifest = json.loads(row["manifest"])
    manifest.setdefault("captures", []).append(dict(summary, finished_at=dt.datetime.now(dt.timezone.utc).isoformat()))
    lake.dataset("runs").update({"manifest": lk.sql_quote(json.dumps(manifest))}, where=f"run = {q}")


def user_error_in(e: BaseException) -> UserError | None:
    """Find a UserError raised inside a Ray actor under Ray's wrappers (RayTaskError,
    UserCodeException); Ray may only keep it as text in the remote traceback."""
    import re

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e))
        if m := re.search(r"tourray\.errors\.UserError: (.*?)(?:\n\s*\n|$)", str(e), re.S):
            return UserError(m[1].strip())
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def compact_layers(layers: list[int]) -> str:
    """[-1, 0, 1, 2, 5] -> 'embed,0-2,5'."""
    out, blocks = ["embed"] if -1 in layers else [], [x for x in layers if x >= 0]
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        out.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return ",".join(out) or "none"
