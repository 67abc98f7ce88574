"""Planning: everything a capture is checked against before any work (samples, model, layers, run
identity, table schemas), and the lake made ready for it (tables, the run row, a killed run's rows
removed)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from tourray.corpus import texts as corpus
from tourray.lake import tables as lk
from tourray.capture.config import CaptureConfig
from tourray.capture.hf import check_sites
from tourray.config import compact_layers, parse_layers
from tourray.errors import UserError
from tourray.lake.repair import clean_marks, delete_incomplete, remove_unreferenced
from tourray.model.identity import ModelInfo, inspect_model, load_tokenizer, model_revision, require_folder, tokenizer_sha256
from tourray.lake import runs as run_records
from tourray.lake.runs import read_manifest, run_changes, snapshot_hash, stored_texts, update_manifest
from tourray.runtime import git_commit

log = logging.getLogger("tourray")


def run_row(cfg: CaptureConfig, info: ModelInfo, layers: list[int], samples, system_prompt: str) -> dict:
    import tourray

    prompt = dict(chat_template=cfg.chat_template, text_role=cfg.text_role, user_prompt=cfg.user_prompt,
                  max_length=cfg.max_length)
    manifest = dict(
        config=cfg.model_dump(mode="json"),
        prompt=prompt,
        runtime=runtime_identity(cfg),
        samples_root=str(Path(cfg.samples).resolve()),
        n_texts=len(samples),  # the texts themselves: the run_texts table (see text_rows)
        texts_sha256=snapshot_hash({s.source: s.sha256 for s in samples}),
        versions=run_records.capture_versions(),  # through the module: what a resume records is patched there in tests
    )
    if cfg.reference:
        manifest["reference_revision"] = model_revision(cfg.reference, cfg.reference_revision)
    return dict(
        run=cfg.run, model=cfg.model, model_revision=info.model_revision,
        tokenizer=cfg.tokenizer or cfg.model, tokenizer_sha256=info.tokenizer_sha256,
        engine=cfg.engine.value, model_dtype=cfg.resolved_model_dtype,
        store_dtype=cfg.store_dtype.value, num_layers=info.num_layers, hidden_size=info.hidden_size,
        layers=layers, sites=[s.value for s in cfg.sites],
        system_prompt_sha256=corpus.sha256_bytes(system_prompt.encode()),
        tourray_version=tourray.__version__, tourray_commit=git_commit(),
        created_at=dt.datetime.now(dt.timezone.utc), manifest=json.dumps(manifest),
    )


def runtime_identity(cfg: CaptureConfig) -> dict:
    """What else changes the numbers a run stores: the device kind, the attention kernel (eager,
    sdpa and flash attention differ in the last bits; so do CPU and GPU matmuls) and, for a
    tokens-only hf capture, whether the shared prompt prefix runs once (`hf.prefix_cache`)."""
    hf = cfg.engine.value == "hf"
    out = dict(device="cuda" if cfg.gpus_per_actor > 0 else "cpu", attn_implementation=cfg.hf.attn_implementation if hf else None)
    if hf and cfg.layers.strip().lower() == "none" and not cfg.stats:
        out["prefix_cache"] = cfg.hf.prefix_cache
    return out


def text_rows(run: str, samples) -> list[dict]:
    """The run's text snapshot as `run_texts` rows."""
    return [dict(run=run, sample_id=s.sample_id, source=s.source, sha256=s.sha256, category=s.category) for s in samples]


@dataclass
class Plan:
    """What the driver resolved before any work: refusals happen while building it."""

    cfg: CaptureConfig
    actor_cfg: CaptureConfig   # cfg with hub revisions pinned to the commits resolved here
    system_prompt: str         # the text: actors on other nodes never read the driver's file
    tokenizer: object          # shipped to actors as resolved here
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
    if cfg.engine.value == "vllm":
        from tourray.capture.vllm import check_available

        check_available()  # the install line, before the lake or the model is touched
    # the lake's first read, before the tokenizer and the model load: a mistyped URI scheme or an
    # unreachable store is refused at once instead of after them (~5 s on a 2-core machine)
    lake = lk.Lake(cfg.lake, cfg.storage_options)
    existing = lake.read("runs", filter=f"run = {lk.sql_quote(cfg.run)}").to_pylist()
    samples, skipped = corpus.load_samples(cfg.samples, cfg.skip_invalid, cfg.include)
    system_prompt = corpus.read_system_prompt(cfg.system_prompt)
    tok = load_tokenizer(cfg)
    info = inspect_model(cfg, tok)
    check_sites(info.model_type, cfg.sites)  # e.g. resid_mid on a parallel-residual block: no such point
    if cfg.reference:  # KL per token compares the two models' distributions over one vocabulary
        from transformers import AutoConfig

        require_folder("--reference", cfg.reference)
        try:
            ref_vocab = AutoConfig.from_pretrained(cfg.reference, revision=cfg.reference_revision).get_text_config().vocab_size
            vocab = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision).get_text_config().vocab_size
        except (OSError, ValueError) as e:
            raise UserError(f"--reference {cfg.reference}: not a checkpoint ({str(e).splitlines()[0]})") from None
        if ref_vocab != vocab:
            raise UserError(f"--reference {cfg.reference}: {ref_vocab} logits, --model {vocab}; KL per token needs "
                            "one vocabulary")
        ref_tok = load_tokenizer(cfg.model_copy(update=dict(model=cfg.reference, tokenizer=None,
                                                             revision=cfg.reference_revision)))
        if tokenizer_sha256(ref_tok) != info.tokenizer_sha256:
            raise UserError(f"--reference {cfg.reference}: its tokenizer differs from --model's "
                            f"({cfg.tokenizer or cfg.model}); KL per token needs one tokenizer")
    if cfg.logits_spec is not None:
        check_logits(cfg)
    layers = parse_layers(cfg.layers, info.num_layers)
    stored = layers if cfg.store.strip().lower() == "all" else parse_layers(cfg.store, info.num_layers)
    if extra := [l for l in stored if l not in layers]:
        raise UserError(f"--store: layer(s) {compact_layers(extra)} are not hooked (--layers {cfg.layers})")
    if set(stored) != set(layers) and not cfg.stats:
        unused = compact_layers([l for l in layers if l not in stored])
        raise UserError(f"--layers hooks {unused} but --store does not keep them and no --stats use them; "
                        "add --stats moments or store them")
    row = run_row(cfg, info, layers, samples, system_prompt)
    if cfg.reference_run is not None:
        check_reference_run(cfg, lake, row, samples)
    if existing:
        if existing[0]["model_revision"].startswith("sha256:") and row["model_revision"].startswith("st-sha256:"):
            row["model_revision"] = model_revision(cfg.model, cfg.revision, full=True)  # a lake from before
        changes = run_changes(existing[0], row, stored_texts(lake, existing[0]),
                              {s.source: (s.sha256, s.category) for s in samples}, cfg.allow_version_change)
        if changes:
            raise UserError(f"run {cfg.run!r} already exists in {lake.root} with other inputs; use a new --run.\n  "
                            + "\n  ".join(changes))
    schemas = {t: lk.schema(t, store_dtype=cfg.store_dtype.value, hidden_size=info.hidden_size) for t in lk.TABLES}
    if stored and lake.exists("activations"):
        lake.ensure("activations", schemas["activations"])  # refuse another width/dtype before writing
    actor_cfg = pin_revisions(cfg, info.model_revision, json.loads(row["manifest"]).get("reference_revision"))
    return Plan(cfg, actor_cfg, system_prompt, tok, lake, samples, skipped, layers, stored, info, row, bool(existing),
                schemas)


def check_reference_run(cfg: CaptureConfig, lake: lk.Lake, row: dict, samples) -> None:
    """--reference-run: a complete run of this lake that stored a top-K distribution of every text,
    through the same tokenizer and prompt (so its rows are these texts' tokens)."""
    flag = f"--reference-run {cfg.reference_run}"
    if cfg.reference:
        raise UserError(f"{flag}: give --reference (a model run beside this one) or --reference-run (a stored "
                        "distribution), not both")
    ref = lake.read("runs", filter=f"run = {lk.sql_quote(cfg.reference_run)}").to_pylist() if lake.exists("runs") else []
    if not ref:
        raise UserError(f"{flag}: no such run in {lake.root}")
    ref = ref[0]
    spec = json.loads(ref["manifest"])["config"].get("logits")
    if not spec or spec.startswith("sample:"):
        raise UserError(f"{flag}: the run stored {'no' if not spec else 'a sampled'} distribution (--logits "
                        f"{spec}); capture it with --logits K (the top K ids)")
    same = [k for k in ("tokenizer_sha256", "system_prompt_sha256") if ref[k] != row[k]]
    if json.loads(ref["manifest"])["prompt"] != json.loads(row["manifest"])["prompt"]:
        same.append("prompt settings (chat template, text role, user prompt, --max-length)")
    if same:
        raise UserError(f"{flag}: another {', '.join(same)} than this capture; its rows are not these tokens")
    done = set(lake.read("samples", ["sample_id"], filter=f"run = {lk.sql_quote(cfg.reference_run)}")
               .column(0).to_pylist()) if lake.exists("samples") else set()
    if missing := [s.source for s in samples if s.sample_id not in done]:
        raise UserError(f"{flag}: {len(missing)} of these texts are not complete in that run (first: {missing[0]})")


def vocab_size(model: str, revision: str | None = None, gguf_file: str | None = None) -> int | None:
    """The model's vocabulary size from its config; None for a model that cannot be read (the
    model's own checks name it)."""
    from transformers import AutoConfig

    from tourray.model.gguf import resolve_gguf

    path, gguf = resolve_gguf(model, gguf_file)
    try:
        return AutoConfig.from_pretrained(path, revision=revision, **({"gguf_file": gguf} if gguf else {})
                                          ).get_text_config().vocab_size
    except (OSError, ValueError):
        return None


def check_logits(cfg: CaptureConfig) -> None:
    """--logits K beyond the vocabulary, or sample:N absurdly large: refused before any work."""
    vocab = vocab_size(cfg.model, cfg.revision, cfg.gguf_file)
    if vocab is None:
        return  # inspect_model has already named a model it cannot read
    mode, k = cfg.logits_spec
    if k > vocab:
        raise UserError(f"--logits {cfg.logits}: {k} ids per token, but the vocabulary has {vocab}; use at most {vocab}")


def pin_revisions(cfg: CaptureConfig, model_commit: str, reference_commit: str | None) -> CaptureConfig:
    """The config actors load from: a hub model's (and reference's) branch or tag replaced by the
    commit the driver resolved, so no actor re-resolves `main` (a push mid-run would mix models)."""
    is_commit = lambda r: bool(r) and re.fullmatch(r"[0-9a-f]{40}", r) is not None  # noqa: E731
    update = {}
    if is_commit(model_commit) and not cfg.gguf_file and not Path(cfg.model).expanduser().exists():
        update["revision"] = model_commit
    if cfg.reference and is_commit(reference_commit) and not Path(cfg.reference).expanduser().exists():
        update["reference_revision"] = reference_commit
    return cfg.model_copy(update=update) if update else cfg


def all_groups(plan: Plan) -> list[list[corpus.Sample]]:
    """Fixed slices of the full, deterministic sample order. Groups (and so the padded forward
    batches inside them) never depend on what is still pending: a resumed run batches every text
    exactly as an uninterrupted one, so its activations are byte-identical."""
    g = plan.cfg.group_size
    return [plan.samples[i : i + g] for i in range(0, len(plan.samples), g)]


def prepare_lake(plan: Plan, own: str | None = None) -> set[str]:
    """Create missing tables and the run row, delete every row of groups that are not complete (a
    killed run, possibly with groups committed out of order), and return the ids of samples in
    complete groups. A group is the unit of resume: a partial one is captured again whole. `own`:
    this driver's lease holder id (never-committed files are removed only with it, and only those
    older than every live lease: see `repair.remove_unreferenced`).

    Cost: the run's `samples` ids, plus what was committed since the run's clean marks (see
    `repair.delete_incomplete`), not every token row of the run."""
    cfg, lake, q = plan.cfg, plan.lake, lk.sql_quote(plan.cfg.run)
    for table in (("activations", "token_layers", "block_sums") * bool(plan.stored) + ("moments",) * bool(cfg.stats)
                  + ("logits",) * bool(cfg.logits)
                  + ("runs", "run_texts", "samples", "tokens", "blocks")):
        lake.ensure(table, plan.schemas[table])
    if not lake.read("runs", ["run"], filter=f"run = {q}").num_rows:  # again: another driver may have made it
        # the texts first, then the run row: a start killed in between left texts of no run
        if lake.read("run_texts", ["run"], filter=f"run = {q}").num_rows:
            lake.delete("run_texts", f"run = {q}")
        texts = plan.schemas["run_texts"]
        lake.append("run_texts", pa.Table.from_pylist(text_rows(cfg.run, plan.samples), schema=texts), texts)
        # a new run has no rows anywhere yet: everything up to today's fragments is clean for it
        manifest = dict(json.loads(plan.run_row["manifest"]), clean_fragments=clean_marks(lake, 0))
        runs = plan.schemas["runs"]
        lake.append("runs", pa.Table.from_pylist([dict(plan.run_row, manifest=json.dumps(manifest))], schema=runs), runs)
        return set()
    committed = set(lake.read("samples", ["sample_id"], filter=f"run = {q}").column(0).to_pylist())
    done = {s.sample_id for grp in all_groups(plan) if all(s.sample_id in committed for s in grp) for s in grp}
    # taken before the deletion: rows committed after them are looked at next time; of the run's
    # samples rows, those of complete groups are left
    marks, before = clean_marks(lake, len(done)), read_manifest(lake, cfg.run).get("clean_fragments")
    delete_incomplete(lake, cfg.run, done, since=before, committed=committed)  # a partial group is redone whole
    if own is not None and len(done) < len(plan.samples):
        # an interrupted run: its actors' never-committed fragment files (older than every live lease)
        remove_unreferenced(lake, {own})
    if marks != before:
        update_manifest(lake, cfg.run, clean_fragments=marks)
    return done


def groups(plan: Plan, done: set[str]) -> list[pa.Table]:
    """The groups still to capture: whole fixed groups (see `all_groups`) not all in `done`."""
    return [corpus.to_table(grp) for grp in all_groups(plan) if not all(s.sample_id in done for s in grp)]
