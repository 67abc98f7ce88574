"""The heal study (`jobs/heal.py`): compressed variants built as `tourray qa` builds them, each judged
before and after `tourray heal` on the same eval texts against the original, in one report.

    for each variant (width, depth + patch, combined, slicing):
        build the checkpoint (qa.job.build) ─► eval capture + verdict ("before")
        ─► heal toward the teacher run ─► eval capture + verdict ("after")
    report: reports/heal_<name>.md (+ .json, a plot of perplexity ratio against parameters kept)

Everything resumes: a variant whose healed checkpoint is finished is not built or healed again, and
eval runs whose identity matches are reused.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from pydantic import Field

from tourray.errors import UserError
from tourray.heal.config import HealConfig, HealSettings
from tourray.lake import tables as lk
from tourray.prune.evaluate import capture_eval, is_complete, judge
from tourray.qa.job import QAConfig, build, fresh_eval_run, original_eval, variants

log = logging.getLogger("tourray")

#: Variant families a heal applies to (folds keep the function: nothing to heal).
HEALED = ("width", "depth", "combined", "slice")


class HealStudyConfig(QAConfig):
    """The QA variant matrix and eval settings, plus the teacher run and how each variant is healed."""

    name: str = Field("heal", description="Report name: reports/heal_<name>.md; eval runs are <run>.heal-<name>.<variant>[.healed].")
    teacher_run: str = Field(description="Run of this lake captured with --logits on the training texts: the distillation target.")
    heal: HealSettings = Field(default_factory=HealSettings, description="How every variant is healed (tourray heal's settings).")
    generate_prompts: str | None = Field(None, description="File of prompts (one per line): greedy generations of the original and each variant before and after, side by side in the report.")
    max_new_tokens: int = Field(40, gt=0, description="Tokens generated per prompt.")
    permutations: bool = Field(False, description="(QA's fold variants: not healed; off here.)")
    rotation: bool = Field(False, description="(QA's fold variants: not healed; off here.)")
    workdir: str = Field(".cache/heal", description="Where variant and healed checkpoints are written (kept: a re-run resumes from them).")


def _judged(cfg: HealStudyConfig, folder: str, run: str, base_run: str, n_eval: int) -> dict:
    fresh_eval_run(cfg, folder, run, cfg.model, base_run=base_run)
    if not is_complete(cfg.open_lake(), run, n_eval):
        capture_eval(cfg, folder, run, cfg.model, base_run=base_run)
    return judge(cfg, base_run, run)


def _heal_log(lake: lk.Lake, run: str) -> list[dict]:
    if not lake.exists("heal_log"):
        return []
    cols = ["step", "loss", "kd", "ce", "val_kl", "val_top1", "tokens", "tokens_per_s"]
    return lake.read("heal_log", cols, filter=f"run = {lk.sql_quote(run)}").sort_by("step").to_pylist()


def run_study(cfg: HealStudyConfig, progress: bool = True) -> dict:
    """Build, judge, heal and judge again each variant; write the report."""
    from tourray.prune.sweep import absolute_paths
    from tourray.qa.job import check
    from tourray.surgery.fold import parameters

    from tourray.heal.train import run_heal

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg, ("model", "eval_samples", "system_prompt", "generate_prompts"))
    lay = check(cfg)
    gen_prompts = None
    if cfg.generate_prompts:  # read first: a missing file is refused before any capture
        from tourray.model.generate import read_prompts

        gen_prompts = read_prompts(cfg.generate_prompts)
    lake = cfg.open_lake()
    lk.run_row(lake, cfg.teacher_run, "teacher_run")
    n_eval = cfg.n_eval()
    prefix = f"{cfg.run}.heal-{cfg.name}"
    base_run = original_eval(cfg, prefix, n_eval, progress)
    work = Path(cfg.workdir) / cfg.name
    work.mkdir(parents=True, exist_ok=True)
    base_params = parameters(cfg.model)
    todo = [v for v in variants(cfg) if v.family in HEALED]
    if not todo:
        raise UserError("the heal study has no variant to heal: give width, depth, combined or slice_widths")
    results, generations = [], {}
    if gen_prompts:
        generations["original"] = _generate(cfg, cfg.model, gen_prompts)
    for v in todo:
        tv = time.perf_counter()
        ckpt, healed = work / v.name, work / f"{v.name}.healed"
        done = (healed / "tourray_heal.json").is_file()
        if not done or not (ckpt / "config.json").is_file():
            shutil.rmtree(ckpt, ignore_errors=True)
            build(cfg, v, lay, ckpt)
        log.info("heal study %s: judging the variant before healing", v.name)
        before = _judged(cfg, str(ckpt), f"{prefix}.{v.name}", base_run, n_eval)
        hcfg = HealConfig(**cfg.heal.model_dump(), student=str(ckpt), teacher_run=f"{lake.root}:{cfg.teacher_run}",
                          out=str(healed), run=f"{prefix}.{v.name}", lake=cfg.lake, storage_options=cfg.storage_options)
        hcfg.eval_samples = cfg.eval_samples
        th = time.perf_counter()
        h = run_heal(hcfg, progress=progress)
        heal_s = time.perf_counter() - th
        log.info("heal study %s: judging the healed variant", v.name)
        after = _judged(cfg, str(healed), f"{prefix}.{v.name}.healed", base_run, n_eval)
        if gen_prompts:
            generations[f"{v.name} before"] = _generate(cfg, str(ckpt), gen_prompts)
            generations[f"{v.name} healed"] = _generate(cfg, str(healed), gen_prompts)
        r = dict(variant=v.name, family=v.family, settings=v.params, parameters=parameters(str(healed)),
                 before=before, after=after, heal={k: h[k] for k in ("steps", "tokens", "best_step", "val_kl_before",
                                                                      "val_kl_best", "stopped_early", "seconds")},
                 heal_log=_heal_log(lake, hcfg.run_name), heal_seconds_this_run=round(heal_s, 1),
                 seconds=round(time.perf_counter() - tv, 1))
        r["parameter_fraction"] = r["parameters"] / base_params
        results.append(r)
        log.info("heal study %s: %s", v.name, summary_line(r, cfg.criteria.seen_category))
        summary = report(cfg, base_run, n_eval, base_params, results, generations, t0)  # after each variant
    return summary


def report(cfg: HealStudyConfig, base_run: str, n_eval: int, base_params: int, results: list, generations: dict,
           t0: float) -> dict:
    from tourray.heal.report import write_report

    summary = dict(name=cfg.name, model=cfg.model, run=cfg.run, teacher_run=cfg.teacher_run, base_run=base_run,
                   n_eval=n_eval, config=cfg.model_dump(mode="json"), original_parameters=base_params, variants=results,
                   generations=generations or None, seconds=round(time.perf_counter() - t0, 1))
    summary["report"] = str(write_report(summary, Path(cfg.reports)))
    return summary


def _generate(cfg: HealStudyConfig, folder: str, prompts: list[str]) -> list[dict]:
    from tourray.corpus import texts as corpus
    from tourray.model.generate import generate

    system = corpus.read_system_prompt(cfg.system_prompt)
    return [{k: r[k] for k in ("prompt", "text", "n_new_tokens", "stopped")}
            for r in generate(folder, prompts, system, max_new_tokens=cfg.max_new_tokens)]


def _ratio(j: dict, category: str) -> float:
    row = next((c for c in j["comparison"] if c["category"] == category), {})
    return row.get("ppl_ratio", float("nan"))


def summary_line(r: dict, seen: str) -> str:
    b, a = r["before"], r["after"]
    return (f"{100 * r['parameter_fraction']:.1f}% parameters: {seen} ppl x{_ratio(b, seen):.3f} -> x{_ratio(a, seen):.3f}, "
            f"KL {b['comparison'][-1].get('mean_kl') or 0:.4f} -> {a['comparison'][-1].get('mean_kl') or 0:.4f}, "
            f"{'PASS' if b['verdict']['passed'] else 'FAIL'} -> {'PASS' if a['verdict']['passed'] else 'FAIL'} "
            f"({r['heal']['steps']} steps, {r['heal']['tokens']:,} tokens)")
