"""`tourray qa --config qa.yaml`: the toggle report (seeds 16.2). One model, a matrix of variants, each
built as a standard checkpoint and judged the same way, so that the table says which toggle bought
what and which hurt.

    base ─ +permutations ─ +rotation          (function-preserving folds: KL must stay ~0)
         ─ +slicing at K                      (prune width --hidden K: lossy)
         ─ +width pruning                     (prune width --keep-neurons/--keep-heads)
         ─ +depth pruning, with / without the linear patch (prune plan + apply)
         ─ combined: depth (+patch) then width, sized to a target parameter fraction

Per variant (one row per (variant, metric) in reports/qa_<name>.csv; a table, plots and findings in
reports/qa_<name>.md):
- from the eval capture (every eval text, tokens only, KL against the original; compare_runs.sql):
  perplexity ratio per category, factual-token surprisal ratios, mean KL(original || variant), verdict;
- from one in-process pass over the first `hidden_texts` eval texts (original and variant side by
  side, text tokens): KL to a teacher when given, hidden-state cosine and residual RMS ratio at each
  block, compared in the original's basis (a rotated / sliced variant's states are mapped back by Q^T;
  a depth-pruned variant's state at depth b is the output of its last kept block <= b), and forward
  tokens/s measured in the same pass as the original's;
- parameters (from the checkpoint's headers).
Variants whose eval run is complete in the lake, and of the checkpoint built now (same revision, texts
and settings), are not captured again (a QA run resumes); a stale one is captured again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tourray.lake import tables as lk
from tourray.config import CommaList, BaseConfig
from tourray.errors import UserError
from tourray.prune.evaluate import EvalSettings, capture_eval, is_complete, judge
from tourray.prune.plan import METHODS, Method

log = logging.getLogger("tourray")

class WidthPoint(BaseConfig):
    """One width-pruned variant."""

    keep_neurons: float = Field(1.0, gt=0, le=1, description="Fraction of FFN neurons kept per block.")
    keep_heads: float = Field(1.0, gt=0, le=1, description="Fraction of query heads kept per key/value group.")
    method: Literal["magnitude", "variance", "activation-norm"] = Field("activation-norm", description="Unit score.")


class DepthPoint(BaseConfig):
    """One depth-pruned variant."""

    method: Method = Field("block-influence", description="Plan method: " + ", ".join(METHODS) + ".")
    remove: int = Field(gt=0, description="Blocks removed.")
    patch: Literal["none", "lstsq"] = Field("none", description="Linear patch per removed span.")


class Combined(DepthPoint):
    """Depth pruning (with its patch), then width pruning of the kept blocks' FFNs (scored on the
    original's statistics) sized so that the checkpoint has `target` of the original's parameters."""

    target: float = Field(gt=0, lt=1, description="Parameters kept, as a fraction of the original's.")
    keep_heads: float = Field(1.0, gt=0, le=1, description="Fraction of query heads kept per group.")


class QAConfig(EvalSettings):
    """`tourray qa`: variant matrix and eval settings (YAML; plain fields are also flags)."""

    name: str = Field("qa", description="Report name: reports/qa_<name>.md; runs are <run>.qa-<name>.<variant>.")
    model: str = Field(description="The original checkpoint folder (safetensors).")
    run: str = Field(description="Evidence run of the original: stored resid_post (slicing, plans) and resid_mid (patches).")
    width_run: str | None = Field(None, description="Run with inline --stats units or moments (unit scores); default: --run.")
    teacher: str | None = Field(None, description="Teacher checkpoint with the same tokenizer: KL(teacher || variant) too.")
    base_run: str | None = Field(None, description="An existing capture of the original on the same eval texts to compare with (e.g. a sweep's <run>.original); default: <run>.qa-<name>.base, captured once.")
    permutations: bool = Field(True, description="A variant with random FFN-neuron and head permutations folded in.")
    rotation: bool = Field(True, description="A variant with a random orthogonal residual rotation folded in (and the permutations).")
    slice_widths: CommaList[int] = Field(default_factory=list, description="Residual widths of sliced variants.")
    width: list[WidthPoint] = Field(default_factory=list, description="Width-pruned variants.")
    depth: list[DepthPoint] = Field(default_factory=list, description="Depth-pruned variants.")
    combined: list[Combined] = Field(default_factory=list, description="Combined compressions to a parameter target.")
    seed: int = Field(0, description="Seed of the random permutations and rotation.")
    hidden_texts: int = Field(4, gt=0, description="Eval texts of the in-process pass (hidden-state cosine, RMS ratio, teacher KL, tokens/s).")
    workdir: str = Field(".cache/qa", description="Where variant checkpoints are written.")
    keep_checkpoints: bool = Field(False, description="Keep each variant's checkpoint.")
    reports: str = Field("reports", description="Folder of the report, its plots, CSV and JSON.")


@dataclass
class Variant:
    name: str
    family: str          # base, fold, slice, width, depth, combined
    params: dict = field(default_factory=dict)


def variants(cfg: QAConfig) -> list[Variant]:
    out = [Variant("base", "base")]
    if cfg.permutations:
        out.append(Variant("permuted", "fold", dict(rotation=False)))
    if cfg.rotation:
        out.append(Variant("rotated", "fold", dict(rotation=True)))
    out += [Variant(f"slice-{k}", "slice", dict(hidden=k)) for k in cfg.slice_widths]
    for w in cfg.width:
        out.append(Variant(f"width-n{w.keep_neurons:g}-h{w.keep_heads:g}" + ("" if w.method == "activation-norm" else f"-{w.method}"),
                           "width", w.model_dump()))
    for d in cfg.depth:
        out.append(Variant(f"depth-{d.method}-r{d.remove}" + ("" if d.patch == "none" else f"-{d.patch}"), "depth", d.model_dump()))
    for c in cfg.combined:
        out.append(Variant(f"combined-{c.target:g}-{c.method}-r{c.remove}" + ("" if c.patch == "none" else f"-{c.patch}")
                           + ("" if c.keep_heads >= 1 else f"-h{c.keep_heads:g}"), "combined", c.model_dump()))
    return out


# -- building a variant -------------------------------------------------------------------------------
def _random_folds(lay, seed: int, rotation: bool):
    from tourray.surgery.fold import Surgery

    rng = np.random.default_rng(seed)
    s = Surgery(residual=np.linalg.qr(rng.standard_normal((lay.hidden, lay.hidden)))[0] if rotation else None)
    for i in range(lay.layers):
        s.neurons[i] = rng.permutation(lay.ffn)
        s.heads[i] = np.concatenate([g * lay.group + rng.permutation(lay.group) for g in rng.permutation(lay.kv_heads)])
    return s


def build(cfg: QAConfig, v: Variant, lay, out: Path) -> dict:
    """Write variant `v`'s checkpoint to `out`; its basis (Q, or None) and kept blocks."""
    from tourray.surgery.fold import apply_surgery, parameters
    from tourray.prune.width import WidthConfig, run_width

    kept = list(range(lay.layers))
    if v.family == "fold":
        s = _random_folds(lay, cfg.seed, v.params["rotation"])
        apply_surgery(cfg.model, out, s, dict(kind="qa fold", seed=cfg.seed))
        return dict(basis=s.residual, kept=kept)
    if v.family == "slice":
        r = run_width(WidthConfig(model=cfg.model, lake=cfg.lake, storage_options=cfg.storage_options, run=cfg.run,
                                  hidden=v.params["hidden"], out=str(out)), progress=False)
        return dict(basis=r["residual"], kept=kept)
    if v.family == "width":
        run_width(WidthConfig(model=cfg.model, lake=cfg.lake, storage_options=cfg.storage_options,
                              run=cfg.width_run or cfg.run, out=str(out),
                              **{k: v.params[k] for k in ("keep_neurons", "keep_heads", "method")}), progress=False)
        return dict(basis=None, kept=kept)
    plan = _depth(cfg, v, out)
    kept = [i for i in range(lay.layers) if i not in plan["removed"]]
    if v.family == "combined":
        _narrow(cfg, v, lay, out, kept, parameters(cfg.model))
    return dict(basis=None, kept=kept)


def _depth(cfg: QAConfig, v: Variant, out: Path) -> dict:
    from tourray.prune.apply import ApplyConfig, run_apply
    from tourray.prune.plan import PlanConfig, make_plan, write_plan

    plan = make_plan(PlanConfig(lake=cfg.lake, storage_options=cfg.storage_options, run=cfg.run,
                                method=v.params["method"], remove=v.params["remove"]))
    path = write_plan(plan, out.parent / f"{out.name}.plan.json")
    run_apply(ApplyConfig(model=cfg.model, plan=str(path), out=str(out), patch=v.params["patch"],
                          storage_options=cfg.storage_options))
    return plan


def _narrow(cfg: QAConfig, v: Variant, lay, out: Path, kept: list[int], original_params: int) -> None:
    """Width-prune the depth-pruned checkpoint `out` in place to the parameter target: neuron scores of
    the original's kept blocks; FFN width chosen by counting (3 d weights per neuron, after the dropped
    query heads' 2 d head_dim each)."""
    from tourray.surgery.fold import apply_surgery, parameters, read_layout
    from tourray.prune.width import WidthConfig, choose, kept_count, scores, unit_moments

    deep = out.parent / f"{out.name}.depth"
    shutil.rmtree(deep, ignore_errors=True)  # a failed earlier build's, which would block the rename
    out.rename(deep)
    now, target = parameters(deep), v.params["target"] * original_params
    dlay = read_layout(deep)
    dropped_heads = 0 if v.params["keep_heads"] >= 1 else \
        dlay.heads - dlay.kv_heads * kept_count(v.params["keep_heads"], lay.group)
    head_cost = dlay.layers * dropped_heads * dlay.head_dim * 2 * dlay.hidden  # q_proj rows + o_proj columns
    per_neuron = dlay.layers * 3 * dlay.hidden
    keep = (dlay.ffn - max(0.0, now - head_cost - target) / per_neuron) / dlay.ffn
    if keep <= 0:
        raise UserError(f"combined {v.params['target']:g}: removing {v.params['remove']} blocks leaves {now / 1e6:.1f}M "
                        f"parameters; no FFN width reaches {target / 1e6:.1f}M: remove more blocks")
    wcfg = WidthConfig(model=cfg.model, lake=cfg.lake, storage_options=cfg.storage_options, run=cfg.width_run or cfg.run,
                       keep_neurons=min(1.0, keep), keep_heads=v.params["keep_heads"], out=str(out))
    mlp, heads = unit_moments(cfg.open_lake(), wcfg.run, lay.layers)
    ns, hs = scores(wcfg, lay, mlp, heads)
    s = choose(wcfg, dlay, ns[kept], hs[kept])
    apply_surgery(deep, out, s, dict(kind="qa combined", keep_neurons=keep, scores_from=wcfg.run, kept_blocks=kept))
    shutil.rmtree(deep)
    v.params["keep_neurons"] = round(keep, 4)


# -- the in-process pass ----------------------------------------------------------------------------
def eval_texts(lake: lk.Lake, base_run: str, n: int) -> list[tuple[list[int], int, int]]:
    """(token ids, text_start, text_end) of the first `n` samples of the original's eval run: the very
    ids the captures used."""
    q = lk.sql_quote(base_run)
    samples = sorted(lake.read("samples", ["sample_id", "text_start", "text_end"], filter=f"run = {q}").to_pylist(),
                     key=lambda r: r["sample_id"])[:n]
    toks = lake.read("tokens", ["sample_id", "pos", "token_id"], filter=f"run = {q}").to_pandas()
    out = []
    for s in samples:
        if s["text_end"] - max(s["text_start"], 1) < 1:
            continue  # no text token with a prediction (truncated away, or a one-token text at position 0)
        t = toks[toks.sample_id == s["sample_id"]].sort_values("pos")
        out.append((t.token_id.tolist(), s["text_start"], s["text_end"]))
    if not out:
        raise UserError(f"run {base_run}: none of its first {n} samples has a text token after position 0 "
                        "(all truncated?); raise --max-length")
    return out


class Side:
    """One model's forward over the texts: per-block pre-norm states on text tokens, log-probs, time."""

    def __init__(self, folder: str, texts, repeats: int = 3):
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        from tourray.model.identity import find_blocks

        _, blocks = find_blocks(model, model.config.get_text_config().num_hidden_layers)
        states: list = []
        hooks = [b.register_forward_hook(lambda m, a, o: states.append(o[0] if isinstance(o, tuple) else o))
                 for b in blocks]
        self.texts, self.states, self.logp = texts, [], []
        with torch.no_grad():
            model(torch.tensor([texts[0][0]]))  # warm-up: first-call allocations are not throughput
            for ids, a, e in texts:
                states.clear()
                a0 = max(a, 1)  # position 0 has no prediction: the log-probs start at the first predicted text token
                logits = model(torch.tensor([ids])).logits[0, a0 - 1:e - 1].double()
                self.logp.append(torch.log_softmax(logits, -1))
                self.states.append([s[0, a:e].double() for s in states])
            for h in hooks:
                h.remove()
            best = math.inf
            for _ in range(repeats):  # the fastest of a few passes: the least disturbed by other work
                t0 = time.perf_counter()
                for ids, _, _ in texts:
                    model(torch.tensor([ids]))
                best = min(best, time.perf_counter() - t0)
        self.tokens_per_s = sum(len(ids) for ids, _, _ in texts) / best
        del model


def state_depths(kept: list[int], n_blocks: int, patched: bool) -> list[int]:
    """The original's block whose output each variant block's output stands for: its own index, or,
    for a patched block followed by a removed span, the span's last block (the patch maps onto it)."""
    out = []
    for j, b in enumerate(kept):
        nxt = kept[j + 1] if j + 1 < len(kept) else n_blocks
        out.append(nxt - 1 if patched and nxt > b + 1 else b)
    return out


def agreement(orig: Side, var: Side, basis, kept: list[int], patched: bool, teacher: Side | None) -> dict:
    """Hidden-state cosine and RMS ratio per original block (nan where the variant has no state that
    stands for it), KL to the original and to the teacher, tokens/s."""
    import torch

    q = None if basis is None else torch.from_numpy(np.asarray(basis, np.float64))
    n_blocks = len(orig.states[0])
    cos, rms = [float("nan")] * n_blocks, [float("nan")] * n_blocks
    for j, depth in enumerate(state_depths(kept, n_blocks, patched)):
        c, num, den = [], 0.0, 0.0
        for so, sv in zip(orig.states, var.states):
            h = sv[j] if q is None else sv[j] @ q.T  # back to the original's basis
            c.append(torch.nn.functional.cosine_similarity(h, so[depth], dim=-1))
            num, den = num + float((h * h).sum()), den + float((so[depth] ** 2).sum())
        cos[depth], rms[depth] = float(torch.cat(c).mean()), math.sqrt(num / den)

    def kl(ref: Side) -> float:
        num = sum(float((p.exp() * (p - v)).sum()) for p, v in zip(ref.logp, var.logp))
        return num / sum(len(p) for p in ref.logp)

    diff = max(float((p - v).abs().max()) for p, v in zip(orig.logp, var.logp))
    return dict(cos=cos, rms_ratio=rms, kl_original_inprocess=kl(orig), kl_teacher=kl(teacher) if teacher else None,
                max_logprob_diff=diff, tokens_per_s=var.tokens_per_s)


# -- the job -----------------------------------------------------------------------------------------
def check(cfg: QAConfig):
    """Refuse what cannot run before anything is built."""
    from tourray.surgery.fold import read_layout
    from tourray.prune.plan import run_row

    lay = read_layout(cfg.model)
    lake = cfg.open_lake()
    if not lake.exists("runs"):
        raise UserError(f"--lake {cfg.lake}: no runs table (not a tourray lake?)")
    run_row(lake, cfg.run)
    if cfg.width or cfg.combined:
        from tourray.prune.width import unit_moments

        unit_moments(lake, cfg.width_run or cfg.run, lay.layers)
    bad = [k for k in cfg.slice_widths if not 0 < k < lay.hidden]
    if bad:
        raise UserError(f"slice_widths: {bad[0]} is not below the hidden size {lay.hidden}")
    if cfg.teacher:
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(cfg.teacher).get_vocab() != AutoTokenizer.from_pretrained(cfg.model).get_vocab():
            raise UserError(f"--teacher {cfg.teacher}: another vocabulary than --model {cfg.model}; logit KL needs one tokenizer")
    return lay


def eval_run_changes(cfg: QAConfig, folder: str, run: str, reference: str | None, base_run: str | None = None) -> list[str]:
    """How the lake's eval run `run` differs from the capture QA would make of `folder` now (model
    revision, eval texts, capture settings, library versions: the run's identity); [] when it matches
    or does not exist. A run of another checkpoint (another seed or model, a config changed while the
    workdir cache was lost, another machine on a shared lake) must not be judged as this one."""
    from tourray.capture.plan import plan_capture
    from tourray.lake.runs import run_changes, stored_texts

    lake = cfg.open_lake()
    old = lake.read("runs", filter=f"run = {lk.sql_quote(run)}").to_pylist() if lake.exists("runs") else []
    if not old:
        return []
    # planned under a name of no run (planning writes nothing), compared as `capture` compares a resume;
    # where the checkpoint lies (the workdir: another machine's, a temporary one) is no part of it, what
    # it holds (model_revision, tokenizer_sha256) is
    probe = cfg.capture_config(folder, run, reference, base_run)
    plan = plan_capture(probe.model_copy(update=dict(run=f"{run}.identity-probe")))
    now = dict(plan.run_row, run=run, model=old[0]["model"], tokenizer=old[0]["tokenizer"])
    return run_changes(old[0], now, stored_texts(lake, old[0]), {s.source: (s.sha256, s.category) for s in plan.samples})


#: Differences (see `run_changes`) that make a named base run another model's or other texts' capture.
WRONG_BASE = ("model_revision", "tokenizer_sha256", "system_prompt_sha256", "prompt format", "texts ")


def fresh_eval_run(cfg: QAConfig, folder: str, run: str, reference: str | None, owned: bool = True,
                   flag: str = "variant", base_run: str | None = None) -> None:
    """Make `run` a run of `folder`: a stale one QA owns is deleted (captured again by the caller);
    one the user named (base_run) is refused."""
    from tourray.lake.runs import drop_run

    changes = eval_run_changes(cfg, folder, run, reference, base_run)
    if not owned:  # another job's capture (a sweep's): only what makes the comparison wrong refuses it
        changes = [c for c in changes if c.startswith(WRONG_BASE)]
    if not changes:
        return
    if not owned:
        raise UserError(f"{flag}: run {run} is not a capture of {folder} on these eval texts with these settings:\n  "
                        + "\n  ".join(changes))
    log.warning("qa: run %s was captured from another checkpoint or with other settings (%s); capturing it again",
                run, "; ".join(changes))
    drop_run(cfg.open_lake(), run)


def original_eval(cfg: QAConfig, prefix: str, n_eval: int, progress: bool = True) -> str:
    """The original model's eval run every variant is judged against (--base-run, or <prefix>.base
    captured here once and reused while its identity holds)."""
    base_run = cfg.base_run or f"{prefix}.base"
    fresh_eval_run(cfg, cfg.model, base_run, None, owned=cfg.base_run is None, flag="base_run")
    if not is_complete(cfg.open_lake(), base_run, n_eval):
        capture_eval(cfg, cfg.model, base_run, None, progress=progress)
    return base_run


def run_identity(lake: lk.Lake, run: str) -> dict | None:
    """What names one capture of an eval run: its model revision and when its row was made (a run
    captured again, here or elsewhere, has a new one)."""
    rows = lake.read("runs", ["model_revision", "created_at"], filter=f"run = {lk.sql_quote(run)}").to_pylist()
    return dict(model_revision=rows[0]["model_revision"], created_at=rows[0]["created_at"].isoformat()) if rows else None


def evaluate(cfg: QAConfig, v: Variant, lay, work: Path, run: str, base_run: str, n_eval: int, orig: Side,
             teacher: Side | None, base_params: int) -> dict:
    """Build, capture, judge and compare one variant. A variant whose eval run is complete, and whose
    in-process measurements are cached in the workdir for the same settings and that very run, is only
    judged again (from the lake). Otherwise the checkpoint is built and the eval run is reused only if
    its identity (model revision, texts, settings) matches; a stale one is captured again."""
    from tourray.surgery.fold import parameters

    tv = time.perf_counter()
    # everything the cached in-process figures depend on (the eval texts are pinned by the run's identity)
    spec = dict(v.params) | dict(model=cfg.model, hidden_texts=cfg.hidden_texts, teacher=cfg.teacher) \
        | (dict(seed=cfg.seed) if v.family == "fold" else {})
    cache = work / f"{v.name}.json"
    lake = cfg.open_lake()
    cached = json.loads(cache.read_text()) if cache.is_file() else None
    if cached and cached.get("spec") == spec and cached.get("eval_run") == run_identity(lake, run) \
            and is_complete(lake, run, n_eval):
        return cached | judge(cfg, base_run, run)
    ckpt = work / v.name
    shutil.rmtree(ckpt, ignore_errors=True)
    built = dict(basis=None, kept=list(range(lay.layers))) if v.family == "base" else build(cfg, v, lay, ckpt)
    folder = cfg.model if v.family == "base" else str(ckpt)
    reference = None if v.family == "base" else cfg.model  # the base run is the original's own (run_qa)
    if v.family != "base":  # (the base run was checked and captured by run_qa)
        fresh_eval_run(cfg, folder, run, reference, base_run=base_run)
    if not is_complete(lake, run, n_eval):
        capture_eval(cfg, folder, run, reference, base_run=base_run)
    r = dict(variant=v.name, family=v.family, spec=spec, settings=v.params, parameters=parameters(folder),
             kept_blocks=built["kept"], run=run, eval_run=run_identity(lake, run))
    r["parameter_fraction"] = r["parameters"] / base_params
    patched = v.params.get("patch", "none") != "none"
    r |= agreement(orig, Side(folder, orig.texts), built["basis"], built["kept"], patched, teacher)
    r["tokens_per_s_ratio"] = r["tokens_per_s"] / orig.tokens_per_s
    r["seconds"] = round(time.perf_counter() - tv, 1)
    cache.write_text(json.dumps(r) + "\n")
    if not cfg.keep_checkpoints and v.family != "base":
        shutil.rmtree(ckpt, ignore_errors=True)
    return r | judge(cfg, base_run, run)


def run_qa(cfg: QAConfig, progress: bool = True) -> dict:
    from tqdm import tqdm

    from tourray.surgery.fold import parameters
    from tourray.prune.sweep import absolute_paths

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg, ("model", "teacher", "eval_samples", "system_prompt"))
    lay = check(cfg)
    lake = cfg.open_lake()
    n_eval = cfg.n_eval()
    prefix = f"{cfg.run}.qa-{cfg.name}"
    base_run = original_eval(cfg, prefix, n_eval, progress)
    texts = eval_texts(lake, base_run, cfg.hidden_texts)
    orig = Side(cfg.model, texts)
    teacher = Side(cfg.teacher, texts) if cfg.teacher else None
    work = Path(cfg.workdir) / cfg.name
    work.mkdir(parents=True, exist_ok=True)
    todo, results = variants(cfg), []
    base_params = parameters(cfg.model)
    bar = tqdm(todo, unit="variant", disable=not progress, dynamic_ncols=True)
    for v in bar:
        bar.set_postfix_str(v.name)
        run = base_run if v.family == "base" else f"{prefix}.{v.name}"
        results.append(evaluate(cfg, v, lay, work, run, base_run, n_eval, orig, teacher, base_params))
        log.info("qa %s: %s", v.name, summary_line(results[-1], cfg.criteria.seen_category))
    summary = dict(name=cfg.name, model=cfg.model, run=cfg.run, base_run=base_run, n_eval=n_eval, config=cfg.model_dump(mode="json"),
                   original_parameters=base_params, original_tokens_per_s=orig.tokens_per_s, variants=results,
                   seconds=round(time.perf_counter() - t0, 1))
    from tourray.qa.report import write_report

    summary["report"] = str(write_report(summary, Path(cfg.reports)))
    return summary


def summary_line(r: dict, seen: str) -> str:
    row = next((c for c in r["comparison"] if c["category"] == seen), {})
    pooled = r["comparison"][-1]
    return (f"{100 * r['parameter_fraction']:.1f}% parameters, {seen} ppl x{row.get('ppl_ratio', float('nan')):.3f}, "
            f"KL {pooled.get('mean_kl') or 0:.4f}, cos(last) {next(c for c in reversed(r['cos']) if not math.isnan(c)):.4f}, "
            f"{'PASS' if r['verdict']['passed'] else 'FAIL'}")


def add_parser(command) -> None:
    from tourray.config import add_config_flags

    p = command("qa", cmd_qa, "The toggle report: base, folds, slicing, width and depth pruning (with and without the "
                              "patch) and a combined compression, each judged alike; reports/qa_<name>.md.")
    p.epilog = ("examples:\n  tourray qa --config jobs/configs/qa.yaml\n"
                "  (variant lists: keys slice_widths, width, depth, combined of the YAML)")
    add_config_flags(p, QAConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


def cmd_qa(args) -> int:
    from tourray.config import config_from_args

    s = run_qa(config_from_args(QAConfig, args), progress=not args.no_progress)
    seen = s["config"]["criteria"]["seen_category"]
    for r in s["variants"]:
        print(f"{r['variant']:32} {summary_line(r, seen)}")
    print(f"report: {s['report']}")
    return 0
