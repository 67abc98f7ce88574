"""`tourray solve`: PCA, orthogonal Procrustes and least-squares maps between layers of a run, or
between two runs / two lakes over the same texts (a student and a teacher).

    check streams, flags and --out (nothing written yet)
      └─► solve_id = sha256(kind, streams, params, selection, run digest); a stored row is reused
      └─► fit side of the sample split: `run_stats` stores (or reuses) the layer / pair moments
            └─► read_moments -> tourray.stats.linalg (d x d float64 algebra on merged moments)
      └─► held-out side: one `layer_stream` pass -> cosine before / after, held-out moments ->
            map_diagnostics (relative residual)
      └─► one row of table `solves`; --out FILE.npy saves the matrix

Across runs or lakes (--to LAKE:RUN:LAYER) the streams are paired token by token with
`paired_stream` (same positions for one tokenizer, character-span averages otherwise) and the
moments are accumulated in that pass instead of being stored in `moments`.

Row-vector convention throughout (tourray.stats.linalg): a map takes x [d] to ``x @ W + b``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, create_model

from tourray.lake import tables as lk
from tourray.config import EMBED_LAYER, BaseConfig, Site, StorageOptions, compact_layers, storage_options_field
from tourray.errors import UserError
from tourray.stats.moments import CrossMoments, Moments
from tourray.stats.stream import Selection, complete_samples, layer_stream, paired_stream, resolve, source_digest
from tourray.stats.tasks import stored_layers

KINDS = ("pca", "procrustes", "lstsq")

DESCRIPTION = """\
Closed-form solves from the merged float64 moments of layers of one lake: PCA of a layer, and
orthogonal Procrustes or least-squares (ridge) maps from one layer (--from) to another (--to).

Convention: row vectors. A map takes a token vector x of --from ([d]) to y_hat = x @ W + b, a vector
of --to. pca returns P [d, k], the top-k principal directions as columns; scores are (x - mean) @ P.

The solve is fitted on the 'fit' side of a deterministic split of the run's samples (a sample is
held out when sha256(sample_id) falls in the first --heldout fraction); those moments land in, and
are reused from, table `moments`. Diagnostics are measured on the held-out side in one streaming
pass: mean cosine of x and y (before) and of x @ W + b and y (after), and the relative residual
||x W + b - y||^2 / ||y - mean y||^2. Each result is a row of table `solves`; asking again for the
same solve reuses it (--recompute to solve again).

procrustes: the orthogonal R minimising ||X R - Y||_F. --center (default): of the centred streams,
  with b = mean_y - mean_x @ W; --no-center: about zero, b = 0.
  --whiten: each side is whitened by (C + ridge I)^(-1/2), C its covariance (about the mean with
  --center, about zero without); R is solved in whitened coordinates and W = C_x^(-1/2) R C_y^(1/2)
  maps original coordinates. --ridge LAMBDA: an ABSOLUTE constant added to the covariances'
  eigenvalues before whitening (units of variance, not scaled by the token count); only with
  --whiten. --k K: solve in the shared top-K PCA space of both sides, W = P_x R P_y^T.
lstsq: W = (C_xx + ridge I)^(-1) C_xy, b = mean_y - mean_x @ W, i.e. the W minimising
  mean ||x W + b - y||^2 + ridge ||W||_F^2 (intercept unpenalised; ridge in units of x's variance,
  independent of the token count). --no-center: no intercept (b = 0, moments about zero).
pca: eigenvectors of --from's covariance, k (default: all) kept; the full spectrum is reported.
  rel_residual is the held-out reconstruction error of the k-dim projection."""


class SplitSelection(BaseConfig):
    """The token selection of a fitted solve judged on held-out samples: `tourray solve` and
    `tourray transport` (which runs one such solve per layer pair) share these fields."""

    heldout: float = Field(0.1, gt=0, lt=1, description="Fraction of samples held out (by sha256 of the sample id) for the diagnostics; the solve is fitted on the rest.")
    where: str | None = Field(None, description="SQL predicate over samples/tokens columns selecting tokens, e.g. \"category = 'seen_cities'\".")
    weight: Literal["none", "entropy"] = Field("none", description="Token weights: none, or entropy (high-entropy tokens weigh more).")
    text_only: bool = Field(True, description="Only text tokens (not system prompt or chat template).")

    def selection(self, split: str) -> Selection:
        return Selection(where=self.where, weight=self.weight, text_only=self.text_only, split=split,
                         heldout=self.heldout)


# `from` and `to` are Python keywords, so these two fields are declared through create_model: the
# flags add_config_flags generates are then exactly --from / --to, and YAML keys `from:` / `to:`.
_Streams = create_model(
    "_Streams", __base__=SplitSelection,
    **{"from": (str, Field(description="Stream x: RUN:LAYER[:SITE]; LAYER a block index or 'embed', SITE resid_post "
                                       "(default) or resid_mid.")),
       "to": (str | None, Field(None, description="Stream y for procrustes / lstsq: [LAKE:]RUN:LAYER[:SITE]; another "
                                                  "run or lake must hold the same texts (tokens are paired by position, "
                                                  "or by character span when the tokenizers differ); not for pca."))})


class SolveConfig(_Streams):
    """What `tourray solve` computes (the kind, pca | procrustes | lstsq, is its positional argument).
    Every field is also a flag."""

    lake: str = Field("lake", description="Lake root: a local folder or a Lance URI.")
    storage_options: StorageOptions = storage_options_field()
    k: int | None = Field(None, gt=0, description="pca: components kept (default all); procrustes: solve in the shared top-K PCA space (W = P_x R P_y^T).")
    whiten: bool = Field(False, description="procrustes: whiten each side by (C + ridge I)^(-1/2) before solving the rotation.")
    ridge: float = Field(0.0, ge=0, description="procrustes with --whiten: absolute constant added to the covariances' eigenvalues; lstsq: ridge penalty ridge*||W||_F^2 (units of x's variance).")
    center: bool = Field(True, description="Centre the streams (procrustes) / fit an intercept (lstsq); b = 0 without.")
    out: str | None = Field(None, description="Also save the matrix (W [d_x, d_y]; pca: the components [d, k]) to this .npy file.")
    recompute: bool = Field(False, description="Solve again even when table solves already holds this solve.")
    batch_rows: int = Field(4096, gt=0, description="Token rows per batch read from the lake.")
    address: str | None = Field(None, description="Ray cluster address for the statistics pass; default RAY_ADDRESS, else an embedded local Ray.")

    @property
    def from_stream(self) -> str:
        return getattr(self, "from")

    @property
    def to_stream(self) -> str | None:
        return getattr(self, "to")

@dataclass(frozen=True)
class Stream:
    run: str
    layer: int
    site: str
    lake: str | None = None   # another lake's root (None: --lake)

    @property
    def layer_name(self) -> str:
        return "embed" if self.layer == EMBED_LAYER else str(self.layer)

    def __str__(self) -> str:
        return (f"{self.lake}:" if self.lake else "") + f"{self.run}:{self.layer_name}:{self.site}"


def parse_stream(spec: str, flag: str) -> Stream:
    """[LAKE:]RUN:LAYER[:SITE] -> Stream, read from the right (a LAKE URI may hold ':'); layer range and
    storage are checked against the run later."""
    sites = [s.value for s in Site]
    parts = spec.strip().split(":")
    site = parts.pop() if len(parts) >= 3 and parts[-1] in sites else Site.resid_post.value
    if len(parts) < 2 or not all(parts[-2:]):
        raise UserError(f"{flag} {spec!r}: use [LAKE:]RUN:LAYER[:SITE], e.g. demo:3, demo:embed, demo:3:resid_mid "
                        "or /lakes/teacher:t32:40")
    run, layer, lake = parts[-2], parts[-1].strip().lower(), ":".join(parts[:-2]) or None
    if layer == "embed":
        return Stream(run, EMBED_LAYER, site, lake)
    if not re.fullmatch(r"\d+", layer):
        if len(parts) > 2:  # RUN:LAYER:X read as LAKE:RUN:LAYER
            raise UserError(f"{flag} {spec!r}: {parts[-1]!r} is neither a layer (a block index or 'embed') nor a "
                            f"site ({', '.join(sites)})")
        raise UserError(f"{flag} {spec!r}: LAYER must be one block index or 'embed', not {parts[-1]!r}")
    return Stream(run, int(layer), site, lake)


@dataclass
class SolvePlan:
    kind: str
    cfg: SolveConfig
    lake: lk.Lake
    a: Stream
    b: Stream | None
    d: int
    d_b: int | None
    lake_b: lk.Lake | None   # the lake of b when b is paired by tokens (another run or lake); else None
    fit: Selection
    held: Selection
    fit_source: dict
    run_digest: str
    params: dict
    solve_id: str
    existing: dict | None = None
    notes: list[str] = field(default_factory=list)


def _check_stream(s: Stream, flag: str, lake: lk.Lake) -> dict:
    rows = lake.read("runs", filter=f"run = {lk.sql_quote(s.run)}").to_pylist()
    if not rows:
        known = ", ".join(sorted(lake.read("runs", ["run"]).column(0).to_pylist())) or "none"
        raise UserError(f"{flag}: no run {s.run!r} in {lake.root} (runs: {known})")
    row = rows[0]
    hooked, stored = sorted(row["layers"]), sorted(stored_layers(row))  # --store: hooked layers may feed inline stats only
    if not -1 <= s.layer < row["num_layers"]:
        raise UserError(f"{flag}: layer {s.layer_name} is out of range; run {s.run} has {row['num_layers']} decoder "
                        f"blocks (0-{row['num_layers'] - 1}) plus 'embed'")
    if s.layer in hooked and s.layer not in stored:
        raise UserError(f"{flag}: run {s.run}: layer {s.layer_name} was hooked but not stored (--store "
                        f"{compact_layers(stored)}): it has no vectors to solve from")
    if s.layer not in stored:
        raise UserError(f"{flag}: run {s.run} did not store layer {s.layer_name} (stored: {compact_layers(stored)})")
    if s.site not in row["sites"]:
        raise UserError(f"{flag}: run {s.run} captured {', '.join(row['sites'])}, not {s.site}")
    if s.site == Site.resid_mid.value and s.layer == EMBED_LAYER:
        raise UserError(f"{flag}: the embedding output has no resid_mid (it is not a block); use {s.run}:embed")
    return row


def plan_solve(kind: str, cfg: SolveConfig) -> SolvePlan:
    """Every check that can refuse the solve, before anything is read in bulk or written."""
    if kind not in KINDS:
        raise UserError(f"unknown solve {kind!r}; use one of {', '.join(KINDS)}")
    if cfg.out is not None:
        out = Path(cfg.out)
        if out.suffix != ".npy":
            raise UserError(f"--out {cfg.out}: must be a .npy file")
        if not out.parent.is_dir():
            raise UserError(f"--out {cfg.out}: folder {out.parent} does not exist")
    if kind == "pca":
        if cfg.to_stream is not None:
            raise UserError("--to: pca is of one stream (--from); a map between two streams is procrustes or lstsq")
        for bad, flag in ((cfg.whiten, "--whiten"), (cfg.ridge, "--ridge"), (not cfg.center, "--no-center")):
            if bad:
                raise UserError(f"{flag} does not apply to pca (always of the centred covariance)")
    else:
        if cfg.to_stream is None:
            raise UserError(f"--to: {kind} maps --from to another stream; give --to RUN:LAYER[:SITE]")
        if kind == "lstsq" and cfg.whiten:
            raise UserError("--whiten applies to procrustes only (lstsq's --ridge is its regulariser)")
        if kind == "lstsq" and cfg.k is not None:
            raise UserError("--k applies to pca and procrustes, not lstsq")
        if kind == "procrustes" and cfg.ridge and not cfg.whiten:
            raise UserError("--ridge regularises procrustes' whitening; pass --whiten too (or --ridge 0)")
    a = parse_stream(cfg.from_stream, "--from")
    b = parse_stream(cfg.to_stream, "--to") if cfg.to_stream is not None else None
    lake = lk.Lake(cfg.lake, cfg.storage_options)
    if not lake.exists("runs"):
        raise UserError(f"--lake: no tourray tables under {lake.root}")
    row = _check_stream(a, "--from", lake)
    d, d_b, lake_b = int(row["hidden_size"]), None, None
    if b is not None:
        other = lk.Lake(b.lake, cfg.storage_options) if b.lake else lake  # --to's lake: on the same store
        if b.lake and not other.exists("runs"):
            raise UserError(f"--to: no tourray tables under {other.root}")
        d_b = int(_check_stream(b, "--to", other)["hidden_size"])
        if other.root != lake.root or b.run != a.run:
            lake_b = other  # paired token by token
        elif b.site != a.site:
            raise UserError(f"--to: site {b.site} differs from --from's {a.site}; within one run both streams "
                            "must be of one site")
        elif b.layer == a.layer:
            raise UserError(f"--to: {b} is --from itself")
        if kind == "procrustes" and d_b != d and cfg.k is None:
            raise UserError(f"--k: {a} has width {d} and {b} width {d_b}; an orthogonal map needs one width: "
                            f"pass --k K <= {min(d, d_b)} to solve in both streams' top-K PCA spaces")
    if cfg.k is not None and cfg.k > min(d, d_b or d):
        raise UserError(f"--k {cfg.k} is larger than the width of {a if cfg.k > d else b} "
                        f"(d={d if cfg.k > d else d_b})")
    fit, held = cfg.selection("fit"), cfg.selection("heldout")
    mask = resolve(lake, a.run, fit)  # refuses a selection with no fit-side tokens
    run_digest = source_digest(complete_samples(lake, a.run))
    params = dict(k=cfg.k, whiten=cfg.whiten, ridge=float(cfg.ridge), center=cfg.center,
                  selection=json.loads(fit.key()), heldout=cfg.heldout)
    if lake_b is not None:  # the pair's identity includes the other run's content
        run_digest += ":" + source_digest(complete_samples(lake_b, b.run))
    ident = json.dumps(dict(kind=kind, from_stream=str(a), to_stream=str(b) if b else None, params=params,
                            selection=fit.key(), source=run_digest,
                            lake_b=lake_b.root if lake_b is not None else None), sort_keys=True)
    plan = SolvePlan(kind, cfg, lake, a, b, d, d_b, lake_b, fit, held, mask.source, run_digest, params,
                     hashlib.sha256(ident.encode()).hexdigest()[:16])
    if lake.exists("solves") and not cfg.recompute:
        plan.existing = read_solve(lake, plan.solve_id)
    return plan


def read_solve(lake: lk.Lake, solve_id: str) -> dict | None:
    """The stored `solves` row of `solve_id` (the newest, if solved again with --recompute), its
    matrix as a [rows, cols] float64 array (converted in Arrow, never as Python floats), or None."""
    t = lake.read("solves", filter=f"solve_id = {lk.sql_quote(solve_id)}")
    if t.num_rows == 0:
        return None
    t = t.slice(t.num_rows - 1)
    row = t.drop_columns(["matrix"]).to_pylist()[0]
    row["matrix"] = t.column("matrix").combine_chunks().flatten().to_numpy().reshape(row["rows"], row["cols"])
    return row


# -- fitting -----------------------------------------------------------------------------------
def _stats_config(plan: SolvePlan, recompute: bool):
    from tourray.stats.tasks import StatsConfig

    cfg, a, b = plan.cfg, plan.a, plan.b
    layers = [a] if b is None else sorted([a, b], key=lambda s: s.layer)
    return StatsConfig(lake=cfg.lake, storage_options=cfg.storage_options, run=a.run,
                       layers=",".join(s.layer_name for s in layers),
                       pairs="none" if b is None else f"{layers[0].layer_name}:{layers[1].layer_name}", sites=[a.site],
                       where=cfg.where, weight=cfg.weight, text_only=cfg.text_only, split="fit", heldout=cfg.heldout,
                       batch_rows=cfg.batch_rows, address=cfg.address, recompute=recompute)


def swap(x: CrossMoments, sq_b_w: float) -> CrossMoments:
    """CrossMoments of (b, a) from those of (a, b): means swapped, co-moment transposed; the pair
    scalars are symmetric except sum w ||a||^2, which becomes sum w ||b||^2 (`sq_b_w`)."""
    return CrossMoments(x.d_b, x.d_a, n=x.n, w=x.w, mean_a=x.mean_b, mean_b=x.mean_a,
                        m_ab=None if x.m_ab is None else np.ascontiguousarray(x.m_ab.T), cos_w=x.cos_w,
                        angle_w=x.angle_w, diff_w=x.diff_w, sq_a_w=sq_b_w, keep_matrix=x.keep_matrix)


def fit_moments(plan: SolvePlan, progress: bool = True):
    """Moments of a (and b, and the pair a -> b) on the fit side, computed into or reused from the lake."""
    from tourray.stats.tasks import read_moments, run_stats

    a, b = plan.a, plan.b
    if plan.lake_b is not None:
        m_a, m_b, x = paired_moments(plan, resolve(plan.lake, a.run, plan.fit))
        if m_a.w == 0:
            raise UserError(f"no token of {a} could be paired with {b} (no overlapping text spans)")
        return m_a, m_b, x
    key = dict(run=a.run, site=a.site, selection=plan.fit.key(), source=plan.fit_source["digest"])

    def read():
        m_a = read_moments(plan.lake, kind="layer", layer_a=a.layer, **key)
        if b is None:
            return m_a, None, None
        m_b = read_moments(plan.lake, kind="layer", layer_a=b.layer, **key)
        lo, hi = sorted((a.layer, b.layer))
        x = read_moments(plan.lake, kind="pair", layer_a=lo, layer_b=hi, **key)
        if x is not None and a.layer > b.layer:
            x = swap(x, m_a.sumsq if m_a is not None else float("nan"))
        return m_a, m_b, x

    run_stats(_stats_config(plan, recompute=False), progress=progress)
    got = read()
    if any(v is None for v in got[:1 if b is None else 3]):
        raise UserError(f"the lake holds no fit-side moments of {a}{' -> ' + str(b) if b else ''} after "
                        "computing them; run `tourray verify` on this lake")
    return got


def _solve(plan: SolvePlan, m_a, m_b, x):
    from tourray.stats import linalg as solve

    cfg = plan.cfg
    try:
        if plan.kind == "pca":
            return solve.pca(m_a, cfg.k)
        if plan.kind == "procrustes":
            return solve.procrustes(m_a, m_b, x, center=cfg.center, whiten=cfg.whiten, ridge=cfg.ridge, k=cfg.k)
        return solve.lstsq(m_a, m_b, x, ridge=cfg.ridge, fit_intercept=cfg.center)
    except ValueError as e:
        raise UserError(f"{plan.kind} {plan.a}{' -> ' + str(plan.b) if plan.b else ''}: {e}") from None


def paired_moments(plan: SolvePlan, mask, after=None):
    """Moments of a, b and (a, b) over a's selected tokens paired with b's (another run or lake);
    `after` (a solved map) also accumulates the pair (x @ W + b, y) for held-out cosines."""
    a, b = plan.a, plan.b
    m_a, m_b, x = Moments(plan.d), Moments(plan.d_b), CrossMoments(plan.d, plan.d_b)
    y = CrossMoments(plan.d_b, plan.d_b, keep_matrix=False) if after is not None else None
    for xa, xb, w in paired_stream((plan.lake, a.run, a.layer, a.site), (plan.lake_b, b.run, b.layer, b.site), mask):
        m_a.update(xa, w)
        m_b.update(xb, w)
        x.update(xa, xb, w)
        if y is not None:
            y.update(after.apply(xa), xb, w)
    return (m_a, m_b, x) if y is None else (m_a, m_b, x, y)


# -- held-out diagnostics ----------------------------------------------------------------------
def heldout_diagnostics(plan: SolvePlan, result, fit_mean: np.ndarray) -> dict:
    """One streaming pass over the held-out tokens: cosines, held-out moments, relative residual.

    Returns n_heldout (0 when the held-out side selects no tokens; then every other field is None)."""
    from tourray.stats.linalg import map_diagnostics

    out = dict(n_heldout=0, cos_before=None, cos_after=None, rel_residual=None, heldout_source=None)
    try:
        mask = resolve(plan.lake, plan.a.run, plan.held)
    except UserError:
        return out  # tiny corpora: no sample falls in the held-out fraction
    a, b, d = plan.a.layer, plan.b.layer if plan.b else None, plan.d
    m_a = Moments(d)
    if b is None:
        for chunk in layer_stream(plan.lake, plan.a.run, plan.a.site, [a], mask, plan.cfg.batch_rows):
            m_a.update(chunk.h[a], chunk.weights)
        out.update(n_heldout=m_a.n, heldout_source=mask.source)
        if m_a.w > 0:  # reconstruction from the k-dim projection about the fit mean
            p = result.components
            dm = m_a.mean - fit_mean
            s = m_a.m2 + m_a.w * np.outer(dm, dm)
            base = float(np.trace(m_a.m2))
            res = max(float(np.trace(s) - np.sum(p * (s @ p))), 0.0)
            out["rel_residual"] = res / base if base > 0 else None
        return out
    if plan.lake_b is not None:
        m_a, m_b, x, after = paired_moments(plan, mask, after=result)
    else:
        m_b, x, after = Moments(d), CrossMoments(d, d), CrossMoments(d, d, keep_matrix=False)
        for chunk in layer_stream(plan.lake, plan.a.run, plan.a.site, sorted({a, b}), mask, plan.cfg.batch_rows):
            xa, xb, w = chunk.h[a], chunk.h[b], chunk.weights
            m_a.update(xa, w)
            m_b.update(xb, w)
            x.update(xa, xb, w)
            after.update(result.apply(xa), xb, w)
    out.update(n_heldout=m_a.n, heldout_source=mask.source)
    if m_a.w > 0:
        diag = map_diagnostics(result, m_a, m_b, x)
        rr = diag["rel_residual"]
        same_width = plan.d == (plan.d_b or plan.d)  # a cosine of x and y needs one space
        out.update(cos_before=x.mean_cos if same_width else None, cos_after=after.mean_cos,
                   rel_residual=None if np.isnan(rr) else rr)
    return out


# -- the row -----------------------------------------------------------------------------------
def _nan_none(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def solves_table(row: dict) -> pa.Table:
    s = lk.schema("solves")
    flat = np.ascontiguousarray(row["matrix"], dtype=np.float64).reshape(-1)
    cols = {f.name: [row[f.name]] for f in s if f.name != "matrix"}
    cols["matrix"] = pa.LargeListArray.from_arrays(pa.array([0, len(flat)], pa.int64()), pa.array(flat, pa.float64()))
    return pa.table({f.name: cols[f.name] for f in s}, schema=s)


def run_solve(kind: str, cfg: SolveConfig, progress: bool = True) -> dict:
    """Plan, fit (or reuse), diagnose on held-out tokens, store one `solves` row, save --out."""
    from tourray.runtime import git_commit

    t0 = time.perf_counter()
    plan = plan_solve(kind, cfg)
    summary = dict(solve_id=plan.solve_id, kind=kind, lake=plan.lake.root, heldout=cfg.heldout, notes=plan.notes)
    if plan.existing is not None:
        row = dict(plan.existing)
        summary["reused"] = True
    else:
        m_a, m_b, x = fit_moments(plan, progress)
        result = _solve(plan, m_a, m_b, x)
        diag = heldout_diagnostics(plan, result, m_a.mean)
        if kind == "pca":
            matrix, bias, sv = result.components, None, result.eigenvalues
            p = result.components
            orth = float(np.abs(p.T @ p - np.eye(p.shape[1])).max())
        else:
            matrix, bias, sv, orth = result.matrix, result.bias.tolist(), result.singular_values, result.orth_error
        sources = dict(fit=plan.fit_source, heldout=diag["heldout_source"],
                       moments_version=plan.lake.dataset("moments").version if plan.lake.exists("moments") else None,
                       run_digest=plan.run_digest, lake_b=plan.lake_b.root if plan.lake_b is not None else None)
        row = dict(solve_id=plan.solve_id, kind=kind, from_stream=str(plan.a),
                   to_stream=str(plan.b) if plan.b else None, params=json.dumps(plan.params, sort_keys=True),
                   rows=int(matrix.shape[0]), cols=int(matrix.shape[1]), matrix=matrix, bias=bias,
                   singular_values=np.asarray(sv, np.float64).tolist(), n_fit=int(m_a.n),
                   n_heldout=int(diag["n_heldout"]), cos_before=_nan_none(diag["cos_before"]),
                   cos_after=_nan_none(diag["cos_after"]), rel_residual=_nan_none(diag["rel_residual"]),
                   orth_error=_nan_none(orth), sources=json.dumps(sources, sort_keys=True, default=str),
                   tourray_commit=git_commit(), created_at=dt.datetime.now(dt.timezone.utc))
        s = lk.schema("solves")
        plan.lake.ensure("solves", s)
        with plan.lake.lease("solve"):  # its data files exist before the commit: no repair may take them
            plan.lake.append("solves", solves_table(row), s)
        summary["reused"] = False
        summary["result"] = result
    summary.update(row)
    summary["matrix"] = np.asarray(row["matrix"], np.float64).reshape(row["rows"], row["cols"])
    summary["bias"] = None if row["bias"] is None else np.asarray(row["bias"], np.float64)
    summary["version"] = plan.lake.dataset("solves").version
    if cfg.out is not None:
        np.save(cfg.out, summary["matrix"])
        summary["out"] = str(Path(cfg.out).resolve())
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def report(s: dict) -> str:
    """The short text `tourray solve` prints."""
    f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    streams = s["from_stream"] + (f" -> {s['to_stream']}" if s["to_stream"] else "")
    what = "components P" if s["kind"] == "pca" else "W"
    lines = [f"{s['kind']} {streams}: {what} is {s['rows']} x {s['cols']} "
             f"({'(x - mean) @ P' if s['kind'] == 'pca' else 'row vectors, y ~ x @ W + b'})",
             f"  tokens: {s['n_fit']:,} fit, {s['n_heldout']:,} held out (--heldout {s['heldout']} of samples)"]
    if s["n_heldout"] == 0:
        lines.append("  held-out side selects no tokens (too few samples for this --heldout): diagnostics are null")
    elif s["kind"] == "pca":
        lines.append(f"  held-out relative reconstruction residual at k={s['cols']}: {f(s['rel_residual'])}")
    else:
        lines.append(f"  held-out cosine {f(s['cos_before'])} -> {f(s['cos_after'])}; "
                     f"relative residual {f(s['rel_residual'])}")
    sv = s["singular_values"][:5]
    orth = "n/a" if s["orth_error"] is None else f"{s['orth_error']:.2e}"
    lines.append(f"  orthogonality error max|{'P^T P' if s['kind'] == 'pca' else 'R^T R'} - I|: {orth}")
    lines.append(f"  top {'eigenvalues' if s['kind'] == 'pca' else 'singular values'}: "
                 + ", ".join(f"{v:.4g}" for v in sv))
    lines += [f"  note: {n}" for n in s.get("notes", [])]
    lines.append(f"  {'reused' if s['reused'] else 'stored'}: solves row {s['solve_id']} in {s['lake']} "
                 f"(table version {s['version']})" + (" — pass --recompute to solve again" if s["reused"] else ""))
    if s.get("out"):
        lines.append(f"  matrix saved to {s['out']}")
    return "\n".join(lines)
