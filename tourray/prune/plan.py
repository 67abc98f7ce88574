"""Depth-pruning plans: which decoder blocks to delete, decided from lake evidence (or blindly, as
the baselines every comparison needs), written as a JSON file that `tourray prune apply` reads.

Block l reads the residual stream x_(l-1) (layer l-1's resid_post; the embedding for l = 0) and
writes x_l. Each method is its paper's, on text tokens of the run's complete samples:

- block-influence (ShortGPT, Men et al. 2024): drop the N blocks of lowest 1 - mean cos(x_(l-1), x_l).
- angular (Gromov et al. 2024): drop the contiguous span l..l+N-1 whose input and output are closest,
  argmin_l arccos(cos(x_(l-1), x_(l+N-1)))/pi on each sample's last token (here: its last text token,
  since the prompt ends in chat-template tokens), averaged over samples.
- u-chop (the seeds): keep the first and the last block and chop the contiguous middle span of N
  blocks whose summed block influence is lowest.
- entropy-weighted: block influence with each position weighted by its next-token entropy (that of
  the distribution the model computes there), so positions where the guide is unsure weigh more.
- magnitude (the seeds' activation importance): drop the N blocks whose update ||x_l - x_(l-1)||,
  relative to ||x_(l-1)||, is smallest on average.
- variance (the seeds' activation importance): drop the N blocks that add the least variance,
  sum_c Var(x_l)_c / sum_c Var(x_(l-1))_c (from `layer_stats`).
- reverse (blind; 2411.15558 finds it often beats metrics): the N blocks just before the last one.
- alternating (blind; the seeds' baseline): every other block counting back from the second-to-last.
- random (blind): N blocks drawn with --seed.

No block is protected unless asked (`--protect 0,-1`); span methods only consider spans free of
protected blocks.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import Field, model_validator

from tourray.lake import tables as lk
from tourray.config import BaseConfig, StorageOptions, storage_options_field
from tourray.errors import UserError

EVIDENCE = ("block-influence", "angular", "u-chop", "entropy-weighted", "magnitude", "variance")
BLIND = ("reverse", "alternating", "random")
METHODS = EVIDENCE + BLIND
Method = Literal["block-influence", "angular", "u-chop", "entropy-weighted", "magnitude", "variance",
                 "reverse", "alternating", "random"]


class PlanConfig(BaseConfig):
    """`tourray prune plan`: every field is a flag."""

    lake: str = Field("lake", description="Lake root holding the evidence run.")
    storage_options: StorageOptions = storage_options_field()
    run: str = Field(description="Run of the model to prune (its stored resid_post vectors give the evidence).")
    method: Method = Field(description="How to choose blocks: " + ", ".join(METHODS) + ".")
    remove: int | None = Field(None, gt=0, description="Blocks to delete (or give --keep).")
    keep: int | None = Field(None, gt=0, description="Blocks to keep (or give --remove).")
    seed: int = Field(0, description="Seed of --method random.")
    protect: str | None = Field(None, description="Blocks never deleted, comma-separated; negative counts from the end (0,-1 = first and last).")
    out: str | None = Field(None, description="Write the plan JSON here (default: print it).")

    @model_validator(mode="after")
    def _one_count(self):
        if (self.remove is None) == (self.keep is None):
            raise ValueError("give exactly one of --remove N and --keep K")
        return self


@dataclass
class Evidence:
    """What the methods read about one run, and the table versions it came from."""

    run: dict
    num_layers: int
    blocks: dict[str, np.ndarray] = field(default_factory=dict)   # column -> [num_layers], nan where unknown
    angular: dict[int, np.ndarray] = field(default_factory=dict)  # span length -> [num_layers - n + 1] by start
    versions: dict[str, int] = field(default_factory=dict)


run_row = lk.run_row  # re-exported: plans, width and QA read the run's row through it


def read_evidence(lake: lk.Lake, row: dict, method: str, n: int | None = None) -> Evidence:
    """Load what `method` needs from the lake for the run of `row` (blind methods need only its depth)."""
    run = row["run"]
    ev = Evidence(row, row["num_layers"])
    ev.versions = {t: lake.dataset(t).version for t in ("runs", "samples") if lake.exists(t)}
    if method in BLIND:
        return ev
    if not lake.exists("token_layers") or not lake.read("token_layers", ["layer"], filter=f"run = {lk.sql_quote(run)}").num_rows:
        raise UserError(f"--method {method}: run {run} stored no vectors (no token_layers rows); capture it with "
                        "--store all (or at least every block's resid_post) to plan from evidence")
    ev.blocks = _block_table(lake, run, ev.num_layers)
    ev.versions |= {t: lake.dataset(t).version for t in ("token_layers", "block_sums", "tokens") if lake.exists(t)}
    if method == "variance":
        ev.blocks["variance_ratio"] = _variance_ratio(lake, run, ev.num_layers)
        ev.versions["layer_stats"] = lake.dataset("layer_stats").version
    if method == "angular":
        ev.angular[n] = _angular_last_token(lake, run, ev.num_layers, n)
        ev.versions["activations"] = lake.dataset("activations").version
    return ev


def _block_table(lake: lk.Lake, run: str, num_layers: int) -> dict[str, np.ndarray]:
    from tourray.lake.sql import connect, query_file, run_query

    t = run_query(connect(lake), query_file("block_evidence").read_text(), {"run": run}).to_arrow_table()
    out = {}
    for c in t.column_names[1:]:
        col = np.full(num_layers, np.nan)
        col[t.column("block").to_numpy()] = t.column(c).to_numpy(zero_copy_only=False).astype(float)
        out[c] = col
    missing = [l for l in range(num_layers) if np.isnan(out["block_influence"][l])]
    if missing:
        raise UserError(f"run {run}: no input/output cosine for block(s) {missing}: the evidence needs resid_post of "
                        "every block and of the embedding (capture --layers all)")
    return out


def _variance_ratio(lake: lk.Lake, run: str, num_layers: int) -> np.ndarray:
    from tourray.stats.stream import Selection

    key = Selection().key()
    t = lake.read("layer_stats", ["layer", "importance_variance", "created_at"],
                  filter=f"run = {lk.sql_quote(run)} AND site = 'resid_post' AND selection = {lk.sql_quote(key)}") \
        if lake.exists("layer_stats") else None
    var = {}
    for r in sorted(t.to_pylist() if t is not None else [], key=lambda r: r["created_at"]):
        var[r["layer"]] = r["importance_variance"]  # latest wins
    missing = [l for l in range(-1, num_layers) if l not in var]
    if missing:
        raise UserError(f"--method variance: run {run} has no layer statistics for layer(s) {missing}; run "
                        f"`tourray stats --lake {lake.root} --run {run}` (or capture with --stats moments)")
    return np.array([var[l] / var[l - 1] if var[l - 1] > 0 else np.inf for l in range(num_layers)])


def _angular_last_token(lake: lk.Lake, run: str, num_layers: int, n: int) -> np.ndarray:
    """Mean over samples of arccos(cos(x_(l-1), x_(l+n-1)))/pi at each sample's last text token,
    for every start block l (x_(-1) = the embedding output)."""
    samples = lake.read("samples", ["sample_id", "text_start", "text_end"], filter=f"run = {lk.sql_quote(run)}")
    last = {r["sample_id"]: r["text_end"] - 1 for r in samples.to_pylist() if r["text_end"] > r["text_start"]}
    if not last:
        raise UserError(f"--method angular: run {run} has no sample with text tokens")
    ids = sorted(last)
    vec: dict[tuple[str, int], np.ndarray] = {}
    for g in range(0, len(ids), 256):
        cond = " OR ".join(f"(sample_id = {lk.sql_quote(s)} AND pos = {last[s]})" for s in ids[g:g + 256])
        t = lake.read("activations", ["sample_id", "layer", "h"],
                      filter=f"run = {lk.sql_quote(run)} AND site = 'resid_post' AND ({cond})")
        h = lk.arrow_to_numpy(t.column("h"), np.float64)
        for sid, layer, x in zip(t.column("sample_id").to_pylist(), t.column("layer").to_pylist(), h):
            vec[sid, layer] = x
    for s in ids:
        if missing := [l for l in range(-1, num_layers) if (s, l) not in vec]:
            raise UserError(f"--method angular: run {run} stored no resid_post vectors of layer(s) {missing} for "
                            f"sample {s} (capture --layers all --store all)")
    x = np.stack([np.stack([vec[s, l] for l in range(-1, num_layers)]) for s in ids])  # [samples, L + 1, d]
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    # start block l: input x_(l-1) is index l, output x_(l+n-1) is index l + n
    cos = np.einsum("sld,sld->sl", x[:, : num_layers + 1 - n], x[:, n:])
    return (np.arccos(np.clip(cos, -1, 1)) / np.pi).mean(0)


# -- the methods: (evidence, n, allowed blocks, seed) -> (removed, score per block or per span start)
def _lowest(score: np.ndarray, n: int, allowed: list[int]) -> list[int]:
    order = sorted(allowed, key=lambda l: (score[l], l))
    return sorted(order[:n])


def _best_span(score_of_start: np.ndarray, n: int, allowed: list[int]) -> list[int]:
    ok = set(allowed)
    starts = [l for l in range(len(score_of_start)) if all(b in ok for b in range(l, l + n))]
    if not starts:
        raise UserError(f"no contiguous span of {n} blocks avoids the protected blocks")
    best = min(starts, key=lambda l: (score_of_start[l], l))
    return list(range(best, best + n))


def _u_chop(ev: Evidence, n: int, allowed: list[int], seed: int):
    bi, L = ev.blocks["block_influence"], ev.num_layers
    middle = [l for l in allowed if 0 < l < L - 1]
    if n > len(middle):
        raise UserError(f"--method u-chop keeps the first and last blocks: at most {len(middle)} can go")
    span = np.array([bi[l : l + n].sum() if l + n <= L else np.inf for l in range(L)])
    return _best_span(span, n, middle), span


def _alternating(ev: Evidence, n: int, allowed: list[int], seed: int):
    L = ev.num_layers
    order = [l for l in range(L - 2, -1, -2)] + [l for l in range(L - 1, -1, -2)]  # L-2, L-4, ..., then the rest
    pick = [l for l in order if l in set(allowed)][:n]
    return sorted(pick), None


def _reverse(ev: Evidence, n: int, allowed: list[int], seed: int):
    L = ev.num_layers
    pick = [l for l in range(L - 2, -1, -1) if l in set(allowed)][:n]
    if len(pick) < n:
        pick += [L - 1] if L - 1 in allowed else []
    return sorted(pick), None


def _random(ev: Evidence, n: int, allowed: list[int], seed: int):
    rng = np.random.default_rng(seed)
    return sorted(int(x) for x in rng.choice(sorted(allowed), size=n, replace=False)), None


CHOOSERS: dict[str, Callable] = {
    "block-influence": lambda ev, n, a, s: (_lowest(ev.blocks["block_influence"], n, a), ev.blocks["block_influence"]),
    "entropy-weighted": lambda ev, n, a, s: (_lowest(ev.blocks["entropy_weighted_influence"], n, a),
                                             ev.blocks["entropy_weighted_influence"]),
    "magnitude": lambda ev, n, a, s: (_lowest(ev.blocks["rel_update_norm"], n, a), ev.blocks["rel_update_norm"]),
    "variance": lambda ev, n, a, s: (_lowest(ev.blocks["variance_ratio"], n, a), ev.blocks["variance_ratio"]),
    "angular": lambda ev, n, a, s: (_best_span(ev.angular[n], n, a), ev.angular[n]),
    "u-chop": _u_chop,
    "reverse": _reverse,
    "alternating": _alternating,
    "random": _random,
}

SCORE_NAMES = {"block-influence": "block_influence (1 - mean cos), per block",
               "entropy-weighted": "entropy-weighted block influence, per block",
               "magnitude": "mean ||x_l - x_(l-1)|| / ||x_(l-1)||, per block",
               "variance": "sum Var(x_l) / sum Var(x_(l-1)), per block",
               "angular": "mean last-text-token angular distance between the span's input and output, per start block",
               "u-chop": "summed block influence of the span, per start block"}


def parse_protect(spec: str | None, num_layers: int) -> list[int]:
    out = set()
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        try:
            i = int(item)
        except ValueError:
            raise UserError(f"--protect: {item.strip()!r} is not a block index") from None
        if not -num_layers <= i < num_layers:
            raise UserError(f"--protect: block {i} is out of range for {num_layers} blocks")
        out.add(i % num_layers)
    return sorted(out)


def make_plan(cfg: PlanConfig) -> dict:
    """Choose the blocks and return the plan (method, removed, evidence per block, provenance)."""
    from tourray.runtime import git_commit

    lake = lk.Lake(cfg.lake, cfg.storage_options)
    row = run_row(lake, cfg.run)
    L = row["num_layers"]
    n = cfg.remove if cfg.remove is not None else L - cfg.keep
    if n <= 0 or n >= L:
        what = f"--remove {cfg.remove}" if cfg.remove is not None else f"--keep {cfg.keep}"
        raise UserError(f"{what}: the model has {L} blocks; a plan must remove at least 1 and keep at least 1")
    protect = parse_protect(cfg.protect, L)
    allowed = [l for l in range(L) if l not in protect]
    if n > len(allowed):
        raise UserError(f"--remove {n}: only {len(allowed)} blocks are not protected ({cfg.protect})")
    ev = read_evidence(lake, row, cfg.method, n)
    removed, score = CHOOSERS[cfg.method](ev, n, allowed, cfg.seed)
    if score is not None and any(not np.isfinite(score[b]) for b in removed):
        raise UserError(f"--method {cfg.method}: run {cfg.run} has no finite score for block(s) "
                        f"{[b for b in removed if not np.isfinite(score[b])]}; see the plan's evidence")
    evidence = {c: _finite(v) for c, v in ev.blocks.items()}
    if score is not None and cfg.method in ("angular", "u-chop"):
        evidence[f"{cfg.method}_by_start"] = _finite(score)
    return dict(
        method=cfg.method, removed=removed, kept=[l for l in range(L) if l not in removed], num_layers=L,
        remove=n, seed=cfg.seed if cfg.method == "random" else None, protect=protect,
        score=SCORE_NAMES.get(cfg.method), evidence=evidence,
        lake=lake.root, run=cfg.run, model=ev.run["model"], model_revision=ev.run["model_revision"],
        tokenizer_sha256=ev.run["tokenizer_sha256"], table_versions=ev.versions,
        tourray_commit=git_commit(), created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
    )


def _finite(v: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(v, float)]


def write_plan(plan: dict, out: str | Path) -> Path:
    p = Path(out)
    if p.is_dir():
        raise UserError(f"--out {out} is a folder; give the plan file's path (e.g. {p / 'plan.json'})")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(plan, indent=1) + "\n")
    return p


def read_plan(path: str | Path, num_layers: int | None = None) -> dict:
    """A plan file, checked: blocks in range, not all of them, no embedding (-1)."""
    p = Path(path)
    try:
        plan = json.loads(p.read_text())
    except OSError as e:
        raise UserError(f"--plan {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"--plan {path}: not JSON ({e})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("removed"), list) or not plan["removed"]:
        raise UserError(f"--plan {path}: no 'removed' list of block indices")
    L = num_layers if num_layers is not None else plan.get("num_layers")
    removed = plan["removed"]
    if not all(isinstance(b, int) for b in removed):
        raise UserError(f"--plan {path}: 'removed' must hold block indices (integers), got {removed}")
    if -1 in removed:
        raise UserError(f"--plan {path}: removes block -1, the embedding, which is not a decoder block")
    from tourray.surgery.blocks import check_removed

    try:
        plan["removed"] = check_removed(removed, L)
    except UserError as e:
        raise UserError(f"--plan {path}: {e}") from None
    return plan


def spans(removed: list[int]) -> list[tuple[int, int]]:
    """Maximal contiguous runs [first, last] of removed blocks."""
    out: list[list[int]] = []
    for b in sorted(removed):
        if out and b == out[-1][1] + 1:
            out[-1][1] = b
        else:
            out.append([b, b])
    return [tuple(s) for s in out]
