"""The sweep's report: `reports/prune_<run>.md` with the method x removed x category table, the
evidence's prediction beside where the verdict first fails, which method won (also when a blind
baseline does), plots, one text's per-token surprisal difference, and generations side by side."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from tourray.lake import tables as lk
from tourray.prune.evaluate import kl_note
from tourray.prune.plan import BLIND

CATEGORIES = ("seen_cities", "unseen_similar", "unseen_different", "edge_cases")


def _row(r: dict, category: str) -> dict:
    return next((c for c in r["comparison"] if c["category"] == category), {})


def _f(x, nd=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _label(r: dict) -> str:
    return r["method"] + ("" if r["patch"] == "none" else f" +{r['patch']}")


def method_curves(results: list[dict], category: str) -> dict[str, dict[int, list[float]]]:
    """label -> removed -> perplexity ratios on `category` (several for random's seeds)."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        v = _row(r, category).get("ppl_ratio")
        if v is not None:
            out[_label(r)][r["remove"]].append(v)
    return out


def first_fail(results: list[dict]) -> dict[str, int | None]:
    """Per method label: the fewest blocks removed at which the verdict fails (any seed, for random)."""
    out: dict[str, int | None] = {}
    for r in sorted(results, key=lambda r: r["remove"]):
        lab = _label(r)
        out.setdefault(lab, None)
        if not r["verdict"]["passed"] and out[lab] is None:
            out[lab] = r["remove"]
    return out


def ranking(curves: dict[str, dict[int, list[float]]]) -> list[tuple[str, float, int]]:
    """Methods by geometric-mean perplexity ratio over the removed counts every method has."""
    common = set.intersection(*(set(c) for c in curves.values())) if curves else set()
    ranked = [(lab, float(np.exp(np.mean([np.log(np.mean(c[n])) for n in sorted(common)]))), len(common))
              for lab, c in curves.items()] if common else []
    return sorted(ranked, key=lambda t: t[1])


def summary_lines(summary: dict) -> list[str]:
    """A terminal table of the sweep: one line per variant."""
    seen = summary["config"]["criteria"]["seen_category"]
    out = [f"{'variant':28} {'removed':>14} {seen + ' ppl':>16} {'ALL ppl':>9} {'factual max':>11} {'KL':>7}  verdict"]
    for v in summary["variants"]:
        s, a = _row(v, seen), _row(v, "ALL")
        out.append(f"{v['variant']:28} {','.join(map(str, v['removed_blocks'])):>14} {_f(s.get('ppl_ratio')) + 'x':>16} "
                   f"{_f(a.get('ppl_ratio')) + 'x':>9} {_f(a.get('factual_max_ratio')) + 'x':>11} {_f(a.get('mean_kl')):>7}  "
                   f"{'PASS' if v['verdict']['passed'] else 'FAIL (' + v['verdict']['failed'][0] + ')'}")
    out.append(f"the evidence predicted the cliff at {summary['prediction']['predicted_cliff']} blocks removed")
    return out


def write_report(summary: dict, lake: str | lk.Lake, reports: Path) -> Path:
    """reports/prune_<run>.md (+ JSON, plots) of a sweep's summary; `lake` (a root, or a Lake opened with
    its storage options) is read for the token-by-token section."""
    reports.mkdir(parents=True, exist_ok=True)
    run, res = summary["run"], summary["variants"]
    seen = summary["config"]["criteria"]["seen_category"]
    (reports / f"prune_{run}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    curves = method_curves(res, seen)
    limit = 1 + summary["config"]["criteria"]["max_ppl_rise"]
    plot = ppl_ratio_plot(curves, reports / f"prune_{run}_ppl_ratio.png", f"{seen} perplexity ratio vs blocks removed ({run})",
                          limit)
    fails, ranked = first_fail(res), ranking(curves)
    pred = summary["prediction"]
    L: list[str] = [f"# Depth pruning sweep: run `{run}`", ""]
    L += [f"Model `{summary['model']}`; evidence run `{run}` (lake `{lake.root if isinstance(lake, lk.Lake) else lake}`); every variant captured on "
          f"`{summary['eval_samples']}` ({summary['n_eval']} texts) and compared with `{summary['base_run']}` "
          f"(the unpruned model on the same texts). {len(res)} variants in {summary['seconds']:.0f} s.", ""]
    L += ["## The evidence's prediction (made before any variant ran)", "",
          f"Rule: {pred['rule']}. The curve is {pred.get('shape', '?')}. **Predicted cliff: {pred['predicted_cliff']} "
          "blocks removed.**", "",
          "| removed | best angular span | its angular distance | least-influence blocks | their summed block influence |",
          "|---:|---|---:|---|---:|"]
    for n, c in sorted(pred["curve"].items(), key=lambda kv: int(kv[0])):
        sp = c["angular_span"]
        L.append(f"| {n} | {sp[0]}-{sp[-1]} | {c['angular_best']:.4f} | {', '.join(map(str, c['block_influence_blocks']))} | "
                 f"{c['block_influence_sum']:.4f} |")
    L += ["", "## Where the verdict first fails", "",
          f"PASS needs: {seen} perplexity ratio < {1 + summary['config']['criteria']['max_ppl_rise']:.2f}, factual-token "
          f"max surprisal < {summary['config']['criteria']['max_factual_ratio']:g}x the original's, no file above perplexity "
          f"{summary['config']['criteria']['max_file_ppl']:g}.", "",
          "| method | first FAIL at removed | vs predicted cliff |", "|---|---:|---|"]
    for lab, n in sorted(fails.items(), key=lambda kv: (kv[1] is None, -(kv[1] or 0))):
        rel = "never failed" if n is None else ("before" if n < pred["predicted_cliff"] else
                                                "at" if n == pred["predicted_cliff"] else "after")
        L.append(f"| {lab} | {n if n is not None else '–'} | {rel} |")
    if ranked:
        L += ["", "## Which method won", "",
              f"Geometric mean of the {seen} perplexity ratio over the {ranked[0][2]} removed counts all methods ran "
              "(random: mean over seeds), lower is better:", "", "| rank | method | mean ratio | kind |", "|---:|---|---:|---|"]
        for i, (lab, v, _) in enumerate(ranked, 1):
            L.append(f"| {i} | {lab} | {v:.3f} | {'blind' if lab.split()[0] in BLIND else 'evidence'} |")
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        blind_best = next((t for t in ranked if t[0].split()[0] in BLIND), None)
        ev_best = next((t for t in ranked if t[0].split()[0] not in BLIND), None)
        verdict_line = f"**{best[0]}** won (mean ratio {best[1]:.3f}" + (f", next {second[0]} {second[1]:.3f})" if second else ")")
        if blind_best and ev_best:
            if blind_best[1] < ev_best[1]:
                verdict_line += f"; a blind baseline, {blind_best[0]} ({blind_best[1]:.3f}), beat the best evidence method, {ev_best[0]} ({ev_best[1]:.3f})"
            else:
                verdict_line += f"; the best evidence method, {ev_best[0]}, beat the best blind baseline, {blind_best[0]} ({blind_best[1]:.3f}), by {blind_best[1] / ev_best[1]:.2f}x"
        L += ["", verdict_line + "."]
    L += ["", f"![perplexity ratio]({plot.name})", "", "## Every variant", "",
          "| variant | blocks removed | " + " | ".join(f"{c} ppl ratio" for c in CATEGORIES) +
          " | factual max ratio | factual mean ratio | mean KL | tokens/s | verdict |",
          "|---|---|" + "---:|" * (len(CATEGORIES) + 4) + "---|"]
    for r in res:
        a = _row(r, "ALL")
        cells = [_f(_row(r, c).get("ppl_ratio")) for c in CATEGORIES]
        v = r["verdict"]
        L.append(f"| {r['variant']} | {','.join(map(str, r['removed_blocks']))} | " + " | ".join(cells) +
                 f" | {_f(a.get('factual_max_ratio'))} | {_f(a.get('factual_mean_ratio'))} | {_f(a.get('mean_kl'))} | "
                 f"{_f(r.get('eval_tokens_per_s'), 0)} | {'PASS' if v['passed'] else 'FAIL: ' + v['reason']} |")
    L += ["", "Mean KL = " + kl_note(summary["config"])]
    rnd = [r for r in res if r["method"] == "random"]
    if rnd:
        L += ["", "### random, over seeds", "", "| removed | patch | seeds | ppl ratio mean | min | max |", "|---:|---|---:|---:|---:|---:|"]
        groups = defaultdict(list)
        for r in rnd:
            groups[r["remove"], r["patch"]].append(_row(r, seen).get("ppl_ratio"))
        for (n, p), vs in sorted(groups.items()):
            vs = [x for x in vs if x is not None]
            if not vs:
                continue
            L.append(f"| {n} | {p} | {len(vs)} | {np.mean(vs):.3f} | {min(vs):.3f} | {max(vs):.3f} |")
    diff = _diff_section(summary, lake, reports)
    L += diff
    L += _generations(summary)
    out = reports / f"prune_{run}.md"
    out.write_text("\n".join(L) + "\n")
    return out


def _diff_section(summary: dict, lake: str | lk.Lake, reports: Path) -> list[str]:
    """Per-token surprisal difference of one seen text for the variant with the lowest pooled
    perplexity ratio among those with generations (all variants when none has them)."""
    res = [r for r in summary["variants"] if r.get("generations")] or summary["variants"]
    if not res:
        return []
    r = min(res, key=lambda r: (_row(r, "ALL").get("ppl_ratio") or np.inf))
    lake_ = lake if isinstance(lake, lk.Lake) else lk.Lake(lake)
    seen = summary["config"]["criteria"]["seen_category"]
    s = lake_.read("samples", ["sample_id", "source"], filter=f"run = {lk.sql_quote(summary['base_run'])} AND category = {lk.sql_quote(seen)}")
    if not s.num_rows:
        return []
    sid, source = s.column("sample_id")[0].as_py(), s.column("source")[0].as_py()
    cols = ["pos", "token", "surprisal", "token_class"]
    q = f"sample_id = {lk.sql_quote(sid)} AND segment = 'text'"
    base = lake_.read("tokens", cols, filter=f"run = {lk.sql_quote(summary['base_run'])} AND {q}").sort_by("pos")
    var = lake_.read("tokens", cols, filter=f"run = {lk.sql_quote(r['run'])} AND {q}").sort_by("pos")
    png = surprisal_diff_plot(base.to_pydict(), var.to_pydict(), reports / f"prune_{summary['run']}_token_diff.png",
                              f"{source}: surprisal of {r['variant']} minus the original")
    return ["", "## One text, token by token", "",
            f"`{source}`, variant `{r['variant']}`: surprisal difference per text token; factual tokens "
            "(numbers, proper names) marked.", "", f"![token diff]({png.name})"]


def _generations(summary: dict) -> list[str]:
    gens = {r["variant"]: r["generations"] for r in summary["variants"] if r.get("generations")}
    if not gens or not summary.get("original", {}).get("generations"):
        return []
    from tourray.model.generate import side_by_side

    return ["", side_by_side({"original": summary["original"]["generations"], **gens},
                             title="Does it still talk? (greedy, chat template and system prompt)")]


# -- plots ----------------------------------------------------------------------------------------
def ppl_ratio_plot(curves: dict[str, dict[int, list[float]]], path: Path, title: str, limit: float = 1.2) -> Path:
    from tourray.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for lab, c in sorted(curves.items()):
        ns = sorted(c)
        mean = [float(np.mean(c[n])) for n in ns]
        style = "--" if "+" in lab else "-"
        line, = ax.plot(ns, mean, style, marker="o", ms=3, label=lab)
        if any(len(c[n]) > 1 for n in ns):  # random: the spread over seeds
            ax.fill_between(ns, [min(c[n]) for n in ns], [max(c[n]) for n in ns], color=line.get_color(), alpha=0.15)
    ax.axhline(limit, color="grey", lw=0.8, ls=":", label=f"verdict limit x{limit:g}")
    ax.set_yscale("log")
    ax.set_xlabel("blocks removed")
    ax.set_ylabel("perplexity ratio to the original")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def surprisal_diff_plot(base: dict, var: dict, path: Path, title: str) -> Path:
    from tourray.plots import _plt, _save

    plt = _plt()
    d = np.array(var["surprisal"], float) - np.array(base["surprisal"], float)
    fact = np.array([c in ("number", "proper") for c in base["token_class"]])
    x = np.arange(len(d))
    fig, ax = plt.subplots(figsize=(10, 3.4), dpi=120)
    ax.bar(x, d, width=1.0, color=np.where(fact, "#c44e52", "#8c8c8c"))
    ax.axhline(0, color="black", lw=0.6)
    top = np.sort(np.abs(d))[-min(8, len(d))] if len(d) else np.inf
    for i in np.flatnonzero(fact & (np.abs(d) >= top)):
        ax.annotate(base["token"][i].strip(), (i, d[i]), fontsize=6, ha="center", va="bottom" if d[i] > 0 else "top")
    ax.set_xlabel("text token (red: number or proper name)")
    ax.set_ylabel("Δ surprisal (nats)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
