"""`tourray compress --config compress.yaml`: the iterative recipe to a parameter target (prune a little,
heal, judge, repeat), each round's checkpoint, parameters, verdict and KL in one report.

    original ─► round 1: capture it on the evidence texts (fresh run) ─► the step (width / depth + patch /
                combined, built as `tourray qa` builds it, from that capture) ─► heal toward the teacher run
                ─► eval capture + verdict against the ORIGINAL's eval run
             ─► round 2 starts from round 1's healed checkpoint ... until the parameter target is reached,
                a round fails the verdict, the step cannot be applied, or --max-rounds
    result: the last round that passed (the original when none did); report reports/compress_<name>.md
            (+ .json, a plot of perplexity ratio against parameters kept)

Checkpoints live in <workdir>/<name>/r<k> (pruned) and r<k>.healed; lake runs are compress-<name>.r<k>
(evidence), .r<k>.heal (heal_log) and .r<k>.eval (judged). A re-run skips every round whose healed
checkpoint and eval run are complete (judged again from the lake), resumes a heal in progress, and
refuses a workdir made under another config (the target, max_rounds and reports may change).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

from tourray.errors import UserError
from tourray.heal.config import COMPRESS_RESUMABLE, CompressConfig, CompressStep, HealConfig
from tourray.lake import tables as lk
from tourray.prune.evaluate import capture_eval, is_complete

log = logging.getLogger("tourray")


# -- configs each round hands to the stages it reuses --------------------------------------------------
def qa_config(cfg: CompressConfig, model: str, run: str):
    """A QAConfig for `tourray.qa.job.build` (prune `model` from evidence run `run`) and for judging
    (`model` = the original: the eval captures' KL reference)."""
    from tourray.qa.job import QAConfig

    keep = ("lake", "storage_options", "eval_samples", "eval_include", "system_prompt", "batch_size", "max_length",
            "criteria", "workdir", "reports")
    return QAConfig(model=model, run=run, permutations=False, rotation=False,
                    **{k: getattr(cfg, k) for k in keep})


def evidence_config(cfg: CompressConfig, model: str, run: str, step: CompressStep):
    """The round's capture of the current model: stored resid_post (depth plans) and resid_mid (the
    lstsq patch) when the step removes blocks; inline `units` statistics when it narrows the FFNs."""
    from tourray.capture import CaptureConfig

    depth, width = step.remove > 0, step.family() != "depth"
    sites = ["resid_post"] + (["resid_mid"] if depth and step.patch != "none" else [])
    return CaptureConfig(model=model, samples=cfg.samples, include=cfg.include, lake=cfg.lake,
                         storage_options=cfg.storage_options, run=run, system_prompt=cfg.system_prompt,
                         store_dtype=cfg.store_dtype, layers="all", store="all" if depth else "none", sites=sites,
                         stats=["units"] if width else [], max_length=cfg.max_length, batch_size=cfg.batch_size,
                         group_size=cfg.group_size)


def variant(step: CompressStep, k: int):
    """The round's step as a `tourray qa` variant."""
    from tourray.qa.job import Variant

    fam = step.family()
    if fam == "width":
        params = dict(keep_neurons=step.keep_neurons, keep_heads=step.keep_heads, method=step.score)
    else:
        params = dict(method=step.method, remove=step.remove, patch=step.patch)
        if fam == "combined":
            params |= dict(target=step.target, keep_heads=step.keep_heads)
    return Variant(f"r{k}", fam, params)


def heal_config(cfg: CompressConfig, student: Path, out: Path, run: str | None) -> HealConfig:
    hcfg = HealConfig(**cfg.heal.model_dump(), student=str(student), teacher_run=f"{cfg.lake}:{cfg.teacher_run}",
                      out=str(out), run=run, lake=cfg.lake, storage_options=cfg.storage_options)
    hcfg.eval_samples = cfg.eval_samples
    return hcfg


# -- checks ---------------------------------------------------------------------------------------------
def check(cfg: CompressConfig, work: Path) -> None:
    """Every refusal before anything is written: the original, the lake and its runs, the teacher run
    (with --logits, no eval text, the original's tokenizer), the evidence texts, the steps against the
    original's depth, and a workdir made under another config."""
    from tourray.corpus import texts as corpus
    from tourray.heal.train import check as heal_check
    from tourray.surgery.fold import read_layout

    lay = read_layout(cfg.model)
    lake = cfg.open_lake()
    if not lake.exists("runs"):
        raise UserError(f"--lake {cfg.lake}: no runs table (not a tourray lake?)")
    # the heal's own refusals, with the original as the student (it has the students' tokenizer)
    heal_check(heal_config(cfg, Path(cfg.model), work / ".check-never-written", None))
    for flag, run in (("--first-run", cfg.first_run), ("--base-run", cfg.base_run)):
        if run:
            lk.run_row(lake, run, flag)
    if not Path(cfg.samples).exists():
        raise UserError(f"--samples {cfg.samples}: no such folder (the evidence texts each round is captured on)")
    if not corpus.load_samples(cfg.samples, include=cfg.include)[0]:
        raise UserError(f"--samples {cfg.samples}: no evidence text" + (f" matches --include {cfg.include}" if cfg.include else ""))
    if not Path(cfg.eval_samples).exists():
        raise UserError(f"--eval-samples {cfg.eval_samples}: no such folder")
    if cfg.n_eval() == 0:
        raise UserError(f"--eval-samples {cfg.eval_samples}: no eval text" + (" matches --eval-include" if cfg.eval_include else ""))
    for i, s in enumerate(cfg.steps):
        if s.remove >= lay.layers:
            raise UserError(f"--steps: step {i + 1} removes {s.remove} blocks; the original has {lay.layers}")
    saved = work / "config.json"
    if saved.is_file():
        old, new = json.loads(saved.read_text()), cfg.identity()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise UserError(f"--name {cfg.name}: {work} holds rounds made with another config ({', '.join(changed[:6])} "
                            f"changed; only {', '.join(COMPRESS_RESUMABLE)} may change); use a new --name or remove it")


# -- one round ------------------------------------------------------------------------------------------
def _heal_log(lake: lk.Lake, run: str) -> list[dict]:
    from tourray.heal.job import _heal_log as read

    return read(lake, run)


def run_round(cfg: CompressConfig, k: int, current: str, base_run: str, n_eval: int, base_params: int, work: Path,
              progress: bool) -> dict:
    """Capture `current`, prune it by the round's step, heal, judge. A round whose healed checkpoint and
    eval run are complete is only judged again; a built round resumes at its heal."""
    from tourray.capture import run_capture
    from tourray.heal.job import _judged
    from tourray.heal.train import run_heal
    from tourray.qa.job import build
    from tourray.surgery.fold import parameters, read_layout

    t0 = time.perf_counter()
    lake = cfg.open_lake()
    step = cfg.step(k)
    ckpt, healed, rec_path = work / f"r{k}", work / f"r{k}.healed", work / f"r{k}.json"
    evidence = cfg.first_run if k == 1 and cfg.first_run else f"{cfg.prefix}.r{k}"
    eval_run, heal_run = f"{cfg.prefix}.r{k}.eval", f"{cfg.prefix}.r{k}.heal"
    rec = json.loads(rec_path.read_text()) if rec_path.is_file() else None
    if rec is not None and rec.get("started_from") != current:
        rec = None  # made from another model (a round before it was redone): build it again
    healed_done = rec is not None and (healed / "tourray_heal.json").is_file()
    skipped = healed_done and is_complete(lake, eval_run, n_eval)
    if rec is None or not healed_done and not (ckpt / "config.json").is_file():
        shutil.rmtree(healed, ignore_errors=True)  # another model's heal, if any: never resumed
        tc = time.perf_counter()
        if evidence != cfg.first_run:
            log.info("compress round %d: capturing the current model on the evidence texts as run %s", k, evidence)
            run_capture(evidence_config(cfg, current, evidence, step), progress=progress)
        capture_s = time.perf_counter() - tc
        log.info("compress round %d: %s", k, step.label())
        shutil.rmtree(ckpt, ignore_errors=True)
        v = variant(step, k)
        tb = time.perf_counter()
        before = parameters(current)
        try:
            built = build(qa_config(cfg, current, evidence), v, read_layout(current), ckpt)
        except UserError as e:
            shutil.rmtree(ckpt, ignore_errors=True)
            return dict(round=k, step=step.model_dump(mode="json"), label=step.label(), started_from=current,
                        built=False, reason=f"the step cannot be applied to round {k - 1}'s model: {e}")
        rec = dict(round=k, step=step.model_dump(mode="json"), label=step.label(), family=v.family, settings=v.params,
                   started_from=current, parameters_before=before, evidence_run=evidence, pruned=str(ckpt),
                   kept_blocks=built["kept"], capture_seconds=round(capture_s, 1),
                   build_seconds=round(time.perf_counter() - tb, 1))
        rec_path.write_text(json.dumps(rec, indent=1) + "\n")
    rec = dict(rec, built=True, skipped=skipped)
    rec["parameters_pruned"] = parameters(ckpt) if (ckpt / "config.json").is_file() else None
    if rec["parameters_pruned"] is not None and rec["parameters_pruned"] >= rec["parameters_before"]:
        return dict(rec, built=False, reason=f"round {k}'s step removed no parameter from its model ({step.label()})")
    if healed_done:
        h = json.loads((healed / "tourray_heal.json").read_text())
    else:
        log.info("compress round %d: healing toward %s", k, cfg.teacher_run)
        h = run_heal(heal_config(cfg, ckpt, healed, heal_run), progress=progress)
    log.info("compress round %d: judging the healed model against the original", k)
    judged = _judged(qa_config(cfg, cfg.model, evidence), str(healed), eval_run, base_run, n_eval)
    rec |= dict(checkpoint=str(healed), parameters=parameters(healed), eval_run=eval_run, heal_run=heal_run,
                heal={key: h[key] for key in ("steps", "tokens", "best_step", "val_kl_before", "val_kl_best",
                                              "stopped_early", "seconds")},
                heal_log=_heal_log(lake, heal_run), **judged, seconds_this_run=round(time.perf_counter() - t0, 1))
    rec["parameter_fraction"] = rec["parameters"] / base_params
    return rec


# -- the job --------------------------------------------------------------------------------------------
def run_compress(cfg: CompressConfig, progress: bool = True) -> dict:
    """Rounds until the target, a failed verdict, a step that cannot be applied, or --max-rounds."""
    from tourray.prune.sweep import absolute_paths
    from tourray.qa.job import fresh_eval_run
    from tourray.surgery.fold import parameters

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg, ("model", "eval_samples", "system_prompt", "samples"))
    work = Path(cfg.workdir) / cfg.name
    check(cfg, work)
    lake = cfg.open_lake()
    n_eval = cfg.n_eval()
    judge_cfg = qa_config(cfg, cfg.model, cfg.first_run or cfg.teacher_run)
    base_run = cfg.base_run or f"{cfg.prefix}.base"
    fresh_eval_run(judge_cfg, cfg.model, base_run, None, owned=cfg.base_run is None, flag="--base-run")
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(cfg.identity(), indent=1) + "\n")
    if not is_complete(lake, base_run, n_eval):
        log.info("compress: capturing the original on the eval texts as run %s", base_run)
        capture_eval(judge_cfg, cfg.model, base_run, None, progress=progress)
    base_params = parameters(cfg.model)
    current, rounds, stop = cfg.model, [], None
    result = dict(round=0, checkpoint=cfg.model, parameters=base_params, parameter_fraction=1.0)
    k = 0
    while stop is None:
        k += 1
        fraction = parameters(current) / base_params
        if fraction <= cfg.target:
            stop = (f"target reached: round {k - 1} keeps {100 * fraction:.1f}% of the parameters "
                    f"(target {100 * cfg.target:g}%)")
            break
        if k > cfg.max_rounds:
            stop = f"--max-rounds {cfg.max_rounds} done, short of the target ({100 * fraction:.1f}% > {100 * cfg.target:g}%)"
            break
        r = run_round(cfg, k, current, base_run, n_eval, base_params, work, progress)
        rounds.append(r)
        if not r["built"]:
            stop = r["reason"]
        elif not r["verdict"]["passed"]:
            stop = f"round {k} failed the verdict ({r['verdict']['reason']})"
        else:
            current, result = r["checkpoint"], r
        if r["built"]:
            log.info("compress round %d: %s", k, summary_line(r, cfg.criteria.seen_category))
        report(cfg, base_run, n_eval, base_params, rounds, result, stop, t0)  # after each round
    summary = report(cfg, base_run, n_eval, base_params, rounds, result, stop, t0)
    return summary


def _ratio(r: dict, category: str) -> float:
    row = next((c for c in r.get("comparison", []) if c["category"] == category), {})
    return row.get("ppl_ratio", float("nan"))


def summary_line(r: dict, seen: str) -> str:
    if not r.get("built"):
        return f"round {r['round']} ({r['label']}): not made: {r['reason']}"
    kl = r["comparison"][-1].get("mean_kl") or 0
    h = r["heal"]
    return (f"round {r['round']} ({r['label']}): {100 * r['parameter_fraction']:.1f}% parameters, {seen} ppl "
            f"x{_ratio(r, seen):.3f}, KL {kl:.4f}, {'PASS' if r['verdict']['passed'] else 'FAIL'} "
            f"({h['steps']} heal steps, {h['tokens']:,} tokens{', resumed: nothing redone' if r['skipped'] else ''})")


# -- the report -----------------------------------------------------------------------------------------
CATEGORIES = ("seen_cities", "unseen_similar", "unseen_different", "edge_cases")


def report(cfg: CompressConfig, base_run: str, n_eval: int, base_params: int, rounds: list, result: dict,
           stop: str | None, t0: float) -> dict:
    summary = dict(name=cfg.name, model=cfg.model, teacher_run=cfg.teacher_run, base_run=base_run, n_eval=n_eval,
                   target=cfg.target, config=cfg.model_dump(mode="json"), original_parameters=base_params,
                   rounds=rounds, stopped=stop, result=dict(round=result["round"], checkpoint=result["checkpoint"],
                                                            parameters=result["parameters"],
                                                            parameter_fraction=result["parameter_fraction"]),
                   seconds=round(time.perf_counter() - t0, 1))
    summary["report"] = str(write_report(summary, Path(cfg.reports)))
    return summary


def _categories(summary: dict) -> list[str]:
    seen = summary["config"]["criteria"]["seen_category"]
    found = [c["category"] for r in summary["rounds"] for c in r.get("comparison", []) if c["category"] != "ALL"]
    cats = [c for c in CATEGORIES if c in found] + sorted({c for c in found if c not in CATEGORIES})
    return cats or [seen]


def table(summary: dict) -> list[str]:
    from tourray.prune.report import _f, _row

    cats = _categories(summary)
    head = ("| round | step | parameters | " + " | ".join(f"{c} ppl ratio" for c in cats)
            + " | factual max ratio | KL to original (eval) | held-out KL to teacher, before -> after heal | verdict |"
              " heal steps / tokens / s | checkpoint |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines.append(f"| 0 | original | {summary['original_parameters'] / 1e6:.2f}M (100%) | " + " | ".join("1.000" for _ in cats)
                 + f" | 1.000 | 0 | | | | `{summary['model']}` |")
    for r in summary["rounds"]:
        if not r.get("built"):
            lines.append(f"| {r['round']} | {r['label']} | not made: {r['reason']} |" + " |" * (head.count("|") - 4))
            continue
        a, h = _row(r, "ALL"), r["heal"]
        lines.append(f"| {r['round']} | {r['label']} | {r['parameters'] / 1e6:.2f}M ({100 * r['parameter_fraction']:.1f}%) | "
                     + " | ".join(_f(_row(r, c).get("ppl_ratio")) for c in cats)
                     + f" | {_f(a.get('factual_max_ratio'))} | {_f(a.get('mean_kl'), 4)} | {_f(h['val_kl_before'], 4)} -> "
                       f"{_f(h['val_kl_best'], 4)} | {'PASS' if r['verdict']['passed'] else 'FAIL'} | "
                       f"{h['steps']} / {h['tokens']:,} / {h['seconds']:.0f} | `{Path(r['checkpoint']).name}` |")
    return lines


def plot(summary: dict, path: Path, seen: str) -> Path | None:
    from tourray.heal.report import finish_ppl_plot
    from tourray.plots import _plt

    rs = [r for r in summary["rounds"] if r.get("built")]
    x = [100.0] + [100 * r["parameter_fraction"] for r in rs]
    y = [1.0] + [_ratio(r, seen) for r in rs]
    if not rs or not all(math.isfinite(v) and v > 0 for v in y):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(x, y, "o-", label="iterative (each round healed)")
    for xi, yi, r in zip(x[1:], y[1:], rs):
        ax.annotate(f"r{r['round']}" + ("" if r["verdict"]["passed"] else " FAIL"), (xi, yi), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.axvline(100 * summary["target"], color="tab:red", ls=":", lw=0.8, label=f"target {100 * summary['target']:g}%")
    ax.invert_xaxis()
    return finish_ppl_plot(fig, ax, path, summary, f"compress {summary['name']}: {summary['model'].rsplit('/', 1)[-1]}")


def write_report(summary: dict, folder: Path) -> Path:
    from tourray.heal.report import dump

    folder.mkdir(parents=True, exist_ok=True)
    name = summary["name"]
    seen = summary["config"]["criteria"]["seen_category"]
    png = plot(summary, folder / f"compress_{name}_ppl_vs_params.png", seen)
    dump(summary, folder / f"compress_{name}.json")
    c, hs, res = summary["config"], summary["config"]["heal"], summary["result"]
    steps = "; ".join(CompressStep.model_validate(s).label() for s in c["steps"])
    if res["round"] == 0:
        outcome = f"**No round passed: the result is the original** (`{res['checkpoint']}`)."
    else:
        outcome = (f"**Result: round {res['round']}**, `{res['checkpoint']}`, {res['parameters'] / 1e6:.2f}M parameters "
                   f"({100 * res['parameter_fraction']:.1f}% of the original): the last round that passed the verdict.")
    lines = [f"# Iterative compression {name}", "",
             f"Model `{summary['model']}`, target {100 * summary['target']:g}% of its "
             f"{summary['original_parameters'] / 1e6:.2f}M parameters. Steps per round: {steps} (the last repeats). "
             f"Each round captures the current model on the evidence texts (`{c['samples']}`), prunes it, heals it toward "
             f"the teacher run `{summary['teacher_run']}` ({hs['max_steps']} steps max, batch {hs['batch_size']} x "
             f"{hs['workers']} worker(s), lr {hs['learning_rate']:g}, alpha {hs['alpha']:g}, LoRA rank {hs['lora_rank']}) "
             f"and is judged on {summary['n_eval']} eval texts against run `{summary['base_run']}` (the original). "
             f"Whole run: {summary['seconds']:.0f} s.", "",
             f"Stopped: {summary['stopped'] or 'running'}.", "", outcome, "",
             "Perplexity ratios, factual max ratio and KL are the healed model's against the original (eval captures, "
             "text tokens, `compare_runs.sql`); the held-out KL is the heal's own validation on held-out training "
             "texts (top-K + rest), at its step 0 and at its best validation (the checkpoint written).", "",
             *table(summary), ""]
    if png is not None:
        lines += [f"![perplexity ratio against parameters kept]({png.name})", ""]
    for r in summary["rounds"]:
        if r.get("built"):
            curve = [x for x in r["heal_log"] if x.get("val_kl") is not None]
            fails = "" if r["verdict"]["passed"] else f" Verdict FAIL: {r['verdict']['reason']}."
            lines.append(f"- round {r['round']}: held-out KL by step "
                         + ", ".join(f"{x['step']}: {x['val_kl']:.4f}" for x in curve)
                         + (" (stopped early)" if r["heal"]["stopped_early"] else "") + "." + fails)
    lines.append("")
    path = folder / f"compress_{name}.md"
    path.write_text("\n".join(lines))
    return path
