"""`tourray prune sweep`: many pruned variants of one model, each planned, written, captured on the
eval sets and judged against the unpruned model, one Ray task per variant; then a report.

    evidence run (unpruned, train texts, both sites) ─► plan ─► apply (+patch) ─► capture eval sets
    baseline run (unpruned, eval texts)                                        (tokens, --reference)
                                                       └──────── compare_runs.sql + verdict ◄──┘

Before any variant runs, the report records where the evidence alone says the cliff should be
(`predict_cliff`), so the prediction cannot be fitted to the outcome. Variants whose eval run is
already complete in the lake are not recomputed (a sweep resumes); each variant's checkpoint is
deleted after its evaluation unless --keep-checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt

from tourray.config import CommaList
from tourray.lake import tables as lk
from tourray.errors import UserError
from tourray.prune.plan import METHODS, Method
from tourray.prune.evaluate import EvalSettings, capture_eval, is_complete, judge

log = logging.getLogger("tourray")


class SweepConfig(EvalSettings):
    """`tourray prune sweep`: every field is a flag (lists comma-separated)."""

    model: str = Field(description="The unpruned checkpoint folder.")
    run: str = Field(description="Evidence run: the unpruned model's capture (stored vectors, both sites for --patch lstsq).")
    methods: CommaList[Method] = Field(list(METHODS), description="Plan methods: " + ", ".join(METHODS) + ".")
    removed: CommaList[PositiveInt] = Field([2, 4, 6, 8, 10, 12], description="Blocks removed per variant.")
    patch: CommaList[Literal["none", "lstsq", "cosine"]] = Field(["none", "lstsq"], description="Patches: none, lstsq, cosine.")
    ridge: float = Field(0.0, ge=0, description="Ridge of the patches toward the identity (see tourray prune apply --ridge).")
    patch_methods: CommaList[Method] | None = Field(None, description="Methods that get the patched variants (default: all of --methods except random).")
    seeds: int = Field(5, gt=0, description="Seeds of --method random (mean and spread are reported).")
    protect: str | None = Field(None, description="Blocks no plan may delete (e.g. 0,-1).")
    workers: int = Field(1, gt=0, description="Variants evaluated at once (Ray tasks in flight).")
    cpus_per_task: float = Field(2.0, gt=0, description="CPUs Ray reserves per variant task (its torch threads).")
    workdir: str = Field(".cache/prune", description="Where variant plans and checkpoints are written.")
    keep_checkpoints: bool = Field(False, description="Keep each variant's checkpoint (135M params: ~0.5 GB each in float32).")
    reports: str = Field("reports", description="Folder of the report, its plots and the results JSON.")
    generate_prompts: str | None = Field(None, description="Prompts file (one per line) for the side-by-side generations.")
    generate_removed: int | None = Field(None, description="Variants with this many blocks removed get generations (default: the middle of --removed).")
    max_new_tokens: int = Field(48, gt=0, description="Tokens generated per prompt.")



@dataclass(frozen=True)
class Variant:
    method: str
    remove: int
    patch: str = "none"
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.remove}" + (f"-s{self.seed}" if self.method == "random" else "") + \
            ("" if self.patch == "none" else f"-{self.patch}")


def variants(cfg: SweepConfig) -> list[Variant]:
    patched = set(cfg.patch_methods if cfg.patch_methods is not None else [m for m in cfg.methods if m != "random"])
    out = []
    for n in cfg.removed:
        for m in cfg.methods:
            for p in cfg.patch:
                if p != "none" and m not in patched:
                    continue
                for s in range(cfg.seeds if m == "random" else 1):
                    out.append(Variant(m, n, p, s))
    return out


# -- the evidence's prediction -------------------------------------------------------------------
def predict_cliff(lake: lk.Lake, run: str, removed: list[int], protect: str | None = None,
                  plans: dict | None = None) -> dict:
    """Where the lake evidence alone puts the cliff: for each N, the angular distance of the best
    span of N blocks (Gromov et al.) and the summed block influence of the N least influential
    blocks (ShortGPT); the predicted cliff is the knee of the angular curve (Kneedle: the N farthest
    below the chord from its first to its last point). `plans` (from `check_variants`) are reused."""
    from tourray.prune.plan import PlanConfig, make_plan

    plans = plans if plans is not None else {}

    def plan(method: str, n: int) -> dict:
        if (method, n, 0) not in plans:
            plans[method, n, 0] = make_plan(PlanConfig(lake=lake.root, storage_options=lake.storage_options or {}, run=run,
                                                          method=method, remove=n, protect=protect))
        return plans[method, n, 0]

    curve = {}
    for n in sorted(set(removed)):
        ang, bi = plan("angular", n), plan("block-influence", n)
        best = ang["evidence"]["angular_by_start"][ang["removed"][0]]  # the chosen span (protected ones excluded)
        curve[n] = dict(angular_best=best, angular_span=ang["removed"],
                        block_influence_sum=float(sum(bi["evidence"]["block_influence"][b] for b in bi["removed"])),
                        block_influence_blocks=bi["removed"])
    ns = sorted(curve)
    y = np.array([curve[n]["angular_best"] for n in ns])
    knee, shape = ns[-1], "too few points"
    if len(ns) >= 3:
        x = np.array(ns, float)
        below = y - (y[0] + (y[-1] - y[0]) * (x - x[0]) / (x[-1] - x[0]))
        if below.min() < 0:  # convex: flat, then rising; the cliff is where it turns up
            knee, shape = ns[int(np.argmin(below))], "convex (a plateau, then a rise)"
        else:  # concave: the distance rises fastest from the first block removed; no plateau to stand on
            knee, shape = ns[0], "concave (steepest at the start: no plateau)"
    return dict(curve=curve, predicted_cliff=knee, shape=shape,
                rule="knee (Kneedle) of the best-span angular distance against blocks removed: where a convex curve "
                     "turns up; the first count when the curve is concave (every removal already moves the stream)")


# -- one variant: a Ray task ---------------------------------------------------------------------
def evaluate_variant(cfg: SweepConfig, v: Variant, base_run: str, n_eval: int, prompts: list[str]) -> dict:
    """Plan, apply, capture the eval sets (tokens only, KL against the original), judge."""
    import torch

    from tourray.prune.apply import ApplyConfig, run_apply
    from tourray.prune.plan import PlanConfig, make_plan, write_plan

    torch.set_num_threads(max(1, int(cfg.cpus_per_task)))
    lake = cfg.open_lake()
    run = f"{cfg.run}.{v.name}"
    work = Path(cfg.workdir) / cfg.run
    plan = make_plan(PlanConfig(lake=cfg.lake, storage_options=cfg.storage_options, run=cfg.run, method=v.method,
                                remove=v.remove, seed=v.seed, protect=cfg.protect))
    plan_path, gen_path = work / f"{v.name}.plan.json", work / f"{v.name}.generations.json"
    done = is_complete(lake, run, n_eval)
    before = json.loads(plan_path.read_text())["removed"] if done and plan_path.is_file() else plan["removed"]
    if before != plan["removed"]:
        raise UserError(f"variant {v.name}: run {run} was captured for blocks {before}, "
                        f"but the plan now removes {plan['removed']} (other evidence or --protect?); use another --run "
                        "or delete that run's rows")
    write_plan(plan, plan_path)
    t0 = time.perf_counter()
    out: dict = dict(variant=v.name, **asdict(v), removed_blocks=plan["removed"], run=run)
    ckpt = work / v.name
    if not done:
        shutil.rmtree(ckpt, ignore_errors=True)
        applied = run_apply(ApplyConfig(model=cfg.model, plan=str(plan_path), out=str(ckpt), patch=v.patch,
                                        ridge=cfg.ridge, storage_options=cfg.storage_options))
        out["parameters"], out["patches"] = applied["parameters"], applied["patches"]
        s = capture_eval(cfg, str(ckpt), run, cfg.model, base_run=base_run)
        out["eval_tokens_per_s"] = s.get("tokens_per_s")
        if prompts:
            from tourray.corpus.texts import read_system_prompt
            from tourray.model.generate import generate

            out["generations"] = generate(str(ckpt), prompts, read_system_prompt(cfg.system_prompt),
                                          max_new_tokens=cfg.max_new_tokens)
            gen_path.write_text(json.dumps(out["generations"]) + "\n")  # a re-run's report shows them too
        if not cfg.keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
    elif prompts and gen_path.is_file():
        out["generations"] = json.loads(gen_path.read_text())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out | judge(cfg, base_run, run)


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict:
    """Baseline, prediction, then every variant (at most --workers Ray tasks at once); the report."""
    import ray
    from tqdm import tqdm

    from tourray.capture import run_capture
    from tourray.prune.report import write_report
    from tourray.runtime import init_ray, user_error_in

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg)  # Ray tasks may run in another working directory (a cluster node)
    lake = cfg.open_lake()
    bad = [m for m in cfg.patch_methods or [] if m not in cfg.methods]
    if bad:
        raise UserError(f"--patch-methods: {bad} not among --methods")
    plans = check_variants(cfg)  # every plan and patch is possible: refuse before anything is written
    n_eval = cfg.n_eval()
    prompts = _prompts(cfg)
    todo = variants(cfg)
    gen_at = cfg.generate_removed if cfg.generate_removed is not None else sorted(cfg.removed)[len(cfg.removed) // 2]
    prediction = predict_cliff(lake, cfg.run, cfg.removed, cfg.protect, plans)  # before any variant: see the module doc
    log.info("sweep %s: %d variants; the evidence predicts the cliff at %d blocks removed", cfg.run, len(todo),
             prediction["predicted_cliff"])
    base_run = f"{cfg.run}.original"
    base = run_capture(cfg.capture_config(cfg.model, base_run, None), progress=progress)
    original = {}
    if prompts:
        from tourray.corpus.texts import read_system_prompt
        from tourray.model.generate import generate

        original = dict(generations=generate(cfg.model, prompts, read_system_prompt(cfg.system_prompt),
                                             max_new_tokens=cfg.max_new_tokens))
    init_ray()
    task = ray.remote(evaluate_variant).options(num_cpus=cfg.cpus_per_task, max_retries=0)
    results, pending = [], {}
    bar = tqdm(total=len(todo), unit="variant", disable=not progress, dynamic_ncols=True)
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < cfg.workers:
                v = queue.pop(0)
                pending[task.remote(cfg, v, base_run, n_eval, prompts if v.remove == gen_at else [])] = v
            done, _ = ray.wait(list(pending), num_returns=1)
            v = pending.pop(done[0])
            try:
                r = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - a user error inside the task is reported as itself
                raise user_error_in(e) or e
            results.append(r)
            bar.update(1)
            bar.set_postfix_str(f"{v.name}: {'PASS' if r['verdict']['passed'] else 'FAIL'}")
    finally:
        bar.close()
    order = {v.name: i for i, v in enumerate(todo)}
    results.sort(key=lambda r: order[r["variant"]])
    summary = dict(run=cfg.run, model=cfg.model, base_run=base_run, eval_samples=cfg.eval_samples, n_eval=n_eval,
                   config=cfg.model_dump(mode="json"), prediction=prediction, original=original,
                   base_tokens_per_s=base.get("tokens_per_s"), variants=results,
                   seconds=round(time.perf_counter() - t0, 1))
    summary["report"] = str(write_report(summary, lake, Path(cfg.reports)))
    return summary


def absolute_paths(cfg, paths=("model", "eval_samples", "system_prompt", "generate_prompts")):
    """The config with every local path made absolute (URIs and hub ids kept): Ray tasks may run in
    another working directory. `paths` are optional local paths; workdir, reports and lake always."""
    def fix(v):
        return v if v is None or "://" in v or not Path(v).exists() and v.count("/") == 1 else str(Path(v).resolve())

    upd = {k: fix(getattr(cfg, k)) for k in paths}
    upd |= {k: str(Path(getattr(cfg, k)).resolve()) for k in ("workdir", "reports")}
    if "://" not in cfg.lake:
        upd["lake"] = str(Path(cfg.lake).resolve())
    return cfg.model_copy(update=upd)


def check_variants(cfg: SweepConfig) -> dict[tuple[str, int, int], dict]:
    """Plan every (method, blocks removed, seed) once and check the patches' vectors, so that a sweep
    that cannot finish is refused before its first capture; returns the plans by that key."""
    from tourray.prune.patch import check_patchable
    from tourray.prune.plan import PlanConfig, make_plan, spans

    lake, plans = cfg.open_lake(), {}
    for v in variants(cfg):
        key = (v.method, v.remove, v.seed)
        if key not in plans:
            try:
                plans[key] = make_plan(PlanConfig(lake=cfg.lake, storage_options=cfg.storage_options, run=cfg.run,
                                                  method=v.method, remove=v.remove, seed=v.seed, protect=cfg.protect))
            except UserError as e:
                raise UserError(f"variant {v.name}: {e}") from None
        if v.patch != "none":
            check_patchable(lake, cfg.run, spans(plans[key]["removed"]))
    return plans


def _prompts(cfg: SweepConfig) -> list[str]:
    if not cfg.generate_prompts:
        return []
    from tourray.model.generate import read_prompts

    return read_prompts(cfg.generate_prompts)
