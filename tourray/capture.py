"""Capture: teacher-forced forward passes with hooks on every decoder block, written to the lake.

    samples ──► ray.data (one block per group) ──map_batches(CaptureStage, actor pool)──► driver
                                                  │ model + hooks, built once per actor       │
                                                  └─► Lance fragments (written by the actor)  └─► commit

Bulk vectors never enter Ray's object store: each actor writes Lance fragments itself and returns
only their metadata. The driver commits a group's tables in a fixed order (`COMMIT_ORDER`,
samples last); a `samples` row therefore marks a complete sample, and a re-run first
deletes rows of samples that never got theirs (a killed run), then captures only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from tourray import corpus, lake as lk
from tourray.config import BaseConfig, comma_list, Engine, ModelDtype, Site, StoreDtype, compact_layers, parse_layers
from tourray.engine import INNER_SITES, Captured, HFEngine
from tourray.manifest import (ModelInfo, inspect_model, load_tokenizer, record_summary, require_folder, run_changes,
                              run_row, tokenizer_sha256)
from tourray.prompt import SEGMENTS, Encoded, PromptFormat
from tourray.errors import UserError
from tourray.runtime import overlapped
from tourray.stage import Stage
from tourray.stats.inline import InlineStats, finalize, incomplete_parts
from tourray.stats.tasks import moments_table
from tourray.token_class import classify

log = logging.getLogger("tourray")

#: Order in which a group's tables are committed; `samples` last marks the group complete.
COMMIT_ORDER = ("blocks", "tokens", "activations", "token_layers", "moments", "samples")


class CaptureConfig(BaseConfig):
    """Everything a capture needs. Every field is also a `tourray capture` flag."""

    model: str = Field(description="Hub id (e.g. Qwen/Qwen3-0.6B) or local checkpoint folder.")
    samples: str = Field(description="Folder of UTF-8 .txt files (any depth), or one .txt file.")
    include: list[str] | None = Field(None, description="Only texts whose path relative to --samples matches one of these globs (a named subset, e.g. 'train/rome__*,train/paris__*'); comma-separated.")
    run: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="Run name; re-running a name resumes it.")
    lake: str = Field("lake", description="Lake root: a local folder or a Lance URI (s3://...).")
    engine: Engine = Field(Engine.hf, description="Runtime that runs the model: hf (transformers).")
    tokenizer: str | None = Field(None, description="Tokenizer id or folder; defaults to the model's.")
    reference: str | None = Field(None, description="Reference model (hub id or folder) run on the same tokens: tokens.kl_ref = KL(reference || model) per token, e.g. the original of a pruned --model. Must share the tokenizer.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    store_dtype: StoreDtype = Field(StoreDtype.float16, description="dtype of stored vectors: float16 halves the bytes of float32; bfloat16 keeps float32's range.")
    model_dtype: ModelDtype = Field(ModelDtype.auto, description="dtype of the forward pass; auto = float32 on CPU, bfloat16 on GPU.")
    layers: str = Field("all", description="Layers to hook: 'all' (embed + every block), 'blocks', 'embed,0,5,10-20', or 'none' (tokens only).")
    store: str = Field("all", description="Hooked layers whose vectors are stored: 'all', 'none', or a subset ('embed,0-3'); the rest feed inline --stats only.")
    stats: list[Literal["moments", "pairs", "units"]] = Field([], description="Inline statistics from the hooked tensors, in float64 before the store cast: moments (per layer, plus MLP-activation channels and per-head output norms), pairs (consecutive layers: cosine, angular distance, CKA), units (only the MLP-activation channels and per-head output norms: what width pruning reads, without the d x d layer moments); comma-separated.")
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

    @field_validator("sites", "stats", "include", mode="before")
    @classmethod
    def _split_sites(cls, v):
        return comma_list(v)

    @field_validator("sites")
    @classmethod
    def _sites_unique(cls, v):
        if not v:
            raise ValueError("at least one site")
        return sorted(set(v), key=list(Site).index)

    @property
    def resolved_model_dtype(self) -> str:
        """`auto` made concrete: bfloat16 for GPU actors, float32 on CPU."""
        if self.model_dtype != ModelDtype.auto:
            return self.model_dtype.value
        return "bfloat16" if self.gpus_per_actor > 0 else "float32"


# -- the stage -------------------------------------------------------------------------------
class CaptureStage(Stage):
    """Ray Data stage: one call = one group of samples in, one row of fragment metadata out."""

    inputs = ("sample_id", "source", "category", "text", "sha256")
    _ROWS_PER_BATCH_BYTES = 8 << 20  # ~8 MB record batches: Lance's fast path (see FIELD_GUIDE)
    _TEXT = SEGMENTS.index("text")

    def __init__(self, cfg: CaptureConfig, lake_root: str, layers: list[int], hidden_size: int, num_layers: int,
                 stored: list[int] | None = None):
        super().__init__()
        self.cfg, self.layers = cfg, layers
        self.lake = lk.Lake(lake_root)
        self.tok = load_tokenizer(cfg)
        self.fmt = PromptFormat(self.tok, corpus.read_system_prompt(cfg.system_prompt), cfg.text_role,
                                cfg.user_prompt, cfg.chat_template)
        self.engine = HFEngine(cfg.model, cfg.revision, cfg.resolved_model_dtype, cfg.store_dtype.value, layers,
                               cfg.sites, num_layers, device="cuda" if cfg.gpus_per_actor > 0 else "cpu", store=stored,
                               inner_sites=tuple(INNER_SITES) if {"moments", "units"} & set(cfg.stats) else (),
                               reference=cfg.reference)
        residual = self.engine.keys if {"moments", "pairs"} & set(cfg.stats) else []  # units: inner sites only
        self.inline = InlineStats(residual, "pairs" in cfg.stats, self.engine.inner_keys,
                                  self.engine.num_heads) if cfg.stats else None
        self.schemas = {t: lk.schema(t, store_dtype=cfg.store_dtype.value, hidden_size=hidden_size) for t in COMMIT_ORDER}
        self._pieces: dict[int, str] = {}
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-forward")
        if cfg.gpus_per_actor == 0:  # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors: undo it
            import torch

            threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.actors)
            torch.set_num_threads(threads)
            self._forward_thread.submit(torch.set_num_threads, threads).result()  # where forwards run

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
        spans = [self._text_span(e) for e in enc]  # once per sample: the inline sink and `samples` use them
        tokens, layer_rows, blocks, nbytes = [], [], [], [0]

        def activation_batches() -> Iterator[pa.RecordBatch]:
            pending, size = [], 0
            for a in range(0, len(order), cfg.batch_size):
                idx = order[a : a + cfg.batch_size]
                sink = None if self.inline is None else \
                    (lambda t, n, idx=idx: self.inline(t, n, [spans[i] for i in idx]))
                for i, cap in zip(idx, self.engine.capture([enc[i].input_ids for i in idx], sink=sink)):
                    sid, e = rows[i]["sample_id"], enc[i]
                    if cap.not_finite:
                        layer, site = cap.not_finite
                        raise UserError(
                            f"sample {rows[i]['source']} (id {sid}), layer {layer}, site {site}: values are not "
                            f"finite in {cfg.store_dtype.value}; use --store-dtype bfloat16 or float32")
                    tokens.append(self._tokens_table(sid, rows[i]["text"], e, cap))
                    if cap.vectors:
                        layer_rows.append(self._token_layers_table(sid, cap))
                    for (layer, site), h in cap.vectors.items():
                        n = len(h)
                        blocks.append((sid, layer, site, 0, n, hashlib.sha256(np.ascontiguousarray(h)).hexdigest()))
                        pending.append((sid, layer, site, h))
                        size += h.nbytes
                        nbytes[0] += h.nbytes
                        if size >= self._ROWS_PER_BATCH_BYTES:
                            yield self._activations_batch(pending)
                            pending, size = [], 0
            if pending:
                yield self._activations_batch(pending)

        frags = {}
        with overlapped(activation_batches(), self._forward_thread) as acts:  # forward passes run while Lance writes
            if self.engine.stored_keys:
                frags["activations"] = self.lake.write_fragments("activations", acts, self.schemas["activations"])
            else:
                for _ in acts:
                    pass
        frags["tokens"] = self.lake.write_fragments("tokens", pa.concat_tables(tokens), self.schemas["tokens"])
        if layer_rows:
            frags["token_layers"] = self.lake.write_fragments("token_layers", pa.concat_tables(layer_rows),
                                                              self.schemas["token_layers"])
        frags["blocks"] = self.lake.write_fragments("blocks", pa.table({
            "run": [run] * len(blocks),
            "sample_id": [b[0] for b in blocks],
            "layer": pa.array([b[1] for b in blocks], pa.int16()),
            "site": [b[2] for b in blocks],
            "pos_start": pa.array([b[3] for b in blocks], pa.int32()),
            "pos_end": pa.array([b[4] for b in blocks], pa.int32()),
            "sha256": [b[5] for b in blocks],
        }, schema=self.schemas["blocks"]), self.schemas["blocks"]) if blocks else []
        span_arr = np.array(spans, np.int32).reshape(-1, 2)
        samples = pa.table({
            "run": [run] * len(rows),
            **{c: [r[c] for r in rows] for c in ("sample_id", "source", "category", "text", "sha256")},
            "n_tokens": pa.array([len(e.input_ids) for e in enc], pa.int32()),
            "truncated": [e.truncated for e in enc],
            "text_start": pa.array(span_arr[:, 0]),
            "text_end": pa.array(span_arr[:, 1]),
        }, schema=self.schemas["samples"])
        if self.inline is not None:  # this group's partial statistics, committed with it
            parts = self.inline.part_rows(run, [r["sample_id"] for r in rows])
            frags["moments"] = self.lake.write_fragments("moments", moments_table(parts), self.schemas["moments"])
        frags["samples"] = self.lake.write_fragments("samples", samples, self.schemas["samples"])
        n_tokens = sum(len(e.input_ids) for e in enc)
        self.stats["samples"] += len(rows)
        self.stats["tokens"] += n_tokens
        return pa.table({
            "fragments": [json.dumps(frags)],
            "n_samples": [len(rows)],
            "n_tokens": [n_tokens],
            "truncated": [[r["source"] for r, e in zip(rows, enc) if e.truncated]],
            "bytes": [nbytes[0]],
        })

    def _tokens_table(self, sid: str, text: str, e: Encoded, cap: Captured) -> pa.Table:
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
            "token_class": classify(text, e.char_start, e.char_end),
            "kl_ref": pa.nulls(n, pa.float32()) if cap.kl_ref is None else pa.array(cap.kl_ref, mask=np.isnan(cap.kl_ref)),
        }, schema=self.schemas["tokens"])

    @classmethod
    def _text_span(cls, e: Encoded) -> tuple[int, int]:
        """[first, last + 1) of the text tokens, so readers select them by position with no join
        against `tokens` (they are contiguous); (n, n) when truncation cut them all."""
        text = np.flatnonzero(e.segment == cls._TEXT)
        n = len(e.segment)
        return (int(text[0]), int(text[-1]) + 1) if len(text) else (n, n)

    def _token_layers_table(self, sid: str, cap: Captured) -> pa.Table:
        """One sample's `token_layers` rows: each stored vector's norm and its cosine with layer l-1's
        resid_post (the block input), in float32 from the stored values, so that layer-similarity
        queries read scalars instead of joining vectors. Keeps at most two layers in float32."""
        keys = sorted(cap.vectors, key=lambda k: k[0])  # layer order (stable): l needs l-1's resid_post
        post: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # layer -> (float32 vectors, norms)
        norms, coss, missing = [], [], []
        for layer, site in keys:
            h = self._stored_float32(cap.vectors[layer, site])
            norm = np.sqrt(np.einsum("ij,ij->i", h, h))
            prev = post.get(layer - 1)  # none for the embedding (-1)
            if prev is None:
                cos = np.full(len(h), np.nan, np.float32)
            else:
                with np.errstate(divide="ignore", invalid="ignore"):  # a zero vector: nan, as numpy says
                    cos = np.einsum("ij,ij->i", h, prev[0]) / (norm * prev[1])
            if site == "resid_post":
                post[layer] = (h, norm)
                post.pop(layer - 2, None)
            norms.append(norm)
            coss.append(cos)
            missing.append(np.full(len(h), prev is None))
        n, k = len(norms[0]), len(keys)
        return pa.table({
            "run": pa.repeat(self.cfg.run, n * k),
            "sample_id": pa.repeat(sid, n * k),
            "pos": pa.array(np.tile(np.arange(n, dtype=np.int32), k)),
            "layer": pa.array(np.repeat(np.array([key[0] for key in keys], np.int16), n)),
            "site": pa.array([key[1] for key in keys]).take(pa.array(np.repeat(np.arange(k), n))),
            "norm": pa.array(np.concatenate(norms)),
            "cos_prev": pa.array(np.concatenate(coss), mask=np.concatenate(missing)),
        }, schema=self.schemas["token_layers"])

    @staticmethod
    def _stored_float32(h: np.ndarray) -> np.ndarray:
        """Stored vectors widened (exactly) to float32; bfloat16 arrives as its uint16 bit patterns.
        torch widens half floats ~8x faster than numpy's astype, which would dominate the cost."""
        import torch

        if h.dtype == np.float32:
            return h
        t = torch.from_numpy(h.view(np.int16)).view(torch.bfloat16) if h.dtype == np.uint16 else torch.from_numpy(h)
        return t.float().numpy()

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
    layers: list[int]          # hooked
    stored: list[int]          # of those, stored as vectors
    info: ModelInfo
    run_row: dict
    run_exists: bool
    schemas: dict[str, pa.Schema]


def plan_capture(cfg: CaptureConfig) -> Plan:
    """Validate everything (samples, model, layers, run identity, table schemas) without writing."""
    from tourray.runtime import in_ray_job

    if in_ray_job() and "://" not in cfg.lake and not Path(cfg.lake).is_absolute():
        raise UserError(f"--lake {cfg.lake!r} is relative, but this is a Ray job running in a temporary copy of "
                        "the working dir: pass an absolute path or a URI (s3://...) so the lake outlives the job")
    samples, skipped = corpus.load_samples(cfg.samples, cfg.skip_invalid, cfg.include)
    system_prompt = corpus.read_system_prompt(cfg.system_prompt)
    tok = load_tokenizer(cfg)
    info = inspect_model(cfg, tok)
    if cfg.reference:  # KL per token compares the two models' distributions over one vocabulary
        from transformers import AutoConfig

        require_folder("--reference", cfg.reference)
        try:
            ref_vocab = AutoConfig.from_pretrained(cfg.reference).get_text_config().vocab_size
            vocab = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision).get_text_config().vocab_size
        except (OSError, ValueError) as e:
            raise UserError(f"--reference {cfg.reference}: not a checkpoint ({str(e).splitlines()[0]})") from None
        if ref_vocab != vocab:
            raise UserError(f"--reference {cfg.reference}: {ref_vocab} logits, --model {vocab}; KL per token needs "
                            "one vocabulary")
        ref_tok = load_tokenizer(cfg.model_copy(update=dict(model=cfg.reference, tokenizer=None, revision=None)))
        if tokenizer_sha256(ref_tok) != info.tokenizer_sha256:
            raise UserError(f"--reference {cfg.reference}: its tokenizer differs from --model's "
                            f"({cfg.tokenizer or cfg.model}); KL per token needs one tokenizer")
    layers = parse_layers(cfg.layers, info.num_layers)
    stored = layers if cfg.store.strip().lower() == "all" else parse_layers(cfg.store, info.num_layers)
    if extra := [l for l in stored if l not in layers]:
        raise UserError(f"--store: layer(s) {compact_layers(extra)} are not hooked (--layers {cfg.layers})")
    if set(stored) != set(layers) and not cfg.stats:
        unused = compact_layers([l for l in layers if l not in stored])
        raise UserError(f"--layers hooks {unused} but --store does not keep them and no --stats use them; "
                        "add --stats moments or store them")
    lake = lk.Lake(cfg.lake)
    row = run_row(cfg, info, layers, samples, system_prompt)
    existing = lake.read("runs", filter=f"run = {lk.sql_quote(cfg.run)}").to_pylist()
    if existing:
        changes = run_changes(existing[0], row)
        if changes:
            raise UserError(f"run {cfg.run!r} already exists in {lake.root} with other inputs; use a new --run.\n  "
                            + "\n  ".join(changes))
    schemas = {t: lk.schema(t, store_dtype=cfg.store_dtype.value, hidden_size=info.hidden_size) for t in lk.TABLES}
    if stored and lake.exists("activations"):
        lake.ensure("activations", schemas["activations"])  # refuse another width/dtype before writing
    return Plan(cfg, lake, samples, skipped, layers, stored, info, row, bool(existing), schemas)


def prepare_lake(plan: Plan) -> set[str]:
    """Create missing tables and the run row, delete rows of half-committed samples (a killed
    run), and return the ids of samples already complete."""
    cfg, lake, q = plan.cfg, plan.lake, lk.sql_quote(plan.cfg.run)
    for table in (("activations", "token_layers") * bool(plan.stored) + ("moments",) * bool(cfg.stats)
                  + ("runs", "samples", "tokens", "blocks")):
        lake.ensure(table, plan.schemas[table])
    if not plan.run_exists:
        runs = plan.schemas["runs"]
        lake.append("runs", pa.Table.from_pylist([plan.run_row], schema=runs), runs)
    done = set(lake.read("samples", ["sample_id"], filter=f"run = {q}").column(0).to_pylist())
    started = set()
    for table in ("blocks", "tokens"):
        started |= set(lake.read(table, ["sample_id"], filter=f"run = {q}").column(0).unique().to_pylist())
    orphans = sorted(started - done)
    if orphans:
        log.warning("run %s: removing rows of %d sample(s) whose capture was interrupted", cfg.run, len(orphans))
        ids = ", ".join(lk.sql_quote(s) for s in orphans)
        for table in ("activations", "token_layers", "tokens", "blocks"):
            lake.delete(table, f"run = {q} AND sample_id IN ({ids})")
    if parts := incomplete_parts(lake, cfg.run, done):  # inline statistics of groups that never completed
        log.warning("run %s: removing partial statistics of %d interrupted group(s)", cfg.run, len(parts))
        lake.delete("moments", f"run = {q} AND source IN ({', '.join(lk.sql_quote(p) for p in parts)})")
    return done


def _groups(plan: Plan, pending: list[corpus.Sample]) -> list[pa.Table]:
    g = plan.cfg.group_size
    return [corpus.to_table(pending[i : i + g]) for i in range(0, len(pending), g)]


def _stage_kwargs(plan: Plan) -> dict:
    return dict(cfg=plan.cfg, lake_root=plan.lake.root, layers=plan.layers, hidden_size=plan.info.hidden_size,
                num_layers=plan.info.num_layers, stored=plan.stored)


def build_capture(plan: Plan, pending: list[corpus.Sample]):
    """The lazy Ray Data pipeline: one block per group of samples -> CaptureStage actor pool."""
    import ray

    cfg = plan.cfg
    return ray.data.from_arrow(_groups(plan, pending)).map_batches(
        CaptureStage,
        fn_constructor_kwargs=_stage_kwargs(plan),
        batch_size=cfg.group_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )


def local_capture(plan: Plan, pending: list[corpus.Sample]) -> Iterator[pa.Table]:
    """The same stage run in this process, group by group: the executor for a capture that is itself
    one Ray task (e.g. a pruning sweep's variant), where an actor pool per task would oversubscribe."""
    stage = CaptureStage(**_stage_kwargs(plan))
    for group in _groups(plan, pending):
        yield stage(group)


def run_capture(cfg: CaptureConfig, progress: bool = True, executor: Literal["ray", "local"] = "ray") -> dict:
    """Plan, then capture what is missing, committing each group as its result arrives. `executor`
    "local" runs the stage in this process instead of a Ray Data actor pool (same tables, same commits)."""
    from tqdm import tqdm

    from tourray.runtime import init_ray, user_error_in

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
        bar = tqdm(total=len(pending), unit="sample", disable=not progress, dynamic_ncols=True)
        t1 = time.perf_counter()
        try:
            if executor == "local":
                results = local_capture(plan, pending)
            else:
                init_ray(cfg.address)
                # prefetch_batches=0: commit each group as soon as it arrives (a prefetching iterator
                # holds a result back until the next one, so a kill would lose two groups, not one)
                results = build_capture(plan, pending).iter_batches(batch_size=None, prefetch_batches=0,
                                                                    batch_format="pyarrow")
            for row in (r for b in results for r in b.to_pylist()):
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
        summary["tokens_per_s"] = round(summary["tokens"] / max(summary["capture_seconds"], 1e-9), 1)
    if cfg.stats and (pending or not plan.lake.exists("layer_stats")):
        summary["inline_stats"] = finalize(plan.lake, cfg.run)  # merge the groups' parts into layer/pair stats
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    record_summary(plan.lake, cfg.run, summary)
    return summary


