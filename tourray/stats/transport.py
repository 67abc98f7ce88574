"""`tourray transport`: teacher-to-student basis transport (the rotation recipe).

For each stored layer of a student run, a Procrustes map from the student's residual stream to the
teacher's at the nearest relative depth, over the same texts in two lakes:

    plan (every check, nothing read in bulk or written)
      └─► one `tourray solve procrustes --from STUDENT:s --to TEACHER_LAKE:RUN:t` plan per layer pair
    fit side of the sample split, one `paired_stream` pass per pair (same positions for one
      tokenizer, character-span means of the teacher's tokens when the tokenizers differ)
      └─► each pair's own map (exactly the row `tourray solve` would store, same solve_id)
      └─► --tie all | stage:N: one map per group of pairs, from the pairs' pooled moments
    held-out side, one pass per pair: cosine before / after, relative residual, residual RMS ratio
      of the pair's own map, of its group's map and (when foldable) of the bare rotation
      └─► all rows of table `solves` in one append; --out DIR: .npy maps; --fold-into DIR: the
            student with the tied rotation folded in (`tourray.surgery.fold.apply_surgery`)

Pooling: a tied map minimises the sum over its pairs of ||X_l W + b_l - Y_l||^2, one W and a bias per
layer. Its moments are the SUM of the pairs' (per-layer centred, or about zero with --no-center)
second and cross moments. `CrossMoments.merge` is not used for this: it would centre all layers on
one pooled mean, so the differences between layer means (the residual norm grows with depth) would
enter the cross-covariance as if they were token variation, and a fold has no bias to absorb them.

Row-vector convention (tourray.stats.linalg): a map takes a student vector x [d_s] to x @ W + b [d_t].
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from tourray.lake import tables as lk
from tourray.config import EMBED_LAYER, Site, StorageOptions, compact_layers, storage_options_field
from tourray.errors import UserError
from tourray.stats.solves import SplitSelection
from tourray.stats.tasks import stored_layers

DESCRIPTION = """\
Teacher-to-student basis transport (the rotation recipe): for each stored layer of the student run
(--student-lake, --run), an orthogonal Procrustes map from the student's residual stream to the
teacher's (--teacher-lake, --teacher-run, default --run) over the same texts. Row vectors: a student
vector x maps to x @ W + b, a teacher vector. Tokens are paired by position when both runs used one
tokenizer, else each student token with the mean of the teacher tokens overlapping its characters.

Layer pairs: the embedding with the embedding; student block s with the stored teacher block t of
nearest relative depth, (t+1)/L_t closest to (s+1)/L_s (the shallower on a tie); --pairs S:T,...
gives them explicitly. Widths that differ need --k: each side is projected on its top-K principal
directions and the rotation solved between those K-dim spaces (W = P_s R P_t^T).
--whiten / --ridge: the recipe's whitened rotation, as in `tourray solve procrustes`.

--tie none (default): one map per pair. --tie all: one map for every pair (their moments pooled,
one bias per layer); --tie stage:N: one per N contiguous stages of the pairs. Fitted on the 'fit'
side of the sample split, judged on the held-out samples (--heldout): cosine before (same widths)
and after, relative residual ||xW+b-y||^2/||y-mean y||^2, residual RMS ratio rms(xW+b-y)/rms(y).
Every map is a row of table `solves` in the student lake (a pair's row is the one `tourray solve
procrustes` would store, same solve_id).

Why only a rotation tied over all layers is folded (--fold-into DIR): folding one orthogonal Q into
every block leaves the model's function unchanged and makes its residual stream h @ Q, aligned
with the teacher's basis. A different Q per layer (or per stage) would need Q_l^T Q_(l+1) on the
residual path between blocks, which no weight holds, so the function would change: per-layer and
per-stage maps stay analysis artefacts in the lake. Also refused for a fold: maps between widths or
to K < d dimensions (not orthogonal: a projection), and whitened maps (W = C_s^-1/2 R C_t^1/2 is not
orthogonal, and R acts on whitened coordinates, not the residual basis). The fold drops the biases
(a constant added to the residual stream would not pass an RMSNorm unchanged): --no-center fits the
rotation to the raw vectors, the fold's exact objective; with centring the table also shows the
held-out cosine of the bare rotation (the folded student's)."""

EPILOG = """examples:
  tourray transport --student-lake lake-qwen --teacher-lake lake --run smol --k 64
  tourray transport --student-lake lake-rot --teacher-lake lake --run smol --tie all --fold-into ckpt/aligned
  tourray transport --student-lake lake-s --teacher-lake lake-t --run r --pairs 0:4,1:9,2:14 --tie stage:2 --out maps/"""


class TransportConfig(SplitSelection):
    """What `tourray transport` computes. Every field is also a flag (the token selection, --where and
    --weight, is the student's)."""

    teacher_lake: str = Field(description="Lake root of the teacher run (the target basis).")
    student_lake: str = Field(description="Lake root of the student run; the maps are stored in its table solves.")
    # one set for both lakes, as `tourray solve` reads its --to lake with its own: each layer pair is a
    # SolveConfig whose student (--from) and teacher (--to) lakes share that config's storage_options
    storage_options: StorageOptions = storage_options_field()
    run: str = Field(description="Student run (and teacher run, unless --teacher-run).")
    teacher_run: str | None = Field(None, description="Teacher run, when it is named differently from --run.")
    site: Site = Field(Site.resid_post, description="Residual-stream site of both runs: resid_post or resid_mid.")
    pairs: str | None = Field(None, description="Layer pairs STUDENT:TEACHER,... (block indices or 'embed'); none = every stored student layer with the teacher layer of nearest relative depth.")
    tie: str = Field("none", pattern=r"^(none|all|stage:[1-9][0-9]*)$", description="none: a map per pair; all: one map for all pairs (the foldable one); stage:N: one per N contiguous stages.")
    k: int | None = Field(None, gt=0, description="Solve in both sides' top-K PCA spaces (needed when widths differ).")
    whiten: bool = Field(False, description="Whiten each side by (C + ridge I)^(-1/2) before solving the rotation (not foldable).")
    ridge: float = Field(0.0, ge=0, description="With --whiten: absolute constant added to the covariances' eigenvalues.")
    center: bool = Field(True, description="Centre each layer's streams (a bias per layer); --no-center: about zero, b = 0.")
    fold_into: str | None = Field(None, description="Write the student with the tied rotation folded in to this new (or empty) folder; needs --tie all, one width, no --k < d, no --whiten.")
    student_model: str | None = Field(None, description="Student checkpoint folder for --fold-into (default: the student run's model, when it is a local folder).")
    out: str | None = Field(None, description="Also save each map (W, b) as .npy files and a transport.json to this folder.")
    recompute: bool = Field(False, description="Store new rows even when table solves holds these solves already.")


@dataclasses.dataclass
class Pair:
    """One student layer -> teacher layer solve: its `tourray solve` plan and what was computed."""

    student: int
    teacher: int
    plan: object                         # tourray.stats.solves.SolvePlan
    group: int = 0
    n_fit: int = 0
    means: tuple | None = None           # fit-side (mean_s, mean_t): a tied map's bias for this pair
    own: object | None = None            # its own Map
    diag: dict = dataclasses.field(default_factory=dict)   # map name -> held-out diagnostics

    @property
    def name(self) -> str:
        f = lambda l: "embed" if l == EMBED_LAYER else str(l)  # noqa: E731
        return f"{f(self.student)}->{f(self.teacher)}"


@dataclasses.dataclass
class TransportPlan:
    cfg: TransportConfig
    lake: lk.Lake                        # the student's
    teacher: lk.Lake
    teacher_run: str
    d_s: int
    d_t: int
    same_tokenizer: bool
    pairs: list[Pair]
    groups: list[list[int]]              # indices into pairs; [] for --tie none
    transport_id: str
    student_model: Path | None = None    # --fold-into
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def foldable(self) -> bool:
        """Whether the tied map would be an orthogonal d x d rotation of the residual stream."""
        return (len(self.groups) == 1 and self.d_s == self.d_t and not self.cfg.whiten
                and self.cfg.k in (None, self.d_s))


# -- layer pairs ----------------------------------------------------------------------------------
def _layer(text: str, flag: str) -> int:
    t = text.strip().lower()
    if t == "embed":
        return EMBED_LAYER
    if not re.fullmatch(r"\d+", t):
        raise UserError(f"{flag}: {text!r} is not a layer (a block index or 'embed')")
    return int(t)


def nearest_depth(student_layers: list[int], num_s: int, teacher_layers: list[int], num_t: int) -> list[tuple[int, int]]:
    """Pairs by relative depth: the embedding with the embedding (skipped when the teacher stored
    none); block s, which has run s+1 of its L_s blocks, with the stored teacher block t whose
    (t+1)/L_t is nearest (s+1)/L_s, the shallower on a tie."""
    blocks_t = sorted(t for t in teacher_layers if t != EMBED_LAYER)
    out = []
    for s in sorted(student_layers):
        if s == EMBED_LAYER:
            if EMBED_LAYER in teacher_layers:
                out.append((s, EMBED_LAYER))
            continue
        if blocks_t:
            depth = (s + 1) / num_s
            out.append((s, min(blocks_t, key=lambda t: (abs((t + 1) / num_t - depth), t))))
    return out


def parse_pairs(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        if not item.strip():
            continue
        if item.count(":") != 1:
            raise UserError(f"--pairs: {item!r}: use STUDENT:TEACHER, e.g. 0:4,1:9 or embed:embed")
        s, t = item.split(":")
        out.append((_layer(s, "--pairs"), _layer(t, "--pairs")))
    if not out:
        raise UserError("--pairs: no pairs given")
    if len(set(out)) != len(out):
        raise UserError("--pairs: a pair is given twice")
    return sorted(out)


def tie_groups(tie: str, n: int) -> list[list[int]]:
    """Indices of the pairs (in student-layer order) each tied map covers; [] for 'none'."""
    if tie == "none":
        return []
    stages = 1 if tie == "all" else int(tie.split(":")[1])
    if stages > n:
        raise UserError(f"--tie {tie}: only {n} layer pair(s) to split into {stages} stages")
    return [g.tolist() for g in np.array_split(np.arange(n), stages)]


# -- planning -------------------------------------------------------------------------------------
def _student_model(cfg: TransportConfig, row: dict) -> Path:
    """The checkpoint the student run captured: --student-model or the run's recorded model, checked
    against the run's model revision (folding another checkpoint would align the wrong basis)."""
    from tourray.model.identity import model_revision

    given = cfg.student_model or row["model"]
    path = Path(given).expanduser()
    if not path.is_dir():
        raise UserError(f"--fold-into: the student checkpoint {given!r} is not a local folder"
                        + ("" if cfg.student_model else f" (recorded by run {cfg.run}); pass --student-model DIR"))
    rev = model_revision(str(path), None)
    if rev != row["model_revision"]:
        raise UserError(f"--student-model {given}: revision {rev[:23]} is not the one run {cfg.run} captured "
                        f"({row['model_revision'][:23]}): the fold must go into the checkpoint whose basis was measured")
    return path


def plan_transport(cfg: TransportConfig) -> TransportPlan:
    """Every check that can refuse the transport, before anything is read in bulk or written."""
    from tourray.stats.solves import SolveConfig, plan_solve

    student, teacher = lk.Lake(cfg.student_lake, cfg.storage_options), lk.Lake(cfg.teacher_lake, cfg.storage_options)
    trun = cfg.teacher_run or cfg.run
    row_s = lk.run_row(student, cfg.run, "--run")
    row_t = lk.run_row(teacher, trun, "--teacher-run" if cfg.teacher_run else "--run")
    if student.root == teacher.root and trun == cfg.run:
        raise UserError(f"--teacher-lake: {teacher.root} run {trun} is the student run itself")
    site = cfg.site.value
    for row, who in ((row_s, "student"), (row_t, "teacher")):
        if site not in row["sites"]:
            raise UserError(f"--site: the {who} run {row['run']} captured {', '.join(row['sites'])}, not {site}")
    d_s, d_t = int(row_s["hidden_size"]), int(row_t["hidden_size"])
    if cfg.pairs:
        pairs = parse_pairs(cfg.pairs)
    else:
        # the stored layers, not the hooked ones: --store may keep fewer (the rest fed inline statistics)
        stored_s = [l for l in stored_layers(row_s) if not (site == Site.resid_mid.value and l == EMBED_LAYER)]
        stored_t = [l for l in stored_layers(row_t) if not (site == Site.resid_mid.value and l == EMBED_LAYER)]
        pairs = nearest_depth(stored_s, row_s["num_layers"], stored_t, row_t["num_layers"])
        if not pairs:
            raise UserError(f"--run: no layer pairs: the student run stored {compact_layers(stored_layers(row_s))}, "
                            f"the teacher run {compact_layers(stored_layers(row_t))}")
    if cfg.fold_into is not None:
        _check_foldable(cfg, d_s, d_t)
    if cfg.out is not None:
        out = Path(cfg.out).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {cfg.out}: exists and is not a folder")
        if not out.parent.is_dir():
            raise UserError(f"--out {cfg.out}: folder {out.parent} does not exist")
    groups = tie_groups(cfg.tie, len(pairs))
    planned = []
    for s, t in pairs:  # the solve's own checks: layers stored, widths and --k, selection, ridge
        name = lambda l: "embed" if l == EMBED_LAYER else str(l)  # noqa: E731
        scfg = SolveConfig(lake=student.root, storage_options=cfg.storage_options,
                           **{"from": f"{cfg.run}:{name(s)}:{site}", "to": f"{teacher.root}:{trun}:{name(t)}:{site}"},
                           k=cfg.k, whiten=cfg.whiten, ridge=cfg.ridge, center=cfg.center, heldout=cfg.heldout,
                           where=cfg.where, weight=cfg.weight, text_only=cfg.text_only, recompute=cfg.recompute)
        try:
            planned.append(Pair(s, t, plan_solve("procrustes", scfg)))
        except UserError as e:  # its --from / --to are this pair's student / teacher layers
            raise UserError(f"layer pair {name(s)}:{name(t)} (--from student, --to teacher): {e}") from None
    for g, idx in enumerate(groups):
        for i in idx:
            planned[i].group = g
    plan = TransportPlan(cfg, student, teacher, trun, d_s, d_t, row_s["tokenizer_sha256"] == row_t["tokenizer_sha256"],
                         planned, groups, "")
    ident = json.dumps(dict(pairs=[p.plan.solve_id for p in planned], tie=cfg.tie), sort_keys=True)
    plan.transport_id = hashlib.sha256(ident.encode()).hexdigest()[:16]
    if cfg.fold_into is not None:
        if not plan.foldable:
            raise UserError(f"--fold-into: --tie {cfg.tie} gives {len(groups) or len(pairs)} maps; only one rotation "
                            "tied over all layers folds (pass --tie all): a different rotation per layer or stage "
                            "would need Q_l^T Q_(l+1) between blocks, so the function would change")
        from tourray.surgery.fold import read_layout
        from tourray.surgery.blocks import check_out

        check_out(cfg.fold_into)
        plan.student_model = _student_model(cfg, row_s)
        read_layout(plan.student_model, "--student-model")  # a family the fold knows
        if cfg.center:
            plan.notes.append("the fold drops the per-layer biases (centred fit); 'bare R' is the folded student's "
                              "held-out cosine; --no-center fits the rotation to the raw vectors")
    return plan


def _check_foldable(cfg: TransportConfig, d_s: int, d_t: int) -> None:
    if d_s != d_t:
        raise UserError(f"--fold-into: the student has width {d_s} and the teacher {d_t}: a map between widths is not "
                        "orthogonal and cannot be folded into the student without changing its width; it stays an "
                        "analysis artefact in the lake (drop --fold-into)")
    if cfg.k is not None and cfg.k < d_s:
        raise UserError(f"--fold-into: --k {cfg.k} < width {d_s}: a map through K-dim PCA spaces is a projection, not "
                        "a rotation; folding it would slice the model (lossy; see `tourray prune width --hidden`)")
    if cfg.whiten:
        raise UserError("--fold-into: a whitened map C_s^-1/2 R C_t^1/2 is not orthogonal, and its R rotates whitened "
                        "coordinates, not the residual basis: drop --whiten (and --ridge) to fold")


# -- fitting --------------------------------------------------------------------------------------
class Pool:
    """Moments of a tie group as if of one stream with mean zero: the sums over its pairs of the
    per-layer centred (or, without centring, about-zero) second and cross moments, added pair by
    pair so that a pair's moments can be dropped once fitted (memory: one group, not every layer).
    Fed to `tourray.stats.linalg.procrustes(center=True)`, they give the W minimising
    sum_l ||X_l W + b_l - Y_l||^2 (b_l = mean_t,l - mean_s,l W; zero without centring)."""

    def __init__(self, center: bool):
        self.center, self.n, self.w, self.sums = center, 0, 0.0, None

    def add(self, m_a, m_b, x) -> "Pool":
        c = self.center
        parts = (m_a.m2 if c else m_a.m2 + m_a.w * np.outer(m_a.mean, m_a.mean),
                 m_b.m2 if c else m_b.m2 + m_b.w * np.outer(m_b.mean, m_b.mean),
                 x.m_ab if c else x.m_ab + x.w * np.outer(x.mean_a, x.mean_b))
        self.sums = parts if self.sums is None else tuple(a + b for a, b in zip(self.sums, parts))
        self.n, self.w = self.n + x.n, self.w + x.w
        return self

    def moments(self):
        from tourray.stats.moments import CrossMoments, Moments

        s_a, s_b, s_ab = self.sums
        d_a, d_b = s_ab.shape
        return (Moments(d_a, n=self.n, w=self.w, mean=np.zeros(d_a), m2=s_a),
                Moments(d_b, n=self.n, w=self.w, mean=np.zeros(d_b), m2=s_b),
                CrossMoments(d_a, d_b, n=self.n, w=self.w, mean_a=np.zeros(d_a), mean_b=np.zeros(d_b), m_ab=s_ab))


def pooled(fits: list[tuple], center: bool):
    """The pooled (Moments a, Moments b, CrossMoments) of several pairs' fits (see Pool)."""
    pool = Pool(center)
    for f in fits:
        pool.add(*f)
    return pool.moments()


def _procrustes(cfg: TransportConfig, what: str, m_a, m_b, x):
    from tourray.stats import linalg as solve

    try:
        mp = solve.procrustes(m_a, m_b, x, center=cfg.center, whiten=cfg.whiten, ridge=cfg.ridge, k=cfg.k)
    except ValueError as e:
        raise UserError(f"procrustes {what}: {e}") from None
    return mp


def _tied(plan: TransportPlan, idx: list[int], pool: Pool):
    from tourray.stats import linalg as solve

    cfg = plan.cfg
    m_a, m_b, x = pool.moments()
    try:
        mp = solve.procrustes(m_a, m_b, x, center=True, whiten=cfg.whiten, ridge=cfg.ridge, k=cfg.k)
    except ValueError as e:
        raise UserError(f"procrustes tied over {', '.join(plan.pairs[i].name for i in idx)}: {e}") from None
    mp.params = dict(mp.params, center=cfg.center)
    return mp


def _bias(mp, pair: Pair, center: bool) -> np.ndarray:
    """The tied map's bias for one pair: its own means restored (zero without centring)."""
    mean_a, mean_b = pair.means
    return mean_b - mean_a @ mp.matrix if center else np.zeros(mp.matrix.shape[1])


def heldout(pair: Pair, maps: dict) -> dict:
    """One pass over the pair's held-out tokens judging several maps at once. Per map: cos_after,
    rel_residual, rms_ratio = rms(x W + b - y) / rms(y); plus cos_before / rms_ratio of the identity
    when widths agree, and n_heldout. {} when no sample is held out."""
    from tourray.stats.linalg import map_diagnostics
    from tourray.stats.moments import CrossMoments, Moments
    from tourray.stats.stream import paired_stream, resolve

    plan = pair.plan
    try:
        mask = resolve(plan.lake, plan.a.run, plan.held)
    except UserError:
        return {}
    m_a, m_b, x = Moments(plan.d), Moments(plan.d_b), CrossMoments(plan.d, plan.d_b)
    after = {n: CrossMoments(plan.d_b, plan.d_b, keep_matrix=False) for n in maps}
    for xa, xb, w in paired_stream((plan.lake, plan.a.run, plan.a.layer, plan.a.site),
                                   (plan.lake_b, plan.b.run, plan.b.layer, plan.b.site), mask):
        m_a.update(xa, w)
        m_b.update(xb, w)
        x.update(xa, xb, w)
        for n, mp in maps.items():
            after[n].update(mp.apply(xa), xb, w)
    out = dict(n_heldout=m_a.n, heldout_source=mask.source, cos_before=None, rms_ratio_before=None)
    if m_a.w == 0:
        return out
    base, sumsq = float(np.trace(m_b.m2)), m_b.sumsq
    ratio = lambda rel: float(np.sqrt(rel * base / sumsq)) if sumsq > 0 and np.isfinite(rel) else None  # noqa: E731
    for n, mp in maps.items():
        d = map_diagnostics(mp, m_a, m_b, x)
        out[n] = dict(cos_after=after[n].mean_cos, rel_residual=_num(d["rel_residual"]), rms_ratio=ratio(d["rel_residual"]))
        if "cos_before" in d:
            out.update(cos_before=d["cos_before"], rms_ratio_before=ratio(d["rel_residual_identity"]))
    return out


def _num(v):
    return None if v is None or not np.isfinite(v) else float(v)


# -- rows -----------------------------------------------------------------------------------------
def _row(solve_id, from_stream, to_stream, params, mp, bias, n_fit, diag, sources) -> dict:
    from tourray.runtime import git_commit

    return dict(solve_id=solve_id, kind="procrustes", from_stream=from_stream, to_stream=to_stream,
                params=json.dumps(params, sort_keys=True, default=str), rows=int(mp.matrix.shape[0]),
                cols=int(mp.matrix.shape[1]), matrix=mp.matrix, bias=None if bias is None else np.asarray(bias).tolist(),
                singular_values=np.asarray(mp.singular_values, np.float64).tolist(), n_fit=int(n_fit),
                n_heldout=int(diag.get("n_heldout", 0)), cos_before=_num(diag.get("cos_before")),
                cos_after=_num(diag.get("cos_after")), rel_residual=_num(diag.get("rel_residual")),
                orth_error=_num(mp.orth_error), sources=json.dumps(sources, sort_keys=True, default=str),
                tourray_commit=git_commit(), created_at=dt.datetime.now(dt.timezone.utc))


def _pooled_diag(pairs: list[Pair], name: str) -> dict:
    """Token-weighted means over a group's pairs of one map's held-out diagnostics."""
    have = [p for p in pairs if p.diag.get(name)]
    n = sum(p.diag["n_heldout"] for p in have)
    out = dict(n_heldout=n)
    if not n:
        return out
    for key in ("cos_after", "rel_residual"):
        vals = [(p.diag[name][key], p.diag["n_heldout"]) for p in have if p.diag[name][key] is not None]
        out[key] = sum(v * c for v, c in vals) / sum(c for _, c in vals) if vals else None
    before = [(p.diag["cos_before"], p.diag["n_heldout"]) for p in have if p.diag.get("cos_before") is not None]
    out["cos_before"] = sum(v * c for v, c in before) / sum(c for _, c in before) if before else None
    return out


# -- the transport --------------------------------------------------------------------------------
def run_transport(cfg: TransportConfig, progress: bool = True) -> dict:
    """Plan, fit every pair and tie group, judge them on held-out tokens, store the `solves` rows in
    one append, save --out, fold --fold-into. Returns the summary `report` prints."""
    from tourray.surgery.fold import Surgery, apply_surgery
    from tourray.stats.solves import fit_moments, solves_table

    t0 = time.perf_counter()
    plan = plan_transport(cfg)
    site = cfg.site.value
    from tqdm import tqdm

    pools = [Pool(cfg.center) for _ in plan.groups]
    for p in tqdm(plan.pairs, desc="transport fit", unit="pair", disable=not progress):
        fit = fit_moments(p.plan, progress=False)
        p.own = _procrustes(cfg, f"{p.plan.a} -> {p.plan.b}", *fit)
        p.n_fit, p.means = fit[0].n, (fit[2].mean_a, fit[2].mean_b)
        if pools:
            pools[p.group].add(*fit)
        del fit  # the group's sums hold what the tied map needs
    tied = [_tied(plan, idx, pool) for idx, pool in zip(plan.groups, pools)]
    del pools
    for p in tqdm(plan.pairs, desc="transport held-out", unit="pair", disable=not progress):
        maps = {"own": p.own}
        if tied:
            t = tied[p.group]
            maps["tied"] = dataclasses.replace(t, bias=_bias(t, p, cfg.center))
            if plan.foldable and cfg.center:
                maps["rotation"] = dataclasses.replace(t, bias=np.zeros(plan.d_t))
        p.diag = heldout(p, maps)

    # rows: each pair's own map (as `tourray solve` stores it), then each tie group's map
    rows, base_params = [], dict(plan.pairs[0].plan.params)
    membership = dict(transport_id=plan.transport_id, tie=cfg.tie)
    for p in plan.pairs:
        d = dict(p.diag.get("own", {}), n_heldout=p.diag.get("n_heldout", 0), cos_before=p.diag.get("cos_before"))
        sources = dict(fit=p.plan.fit_source, heldout=p.diag.get("heldout_source"), run_digest=p.plan.run_digest,
                       lake_b=plan.teacher.root, transport=dict(membership, pair=[p.student, p.teacher]),
                       diagnostics=dict(rms_ratio=d.get("rms_ratio"), rms_ratio_before=p.diag.get("rms_ratio_before")))
        rows.append(_row(p.plan.solve_id, str(p.plan.a), str(p.plan.b), p.plan.params, p.own, p.own.bias.tolist(),
                         p.n_fit, d, sources))
    group_ids = []
    for g, (idx, t) in enumerate(zip(plan.groups, tied)):
        members = [plan.pairs[i] for i in idx]
        sid = hashlib.sha256(json.dumps(dict(transport=plan.transport_id, group=g), sort_keys=True).encode()).hexdigest()[:16]
        group_ids.append(sid)
        layers = lambda ls: compact_layers(sorted(set(ls)))  # noqa: E731
        params = dict(base_params, tie=cfg.tie, group=g, pairs=[[p.student, p.teacher] for p in members])
        per_pair = {p.name: dict(bias=_bias(t, p, cfg.center).tolist() if cfg.center else None,
                                 **{k: v for k, v in p.diag.get("tied", {}).items()}) for p in members}
        sources = dict(fit=[p.plan.fit_source for p in members], run_digest=members[0].plan.run_digest,
                       lake_b=plan.teacher.root, transport=dict(membership, group=g, pair_solves=[p.plan.solve_id for p in members]),
                       diagnostics=dict(per_pair=per_pair))
        rows.append(_row(sid, f"{cfg.run}:{layers(p.student for p in members)}:{site}",
                         f"{plan.teacher.root}:{plan.teacher_run}:{layers(p.teacher for p in members)}:{site}",
                         params, t, None, sum(p.n_fit for p in members), _pooled_diag(members, "tied"), sources))

    # store: one append of the rows not stored yet (an identical re-run adds nothing)
    have = set()
    if plan.lake.exists("solves") and not cfg.recompute:
        have = set(plan.lake.read("solves", ["solve_id"]).column(0).to_pylist())
    new = [r for r in rows if r["solve_id"] not in have]
    s = lk.schema("solves")
    if new:
        plan.lake.ensure("solves", s)
        with plan.lake.lease("solve"):  # its data files exist before the commit: no repair may take them
            plan.lake.append("solves", pa.concat_tables([solves_table(r) for r in new]), s)
    summary = dict(transport_id=plan.transport_id, lake=plan.lake.root, teacher_lake=plan.teacher.root, run=cfg.run,
                   teacher_run=plan.teacher_run, site=site, d_student=plan.d_s, d_teacher=plan.d_t, tie=cfg.tie,
                   k=cfg.k, whiten=cfg.whiten, center=cfg.center, heldout=cfg.heldout,
                   pairing="position" if plan.same_tokenizer else "span", notes=list(plan.notes),
                   stored=len(new), reused=len(rows) - len(new),
                   version=plan.lake.dataset("solves").version if plan.lake.exists("solves") else None,
                   pairs=[dict(student=p.student, teacher=p.teacher, name=p.name, solve_id=p.plan.solve_id,
                               group=p.group if plan.groups else None, n_fit=p.n_fit, matrix=p.own.matrix,
                               bias=p.own.bias, singular_values=p.own.singular_values, orth_error=p.own.orth_error,
                               **{k: v for k, v in p.diag.items() if k != "heldout_source"}) for p in plan.pairs],
                   groups=[dict(solve_id=sid, pairs=[plan.pairs[i].name for i in idx], matrix=t.matrix,
                                rotation=t.rotation, singular_values=t.singular_values, orth_error=t.orth_error,
                                biases=[_bias(t, plan.pairs[i], cfg.center) for i in idx],
                                **_pooled_diag([plan.pairs[i] for i in idx], "tied"))
                           for sid, idx, t in zip(group_ids, plan.groups, tied)])
    if cfg.out is not None:
        summary["out"] = _save(Path(cfg.out).expanduser(), summary)
    if cfg.fold_into is not None:
        q = tied[0].matrix  # unwhitened, K = d: the (lifted) rotation itself
        summary["fold"] = apply_surgery(plan.student_model, cfg.fold_into, Surgery(residual=q), dict(
            kind="transport", transport_id=plan.transport_id, solve_id=group_ids[0], student_lake=plan.lake.root,
            student_run=cfg.run, teacher_lake=plan.teacher.root, teacher_run=plan.teacher_run, site=site,
            pairs=[[p.student, p.teacher] for p in plan.pairs], params=tied[0].params,
            note="residual stream of this model = the student's h @ Q, Q = the tied Procrustes map to the teacher"),
            progress=progress)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _save(out: Path, s: dict) -> str:
    """--out: W_<pair>.npy / b_<pair>.npy per pair, W_tied<g>.npy per group, transport.json."""
    out.mkdir(exist_ok=True)
    tag = lambda n: n.replace("->", "_to_")  # noqa: E731
    for p in s["pairs"]:
        np.save(out / f"W_{tag(p['name'])}.npy", p["matrix"])
        np.save(out / f"b_{tag(p['name'])}.npy", p["bias"])
    for g, grp in enumerate(s["groups"]):
        np.save(out / f"W_tied{g}.npy", grp["matrix"])
        np.save(out / f"b_tied{g}.npy", np.stack(grp["biases"]))
    meta = {k: v for k, v in s.items() if k not in ("pairs", "groups")}
    meta["pairs"] = [{k: v for k, v in p.items() if k not in ("matrix", "bias", "singular_values")} for p in s["pairs"]]
    meta["groups"] = [{k: v for k, v in g.items() if k not in ("matrix", "rotation", "biases", "singular_values")}
                      for g in s["groups"]]
    (out / "transport.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return str(out.resolve())


# -- the command ----------------------------------------------------------------------------------
def report(s: dict) -> str:
    """The per-pair diagnostics table and what was stored / folded."""
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    tied = bool(s["groups"])
    head = ["pair s->t", "fit", "held", "top sv", "cos before", "cos own"] + (["cos tied"] if tied else []) \
        + (["cos bare R"] if any("rotation" in p for p in s["pairs"]) else []) + ["rms own"] + (["rms tied"] if tied else [])
    lines = [head]
    for p in s["pairs"]:
        own, tie, rot = p.get("own", {}), p.get("tied", {}), p.get("rotation")
        row = [p["name"] + (f" [g{p['group']}]" if tied and len(s["groups"]) > 1 else ""), f"{p['n_fit']:,}",
               f"{p.get('n_heldout', 0):,}", f"{p['singular_values'][0]:.4g}", f(p.get("cos_before")),
               f(own.get("cos_after"))]
        row += [f(tie.get("cos_after"))] if tied else []
        row += [f(rot["cos_after"])] if rot is not None else ([] if "cos bare R" not in head else ["-"])
        row += [f(own.get("rms_ratio"))] + ([f(tie.get("rms_ratio"))] if tied else [])
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    table = ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in lines]
    dims = f"{s['d_student']} -> {s['d_teacher']}" + (f" via top-{s['k']} PCA spaces" if s["k"] else "")
    out = [f"transport {s['lake']}:{s['run']} -> {s['teacher_lake']}:{s['teacher_run']} ({s['site']}, {dims}; tokens "
           f"paired by {'position' if s['pairing'] == 'position' else 'character span'}; --tie {s['tie']})",
           "  held-out diagnostics per layer pair (cos: mean cosine with the teacher; rms: rms(xW+b-y)/rms(y)):"]
    out += table
    if all(not p.get("n_heldout") for p in s["pairs"]):
        out.append("  no held-out tokens (too few samples for this --heldout): diagnostics are null")
    for g, grp in enumerate(s["groups"]):
        out.append(f"  tied map {g} over {', '.join(grp['pairs'])}: orthogonality error {grp['orth_error']:.2e}, "
                   "held-out cosine " + (f"{f(grp['cos_before'])} -> " if grp.get("cos_before") is not None else "")
                   + f"{f(grp.get('cos_after'))} (solves row {grp['solve_id']})")
    out += [f"  note: {n}" for n in s["notes"]]
    out.append(f"  stored {s['stored']} row(s) in table solves of {s['lake']} (version {s['version']})"
               + (f"; {s['reused']} already there" if s["reused"] else "") + f"; transport id {s['transport_id']}")
    if s.get("out"):
        out.append(f"  maps saved under {s['out']}")
    if s.get("fold"):
        out.append(f"  folded the tied rotation into {s['fold']['out']}: same function, residual basis aligned with "
                   "the teacher's")
    elif not s["groups"] or len(s["groups"]) > 1 or s["d_student"] != s["d_teacher"]:
        out.append("  (analysis artefacts: only a rotation tied over all layers between equal widths can be folded)")
    return "\n".join(out)


def cmd_transport(args) -> int:
    from tourray.config import config_from_args

    cfg = config_from_args(TransportConfig, args)
    print(report(run_transport(cfg, progress=not args.no_progress)))
    return 0


def add_parser(command) -> argparse.ArgumentParser:
    """Add `tourray transport`; `command(name, fn, help)` is `tourray.cli.parser`'s helper."""
    from tourray.config import add_config_flags

    p = command("transport", cmd_transport, "Teacher-to-student basis transport: per-layer Procrustes maps from a "
                                            "student's residual stream to a teacher's (optionally tied, and folded).")
    p.description = DESCRIPTION
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_flags(p, TransportConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return p
