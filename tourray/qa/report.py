"""The QA report: reports/qa_<name>.md (table, findings, plots), qa_<name>.csv (one row per
(variant, metric)) and qa_<name>.json (everything)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from tourray.prune.evaluate import kl_note
from tourray.prune.report import _f, _row

#: Representative depths of the hidden-state columns (fractions of the original's blocks).
DEPTHS = (0.25, 0.5, 0.75, 1.0)
#: KL (nats/token) and cosine below which a variant counts as function-preserving.
PRESERVED_KL, PRESERVED_COS = 1e-4, 0.9999


def _depth_index(n_blocks: int, f: float) -> int:
    return min(n_blocks - 1, max(0, int(round(f * n_blocks)) - 1))


def _at(values: list[float], b: int) -> float:
    """The value at block b, or at the last block before it that has one (a removed block has none)."""
    return next((values[i] for i in range(b, -1, -1) if not math.isnan(values[i])), float("nan"))


def metrics(r: dict, seen: str) -> dict[str, float | None]:
    """The (metric -> value) of one variant, as the CSV holds them."""
    out: dict[str, float | None] = dict(parameters=r["parameters"], parameter_fraction=r["parameter_fraction"])
    for row in r["comparison"]:
        out[f"ppl_ratio_{row['category']}"] = row["ppl_ratio"]
    a = _row(r, "ALL")
    out |= dict(factual_mean_ratio=a.get("factual_mean_ratio"), factual_max_ratio=a.get("factual_max_ratio"),
                kl_original=a.get("mean_kl"), kl_original_inprocess=r["kl_original_inprocess"],
                max_logprob_diff=r["max_logprob_diff"],
                kl_teacher=r.get("kl_teacher"), tokens_per_s=r["tokens_per_s"], tokens_per_s_ratio=r["tokens_per_s_ratio"],
                verdict_pass=float(r["verdict"]["passed"]))
    for i, (c, m) in enumerate(zip(r["cos"], r["rms_ratio"])):
        out[f"cos_block_{i}"], out[f"rms_ratio_block_{i}"] = c, m
    return out


def saved_fraction(r: dict) -> float:
    return 1 - r["parameter_fraction"]


def _size_change(r: dict) -> str:
    """A fold or slice of a tied-head model unties the head: it GROWS; say so rather than "saves none"."""
    f = r["parameter_fraction"]
    if abs(f - 1) < 1e-9:
        return "same parameter count"
    return (f"{100 * (f - 1):.1f}% more parameters (a tied LM head is written untied)" if f > 1
            else f"{100 * (1 - f):.1f}% fewer parameters")


def findings(summary: dict) -> list[str]:
    """Which toggle bought what and which hurt, in sentences computed from the table."""
    seen = summary["config"]["criteria"]["seen_category"]
    res = [r for r in summary["variants"] if r["family"] != "base"]
    out = []
    for r in res:
        kl = _row(r, "ALL").get("mean_kl")
        if r["family"] == "fold":
            ok = kl is not None and kl < PRESERVED_KL and np.nanmin(r["cos"]) > PRESERVED_COS
            out.append(f"- **{r['variant']}** {'preserved the function' if ok else 'CHANGED the function'}: mean KL "
                       f"{kl:.2e} nats/token, max |log-prob difference| {r['max_logprob_diff']:.2e}, hidden-state cosine "
                       f">= {np.nanmin(r['cos']):.6f} at every block ({_size_change(r)}; a fold changes the basis).")
    shrunk = [r for r in res if r["family"] != "fold" and _row(r, seen).get("ppl_ratio")]
    if grown := [r for r in shrunk if saved_fraction(r) <= 0]:  # no cost per parameter saved to rank them by
        out.append("- Saves no parameters: " + "; ".join(f"{r['variant']} ({_size_change(r)})" for r in grown) + ".")
    lossy = sorted((r for r in shrunk if saved_fraction(r) > 0),
                   key=lambda r: math.log(_row(r, seen)["ppl_ratio"]) / saved_fraction(r))
    if lossy:
        out.append(f"- Cost per parameter saved (log {seen} perplexity ratio / fraction of parameters removed), best first: "
                   + "; ".join(f"{r['variant']} {math.log(_row(r, seen)['ppl_ratio']) / saved_fraction(r):.2f}"
                               for r in lossy) + ".")
        best = lossy[0]
        out.append(f"- Bought the most: **{best['variant']}** removed {100 * (1 - best['parameter_fraction']):.1f}% of the "
                   f"parameters for {seen} perplexity x{_row(best, seen)['ppl_ratio']:.3f}.")
    hurt = [r for r in res if not r["verdict"]["passed"]]
    if hurt:
        out.append("- Hurt (verdict FAIL): " + "; ".join(f"{r['variant']} ({r['verdict']['reason']})" for r in hurt) + ".")
    passed = [r for r in res if r["verdict"]["passed"] and r["family"] != "fold"]
    if passed:
        top = min(passed, key=lambda r: r["parameter_fraction"])
        out.append(f"- Smallest variant that passes: **{top['variant']}**, {100 * top['parameter_fraction']:.1f}% of the "
                   "parameters.")
    return out


def write_report(summary: dict, reports: Path) -> Path:
    reports.mkdir(parents=True, exist_ok=True)
    name, res = summary["name"], summary["variants"]
    seen = summary["config"]["criteria"]["seen_category"]
    (reports / f"qa_{name}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    with (reports / f"qa_{name}.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "family", "metric", "value"])
        for r in res:
            for k, v in metrics(r, seen).items():
                w.writerow([r["variant"], r["family"], k, "" if v is None else v])
    n_blocks = len(res[0]["cos"])
    cats = [c["category"] for c in res[0]["comparison"] if c["category"] != "ALL"]
    cols = sorted({_depth_index(n_blocks, f) for f in DEPTHS})
    plots = [ratio_plot(res, seen, reports / f"qa_{name}_ppl_vs_params.png"),
             cosine_plot(res, reports / f"qa_{name}_cosine.png")]
    teacher = any(r.get("kl_teacher") is not None for r in res)
    L = [f"# QA toggle report: `{name}`", "",
         f"Model `{summary['model']}` ({summary['original_parameters'] / 1e6:.2f}M parameters); evidence run `{summary['run']}`; "
         f"every variant captured on {summary['n_eval']} eval texts and compared with `{summary['base_run']}` (the original on "
         f"the same texts); hidden states, teacher KL and tokens/s from the first {summary['config']['hidden_texts']} texts in "
         f"one process. {len(res)} variants in {summary['seconds']:.0f} s.", "",
         "## What each toggle bought, and what hurt", "", *findings(summary), "",
         "## Every variant", "",
         "| variant | parameters | " + " | ".join(f"{c} ppl" for c in cats) + " | factual mean | factual max | "
         "KL orig" + (" | KL teacher" if teacher else "") + " | " + " | ".join(f"cos@{b}" for b in cols) +
         " | RMS ratio (min..max) | tokens/s (x orig) | verdict |",
         "|---|---:|" + "---:|" * (len(cats) + 3 + teacher + len(cols) + 2) + "---|"]
    for r in res:
        a = _row(r, "ALL")
        rms = [x for x in r["rms_ratio"] if not math.isnan(x)]
        L.append(f"| {r['variant']} | {r['parameters'] / 1e6:.2f}M ({100 * r['parameter_fraction']:.1f}%) | "
                 + " | ".join(_f(_row(r, c).get("ppl_ratio")) for c in cats)
                 + f" | {_f(a.get('factual_mean_ratio'))} | {_f(a.get('factual_max_ratio'))} | {_kl(a.get('mean_kl'))}"
                 + (f" | {_kl(r.get('kl_teacher'))}" if teacher else "") + " | "
                 + " | ".join(_f(_at(r["cos"], b), 4) for b in cols)
                 + f" | {min(rms):.3f}..{max(rms):.3f} | {r['tokens_per_s']:.0f} ({r['tokens_per_s_ratio']:.2f}x) | "
                 + ("PASS" if r["verdict"]["passed"] else "FAIL: " + r["verdict"]["reason"]) + " |")
    L += ["", "Perplexity columns are ratios to the original; factual = tokens classed number or proper; KL orig: "
          f"{kl_note(summary['config'])} cos@b = mean cosine of the variant's residual "
          "stream (mapped back to the original's basis by Q^T) with the original's after block b; a depth-pruned variant "
          "is compared where it has a state that stands for block b (a kept block, or a patched block for the end of the "
          "span it replaces), else at the last such block before b. RMS ratio = ||variant|| / ||original|| over the same "
          "states.", ""]
    L += [f"![{p.stem}]({p.name})" for p in plots]
    out = reports / f"qa_{name}.md"
    out.write_text("\n".join(L) + "\n")
    return out


def _kl(x) -> str:
    return "–" if x is None else f"{x:.2e}" if abs(x) < 1e-2 else f"{x:.3f}"


def ratio_plot(res: list[dict], seen: str, path: Path) -> Path:
    """Seen-category perplexity ratio against parameters kept, one line per family."""
    from tourray.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    fams: dict[str, list] = {}
    for r in res:
        v = _row(r, seen).get("ppl_ratio")
        if v is not None:
            fams.setdefault(r["family"], []).append((r["parameter_fraction"], v, r["variant"]))
    for fam, pts in sorted(fams.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=fam)
        for x, y, n in pts:
            ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("parameters kept (fraction of the original)")
    ax.set_ylabel(f"{seen} perplexity ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("what each toggle costs", fontsize=9)
    return _save(fig, path)


def cosine_plot(res: list[dict], path: Path) -> Path:
    """Hidden-state cosine to the original per block, one line per variant."""
    from tourray.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for r in res:
        ax.plot(np.arange(len(r["cos"])), r["cos"], marker=".", ms=3, lw=1, label=r["variant"])
    ax.set_xlabel("block of the original")
    ax.set_ylabel("cosine to the original's residual stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("hidden-state agreement", fontsize=9)
    return _save(fig, path)
