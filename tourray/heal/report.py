"""The heal study's report: reports/heal_<name>.md (before/after table, heal curves, generations),
heal_<name>.json (everything) and heal_<name>_ppl_vs_params.png."""

from __future__ import annotations

import json
from pathlib import Path

from tourray.plots import _plt, _save
from tourray.prune.report import _f, _row

CATEGORIES = ("seen_cities", "unseen_similar", "unseen_different", "edge_cases")


def _cells(j: dict) -> list[str]:
    a = _row(j, "ALL")
    return ([_f(_row(j, c).get("ppl_ratio")) for c in CATEGORIES]
            + [_f(a.get("factual_max_ratio")), _f(a.get("mean_kl"), 4), "PASS" if j["verdict"]["passed"] else "FAIL"])


def table(summary: dict) -> list[str]:
    head = ("| variant | parameters | when | " + " | ".join(f"{c} ppl ratio" for c in CATEGORIES)
            + " | factual max ratio | KL to original (eval) | verdict | held-out KL to teacher | held-out same top |"
              " heal steps / tokens / s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in summary["variants"]:
        log = r["heal_log"]
        first = next((x for x in log if x["step"] == 0), {})
        best = next((x for x in log if x["step"] == r["heal"]["best_step"]), {})
        p = f"{100 * r['parameter_fraction']:.1f}%"
        lines.append(f"| {r['variant']} | {p} | before | " + " | ".join(_cells(r["before"]))
                     + f" | {_f(first.get('val_kl'), 4)} | {_f(first.get('val_top1'))} | |")
        h = r["heal"]
        lines.append("| | | after | " + " | ".join(_cells(r["after"]))
                     + f" | {_f(best.get('val_kl'), 4)} | {_f(best.get('val_top1'))} | "
                       f"{h['steps']} / {h['tokens']:,} / {h['seconds']:.0f} |")
    return lines


def plot(summary: dict, path: Path, seen: str) -> Path:
    plt = _plt()
    rs = sorted(summary["variants"], key=lambda r: r["parameter_fraction"])
    x = [100 * r["parameter_fraction"] for r in rs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(x, [_row(r["before"], seen).get("ppl_ratio") for r in rs], "o-", label="before heal")
    ax.plot(x, [_row(r["after"], seen).get("ppl_ratio") for r in rs], "s-", label="after heal")
    for xi, r in zip(x, rs):
        ax.annotate(r["variant"], (xi, _row(r["before"], seen).get("ppl_ratio")), fontsize=6, xytext=(4, 4),
                    textcoords="offset points")
    crit = 1 + summary["config"]["criteria"]["max_ppl_rise"]
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ys = [v for r in rs for v in (_row(r["before"], seen).get("ppl_ratio"), _row(r["after"], seen).get("ppl_ratio")) if v]
    ticks = [t for t in (1, 1.1, 1.2, 1.5, 2, 3, 4, 6, 10, 20, 50, 100, 1000) if min(ys + [crit]) * 0.9 <= t <= max(ys) * 1.1]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(min(x) - 3, max(x) + 8)
    return finish_ppl_plot(fig, ax, path, summary, f"heal study {summary['name']}: {summary['model'].rsplit('/', 1)[-1]}")


def finish_ppl_plot(fig, ax, path: Path, summary: dict, title: str) -> Path:
    """The verdict's limit, labels, grid, legend and title of a perplexity-ratio-against-parameters
    plot of a study or compress summary; saves it."""
    crit = 1 + summary["config"]["criteria"]["max_ppl_rise"]
    seen = summary["config"]["criteria"]["seen_category"]
    ax.axhline(crit, color="grey", ls="--", lw=0.8, label=f"verdict limit x{crit:g}")
    ax.set_xlabel("parameters kept (%)")
    ax.set_ylabel(f"{seen} perplexity ratio to the original")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def write_report(summary: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = summary["name"]
    seen = summary["config"]["criteria"]["seen_category"]
    png = plot(summary, folder / f"heal_{name}_ppl_vs_params.png", seen)
    dump(summary, folder / f"heal_{name}.json")
    hs = summary["config"]["heal"]
    lines = [f"# Heal study {name}", "",
             f"Model `{summary['model']}`; teacher distribution: run `{summary['teacher_run']}`; judged on "
             f"{summary['n_eval']} eval texts against run `{summary['base_run']}` (the original). Heal settings: "
             f"{hs['max_steps']} steps max, batch {hs['batch_size']} x {hs['workers']} worker(s), lr {hs['learning_rate']:g}, "
             f"alpha {hs['alpha']:g}, T {hs['temperature']:g}, LoRA rank {hs['lora_rank']} (0 = full), patience {hs['patience']}, "
             f"validation every {hs['eval_every']} steps on {100 * hs['val_fraction']:.0f}% of the teacher run's texts. "
             f"Whole study: {summary['seconds']:.0f} s.", "",
             "Perplexity ratios and KL to the original are from the eval captures (text tokens, `compare_runs.sql`); the "
             "held-out KL and same-top share are the heal's own validation on held-out training texts (over the stored "
             "top-K + rest partition), at step 0 (before) and at the best validation (after; the checkpoint written).", "",
             *table(summary), "", f"![perplexity ratio against parameters kept]({png.name})", ""]
    for r in summary["variants"]:
        curve = [x for x in r["heal_log"] if x.get("val_kl") is not None]
        lines.append(f"- {r['variant']}: held-out KL by step " + ", ".join(f"{x['step']}: {x['val_kl']:.4f}" for x in curve)
                     + (" (stopped early)" if r["heal"]["stopped_early"] else ""))
    lines.append("")
    if summary.get("generations"):
        from tourray.model.generate import side_by_side

        lines += [side_by_side(summary["generations"], "Greedy generations, before and after healing"), ""]
    path = folder / f"heal_{name}.md"
    path.write_text("\n".join(lines))
    return path


def dump(summary: dict, path: Path) -> Path:
    path.write_text(json.dumps(summary, indent=1, default=lambda o: o.isoformat() if hasattr(o, "isoformat") else str(o)))
    return path
