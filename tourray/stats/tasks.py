"""`tourray stats`: layer and layer-pair statistics of a run, one Ray task per tile of layers.

    plan (layers, pairs, token mask, what is already in the lake)
      └─► tiles: each reads a few layers once and owns some layers' moments and some pairs
            └─► Ray task per tile: layer_stream -> Moments / CrossMoments (float64, exact merges)
                  writes its full matrices as Lance fragments itself, returns small rows
      └─► driver: commits `moments`, then `layer_stats`, then `pair_stats` (CKA needs both layers)

All-pairs similarity of L layers reads each layer about L / tile_layers times, not L times: pairs
are tiled into blocks (I x J) of the pair matrix. A task's memory is (owned layers + pairs) x d^2
float64 plus one batch per layer read, flat in corpus size.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from tourray.lake import tables as lk
from tourray.config import CommaList, EMBED_LAYER, BaseConfig, Site, StorageOptions, compact_layers, parse_layers, storage_options_field
from tourray.errors import UserError
from tourray.stats.moments import CrossMoments, Moments
from tourray.stats.stream import Selection, TokenMask, layer_stream, resolve

log = logging.getLogger("tourray")

STATS_TABLES = ("moments", "layer_stats", "pair_stats")


class StatsConfig(BaseConfig):
    """What `tourray stats` computes. Every field is also a flag."""

    lake: str = Field("lake", description="Lake root: a local folder or a Lance URI.")
    storage_options: StorageOptions = storage_options_field()
    run: str = Field(description="Run whose stored vectors are read.")
    layers: str = Field("all", description="Layers: 'all', 'blocks', 'embed,0,5,10-20' (must have been stored).")
    sites: CommaList[Site] = Field([Site.resid_post], description="Sites, comma-separated (resid_post, resid_mid).")
    pairs: str = Field("consecutive", description="Layer pairs: consecutive (each layer with the next), all, none, or A:B,... (embed allowed).")
    where: str | None = Field(None, description="SQL predicate over samples/tokens columns selecting tokens, e.g. \"category = 'seen_cities'\".")
    weight: Literal["none", "entropy"] = Field("none", description="Token weights: none, or entropy (high-entropy tokens weigh more).")
    text_only: bool = Field(True, description="Only text tokens (not system prompt or chat template).")
    split: Literal["all", "fit", "heldout"] = Field("all", description="all samples, or one side of a deterministic split by sample id (fit / heldout).")
    heldout: float = Field(0.1, gt=0, lt=1, description="Fraction of samples held out when --split is fit or heldout.")
    workers: int = Field(1, gt=0, description="Ray tasks running at once.")
    threads: int | None = Field(None, gt=0, description="BLAS threads per task; default: the largest node's cores / workers.")
    tile_layers: int = Field(4, gt=0, description="Layers per side of an all-pairs tile (memory: tile_layers^2 cross matrices per task).")
    batch_rows: int = Field(4096, gt=0, description="Token rows per batch read from the lake.")
    matrices: bool = Field(True, description="Store full covariance (and, except for --pairs all, cross-covariance) matrices for the solves.")
    near_zero: float = Field(1e-3, ge=0, description="|x| at or below this counts as near zero (per-channel sparsity).")
    recompute: bool = Field(False, description="Recompute even when the lake already holds these statistics.")
    address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS, else an embedded local Ray.")


    @property
    def selection(self) -> Selection:
        return Selection(where=self.where, weight=self.weight, text_only=self.text_only, split=self.split,
                         heldout=self.heldout)


@dataclass
class Tile:
    """One Ray task: the layers it reads once, the layers whose moments it owns, its pairs."""

    read: list[int]
    own: list[int]
    pairs: list[tuple[int, int]]


@dataclass
class StatsPlan:
    cfg: StatsConfig
    lake: lk.Lake
    run_row: dict
    site: str
    layers: list[int]
    pairs: list[tuple[int, int]]
    mask: TokenMask
    selection: Selection
    source: str
    todo_layers: list[int]
    todo_pairs: list[tuple[int, int]]
    tiles: list[Tile] = field(default_factory=list)


def parse_pairs(spec: str, layers: list[int], num_layers: int) -> list[tuple[int, int]]:
    """consecutive | all | none | 'A:B,C:D' (A, B: block index or 'embed') -> sorted pairs."""
    spec = spec.strip().lower()
    if spec == "none":
        return []
    if spec == "consecutive":
        return list(zip(layers, layers[1:]))
    if spec == "all":
        return [(a, b) for i, a in enumerate(layers) for b in layers[i + 1:]]
    out = set()
    for item in spec.split(","):
        a, sep, b = item.strip().partition(":")
        if not sep:
            raise UserError(f"--pairs: cannot parse {item!r}; use consecutive, all, none or A:B,... (e.g. embed:3,4:10)")
        pa_, pb = (parse_layers(x, num_layers) for x in (a, b))
        if len(pa_) != 1 or len(pb) != 1:
            raise UserError(f"--pairs: {item!r} must name one layer on each side")
        if pa_[0] == pb[0]:
            raise UserError(f"--pairs: {item!r} pairs a layer with itself")
        out.add(tuple(sorted((pa_[0], pb[0]))))
    return sorted(out)


def make_tiles(layers: list[int], pairs: list[tuple[int, int]], all_pairs: bool, tile_layers: int,
               own: list[int] | None = None) -> list[Tile]:
    """Group the work so that each task reads few layers and each layer of `own` (default: all of
    `layers`) has its moments computed by exactly one task."""
    own_set = set(layers if own is None else own)
    tiles: list[Tile] = []
    if all_pairs and pairs:
        index = {l: i for i, l in enumerate(layers)}
        chunks = [layers[i:i + tile_layers] for i in range(0, len(layers), tile_layers)]
        for ci, I in enumerate(chunks):
            for J in chunks[ci:]:
                ps = [p for p in pairs if p[0] in I and p[1] in J or p[0] in J and p[1] in I]
                ps = sorted({tuple(sorted(p, key=index.get)) for p in ps})
                if ps or I is J:
                    tiles.append(Tile(sorted(set(I) | set(J)), [], ps))
    else:
        per = max(1, tile_layers)
        for i in range(0, len(pairs), per):
            ps = pairs[i:i + per]
            tiles.append(Tile(sorted({l for p in ps for l in p}), [], ps))
    owned: set[int] = set()
    for t in tiles:
        t.own = [l for l in t.read if l in own_set and l not in owned]
        owned.update(t.own)
    rest = [l for l in layers if l in own_set and l not in owned]
    for i in range(0, len(rest), tile_layers):
        tiles.append(Tile(rest[i:i + tile_layers], rest[i:i + tile_layers], []))
    return tiles


def plan_stats(cfg: StatsConfig, site: Site) -> StatsPlan:
    """Check the run, layers, pairs and selection; find what the lake already holds."""
    lake = lk.Lake(cfg.lake, cfg.storage_options)
    if not lake.exists("runs"):
        raise UserError(f"--lake: no tourray tables under {lake.root}")
    row = lk.run_row(lake, cfg.run)
    hooked, num_layers = sorted(row["layers"]), row["num_layers"]
    stored = stored_layers(row)
    if site.value not in row["sites"]:
        raise UserError(f"--sites: run {cfg.run} captured {', '.join(row['sites'])}, not {site.value}")
    layers = hooked if cfg.layers.strip().lower() == "all" else parse_layers(cfg.layers, num_layers)
    if missing := [l for l in layers if l not in hooked]:
        raise UserError(f"--layers: run {cfg.run} did not capture layer(s) {compact_layers(missing)} "
                        f"(captured: {compact_layers(hooked)})")
    if site == Site.resid_mid:
        layers = [l for l in layers if l != EMBED_LAYER]
    if not layers:
        raise UserError(f"--layers: nothing to compute for run {cfg.run}")
    pairs = parse_pairs(cfg.pairs, layers, num_layers)
    bad = [p for p in pairs if p[0] not in layers or p[1] not in layers]
    if bad:
        raise UserError(f"--pairs: {bad[0][0]}:{bad[0][1]} names a layer outside --layers {compact_layers(layers)}")
    sel = cfg.selection
    mask = resolve(lake, cfg.run, sel)
    mask.source["activations_version"] = lake.dataset("activations").version if lake.exists("activations") else None
    source = mask.source["digest"]
    done_l, done_p = set(), set()
    if not cfg.recompute:
        done_l, done_p = existing(lake, cfg.run, site.value, sel.key(), source, need_matrices=cfg.matrices,
                                  need_pair_matrices=cfg.matrices and cfg.pairs.strip().lower() != "all")
    todo_layers = [l for l in layers if l not in done_l]
    todo_pairs = [p for p in pairs if p not in done_p]
    # what is neither stored as vectors nor already in the lake (inline statistics) cannot be computed
    unavailable = sorted({l for l in todo_layers + [x for p in todo_pairs for x in p] if l not in stored})
    if unavailable:
        raise UserError(f"--layers: run {cfg.run} hooked layer(s) {compact_layers(unavailable)} but stored no vectors "
                        f"of them (stored: {compact_layers(stored)}), and the lake holds no inline statistics for "
                        f"this selection; capture with --store including them, or with --stats moments,pairs")
    plan = StatsPlan(cfg, lake, row, site.value, layers, pairs, mask, sel, source, todo_layers, todo_pairs)
    plan.tiles = make_tiles(sorted(set(todo_layers) | {l for p in todo_pairs for l in p}), todo_pairs,
                            cfg.pairs.strip().lower() == "all", cfg.tile_layers, own=todo_layers)
    return plan


def stored_layers(run_row: dict) -> list[int]:
    """Layers whose vectors a run stored (`--store`; hooked layers may feed inline statistics only)."""
    spec = json.loads(run_row["manifest"])["config"].get("store", "all")
    hooked = sorted(run_row["layers"])
    return hooked if spec.strip().lower() == "all" else parse_layers(spec, run_row["num_layers"])


def _where(run: str, site: str, selection: str, source: str) -> str:
    q = lk.sql_quote
    return f"run = {q(run)} AND site = {q(site)} AND selection = {q(selection)} AND source = {q(source)}"


def existing(lake: lk.Lake, run: str, site: str, selection: str, source: str, need_matrices: bool,
             need_pair_matrices: bool = False):
    """Layers and pairs whose statistics (and, if asked, matrices) are already in the lake."""
    w = _where(run, site, selection, source)
    layers = set(lake.read("layer_stats", ["layer"], filter=w).column(0).to_pylist())
    pairs = {(r["layer_a"], r["layer_b"]) for r in lake.read("pair_stats", ["layer_a", "layer_b"], filter=w).to_pylist()}
    if need_matrices:  # the solves need full co-moments, not only their summaries
        have = lake.read("moments", ["kind", "layer_a", "layer_b"], filter=w + " AND kind IN ('layer', 'pair')").to_pylist()
        layers &= {r["layer_a"] for r in have if r["kind"] == "layer"}
        if need_pair_matrices:  # (`--pairs all` never stores cross matrices, so it cannot ask for them)
            pairs &= {(r["layer_a"], r["layer_b"]) for r in have if r["kind"] == "pair"}
    return layers, pairs


# -- rows ------------------------------------------------------------------------------------
def _now():
    return dt.datetime.now(dt.timezone.utc)


def _provenance(sources: dict) -> dict:
    from tourray.runtime import git_commit

    return dict(sources=json.dumps(sources, sort_keys=True), tourray_commit=git_commit(), created_at=_now())


def layer_row(key: dict, m: Moments, origin: str, prov: dict) -> dict:
    """A `layer_stats` row from merged moments (the PCA spectrum when the covariance is full)."""
    from tourray.stats.linalg import spectrum as pca_spectrum

    spectrum = pca_spectrum(m) if m.full else None
    var, absm, zero = m.var, m.abs_mean, m.frac_near_zero
    return dict(key, origin=origin, n_tokens=m.n, weight_sum=m.w, mean_norm=m.mean_norm, rms=m.rms,
                channel_mean=m.mean.tolist(), channel_var=var.tolist(), channel_absmax=m.absmax.tolist(),
                channel_abs_mean=absm.tolist(), channel_frac_near_zero=zero.tolist(), near_zero=m.near_zero,
                eigenvalues=spectrum.eigenvalues.tolist() if spectrum else None,
                explained=spectrum.explained.tolist() if spectrum else None,
                effective_rank=float(spectrum.effective_rank) if spectrum else None,
                importance_magnitude=float(absm.mean()), importance_variance=float(var.mean()),
                importance_sparsity=float(zero.mean()), **prov)


def moments_row(key: dict, kind: str, layer_a: int, layer_b: int, m: Moments | CrossMoments, prov: dict) -> dict:
    """A `moments` row: the full accumulator, so that readers can merge and solve from it."""
    if isinstance(m, Moments):
        extra = dict(absmax=m.absmax.tolist(), zero_w=m.zero_w.tolist(), abs_w=m.abs_w.tolist(), norm_w=m.norm_w,
                     near_zero=m.near_zero)
        d_a = d_b = m.d
        mean_a = mean_b = m.mean
        matrix, full = m.m2, m.full
    else:
        extra = dict(cos_w=m.cos_w, angle_w=m.angle_w, diff_w=m.diff_w, sq_a_w=m.sq_a_w)
        d_a, d_b, mean_a, mean_b, matrix, full = m.d_a, m.d_b, m.mean_a, m.mean_b, m.m_ab, True
    return dict(run=key["run"], kind=kind, layer_a=layer_a, layer_b=layer_b, site=key["site"],
                selection=key["selection"], source=key["source"], n_tokens=m.n, weight_sum=m.w, d_a=d_a, d_b=d_b,
                full=full, mean_a=np.asarray(mean_a).tolist(), mean_b=np.asarray(mean_b).tolist(),
                matrix=pa.array(np.ascontiguousarray(matrix).reshape(-1)), extra=json.dumps(extra), **prov)


def moment_rows(t: pa.Table | pa.RecordBatch):
    """(row without its matrix, matrix as float64 numpy) for each row of a `moments` table: the matrix
    is converted in Arrow, never as millions of Python floats."""
    for i in range(t.num_rows):
        one = t.slice(i, 1)
        mat = one.column("matrix")
        mat = (mat.combine_chunks() if isinstance(mat, pa.ChunkedArray) else mat).flatten().to_numpy()
        r = pa.Table.from_batches([one]) if isinstance(one, pa.RecordBatch) else one
        yield r.drop_columns(["matrix"]).to_pylist()[0], mat


def moments_from_row(r: dict, matrix: np.ndarray) -> Moments | CrossMoments:
    extra = json.loads(r["extra"])
    shape = (r["d_a"], r["d_b"]) if r["full"] else (r["d_a"],)
    matrix = np.asarray(matrix, np.float64).reshape(shape)
    if r["kind"] in ("pair", "pair_part"):
        return CrossMoments(r["d_a"], r["d_b"], n=r["n_tokens"], w=r["weight_sum"], mean_a=np.asarray(r["mean_a"]),
                            mean_b=np.asarray(r["mean_b"]), m_ab=matrix, **extra)
    return Moments(r["d_a"], full=r["full"], near_zero=extra.pop("near_zero"), n=r["n_tokens"], w=r["weight_sum"],
                   mean=np.asarray(r["mean_a"]), m2=matrix, absmax=np.asarray(extra["absmax"]),
                   zero_w=np.asarray(extra["zero_w"]), abs_w=np.asarray(extra["abs_w"]), norm_w=extra["norm_w"])


def moments_table(rows: list[dict]) -> pa.Table:
    """`moments` rows as a table; the matrices become one large_list column by concatenating their
    float64 arrays (pa.array over a list of arrays would convert element by element)."""
    s = lk.schema("moments")
    mats = [r["matrix"] for r in rows]
    offsets = np.cumsum([0] + [len(m) for m in mats], dtype=np.int64)
    values = (mats[0] if len(mats) == 1 else pa.concat_arrays(mats)) if mats else pa.array([], pa.float64())
    cols = {f.name: [r[f.name] for r in rows] for f in s if f.name != "matrix"}
    cols["matrix"] = pa.LargeListArray.from_arrays(pa.array(offsets), values)
    return pa.table([cols[f.name] for f in s], schema=s)


def read_moments(lake: lk.Lake, run: str, site: str, selection: str, source: str, kind: str,
                 layer_a: int, layer_b: int | None = None) -> Moments | CrossMoments | None:
    """Merged moments from the lake (parts merged exactly), or None when none are stored."""
    layer_b = layer_a if layer_b is None else layer_b
    w = _where(run, site, selection, source) + f" AND layer_a = {layer_a} AND layer_b = {layer_b}"
    rows = list(moment_rows(lake.read("moments", filter=w + f" AND kind IN ({lk.sql_quote(kind)}, {lk.sql_quote(kind + '_part')})")))
    whole = [r for r in rows if r[0]["kind"] == kind]
    parts = whole[-1:] or rows
    if not parts:
        return None
    out = moments_from_row(*parts[0])
    for r in parts[1:]:
        out = out.merge(moments_from_row(*r))
    return out


# -- the task --------------------------------------------------------------------------------
def _write_matrices(lake: lk.Lake, key: dict, own: dict, pairs: dict, prov: dict, layers: bool, pair_mats: bool) -> list[str]:
    """The full co-moments as `moments` fragments (uncommitted), one record batch per matrix: no copy
    of them into one buffer."""
    rows = [moments_row(key, "pair", a, b, x, prov) for (a, b), x in pairs.items() if pair_mats and x.w > 0]
    rows += [moments_row(key, "layer", l, l, m, prov) for l, m in own.items() if layers and m.w > 0]
    if not rows:
        return []
    s = lk.schema("moments")
    return lake.write_fragments("moments", pa.RecordBatchReader.from_batches(
        s, (b for r in rows for b in moments_table([r]).to_batches())), s)


def _layer_rows(key: dict, own: dict, prov: dict, threads: int) -> dict:
    """`layer_stats` rows; their spectra one eigvalsh per layer, `threads` at a time with one BLAS
    thread each (scales better than one multi-threaded eigvalsh)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    live = [(l, m) for l, m in own.items() if m.w > 0]
    if threads > 1 and len(live) > 1:
        with threadpool_limits(1), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stats-spectra") as pool:
            rows = list(pool.map(lambda lm: layer_row(dict(key, layer=lm[0]), lm[1], "stats", prov), live))
    else:
        rows = [layer_row(dict(key, layer=l), m, "stats", prov) for l, m in live]
    return {l: r for (l, _), r in zip(live, rows)}


def run_tile(lake_root: str, storage_options, run: str, site: str, tile: Tile, mask: TokenMask, key: dict,
             batch_rows: int, threads: int, near_zero: float, store_layer_matrices: bool,
             store_pair_matrices: bool) -> dict:
    """Stream one tile's layers once; return summary rows, pair partials and matrix fragments. The
    matrices are written on a second thread while the spectra are computed (the per-layer fixed
    costs that follow the streaming)."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    lake = lk.Lake(lake_root, storage_options)
    t0 = time.perf_counter()
    d = lake.dataset("activations", version=mask.source.get("activations_version")).schema.field("h").type.list_size
    own = {l: Moments(d, near_zero=near_zero) for l in tile.own}
    pairs = {p: CrossMoments(d, d) for p in tile.pairs}
    prov = _provenance(mask.source)
    # (BLAS limits are process-wide: one setting for the whole task, writing thread included)
    with threadpool_limits(threads):
        for chunk in layer_stream(lake, run, site, tile.read, mask, batch_rows):
            for l, m in own.items():
                m.update(chunk.h[l], chunk.weights)
            for (a, b), x in pairs.items():
                x.update(chunk.h[a], chunk.h[b], chunk.weights)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stats-write") as bg:
            frags = bg.submit(_write_matrices, lake, key, own, pairs, prov, store_layer_matrices, store_pair_matrices)
            layer_rows = _layer_rows(key, own, prov, threads)
            frags = frags.result()
    pair_parts = {(a, b): dict(n=x.n, w=x.w, cos=x.mean_cos, angular=x.mean_angular, rel_rms=x.rel_rms_diff,
                               frob_ab=float(np.vdot(x.m_ab, x.m_ab))) for (a, b), x in pairs.items() if x.w > 0}
    frob = {l: float(np.vdot(m.m2, m.m2)) for l, m in own.items() if m.w > 0}
    return dict(layer_rows=layer_rows, pair_parts=pair_parts, frob=frob, fragments=frags, read=tile.read,
                seconds=time.perf_counter() - t0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# -- the driver ------------------------------------------------------------------------------
def _stored_frob(lake: lk.Lake, key: dict, layers: list[int]) -> dict[int, float]:
    """||M||_F^2 of already-stored layers' co-moments, from their spectra: sum (w lambda)^2."""
    rows = lake.read("layer_stats", ["layer", "eigenvalues", "weight_sum"],
                     filter=_where(key["run"], key["site"], key["selection"], key["source"])).to_pylist()
    return {r["layer"]: float(np.sum((np.asarray(r["eigenvalues"]) * r["weight_sum"]) ** 2))
            for r in rows if r["layer"] in layers and r["eigenvalues"] is not None}


def run_stats(cfg: StatsConfig, progress: bool = True) -> dict:
    """Plan each site, run its tiles as Ray tasks (at most `workers` at once), commit the results."""
    from tqdm import tqdm

    from tourray.runtime import init_ray, node_cpus, user_error_in
    from tourray.stats.linalg import cka_from_norms

    t0 = time.perf_counter()
    summary = dict(run=cfg.run, lake=None, sites={}, tasks=0)
    plans = [plan_stats(cfg, site) for site in cfg.sites]  # refuse everything before any work
    for plan in plans:
        lake, key = plan.lake, dict(run=cfg.run, site=plan.site, selection=plan.selection.key(), source=plan.source)
        summary["lake"] = lake.root
        info = dict(layers=plan.layers, pairs=len(plan.pairs), computed_layers=plan.todo_layers,
                    computed_pairs=len(plan.todo_pairs), reused_layers=len(plan.layers) - len(plan.todo_layers),
                    reused_pairs=len(plan.pairs) - len(plan.todo_pairs), tiles=len(plan.tiles))
        summary["sites"][plan.site] = info
        log.info("stats %s/%s: %d layers, %d pairs (%d layers, %d pairs already in the lake), %d task(s)",
                 cfg.run, plan.site, len(plan.layers), len(plan.pairs), info["reused_layers"], info["reused_pairs"],
                 len(plan.tiles))
        if not plan.tiles:
            continue
        for t in STATS_TABLES:
            lake.ensure(t, lk.schema(t))
        ray = init_ray(cfg.address)
        cpus = node_cpus(ray)
        threads = cfg.threads or max(1, cpus // cfg.workers)
        task = ray.remote(run_tile).options(num_cpus=min(threads, cpus))
        mask_ref = ray.put(plan.mask)
        store_pairs = cfg.matrices and cfg.pairs.strip().lower() != "all"
        args = lambda tile: (lake.root, lake.storage_options, cfg.run, plan.site, tile, mask_ref, key,  # noqa: E731
                             cfg.batch_rows, threads, cfg.near_zero, cfg.matrices, store_pairs)
        # the tasks write moments fragments before the driver commits them: hold a lease meanwhile, so
        # that repair and optimize leave those files alone (tourray.lake.tables.Lease)
        with lake.lease("stats") as lease:
            queue_, running, results = list(plan.tiles), [], []
            bar = tqdm(total=len(plan.tiles), unit="task", desc=f"stats {plan.site}", disable=not progress, dynamic_ncols=True)
            try:
                while queue_ or running:
                    while queue_ and len(running) < cfg.workers:
                        running.append(task.remote(*args(queue_.pop(0))))
                    ready, running = ray.wait(running, num_returns=1)
                    res = ray.get(ready[0])
                    lease.check()  # the fence: a lease taken over must not commit
                    lake.commit("moments", res["fragments"])  # matrices first: a stats row implies its matrix
                    if res["layer_rows"]:
                        s = lk.schema("layer_stats")
                        lake.append("layer_stats", pa.Table.from_pylist(list(res["layer_rows"].values()), schema=s), s)
                    results.append(res)
                    bar.update(1)
            except Exception as e:  # noqa: BLE001 - a UserError raised in a task, as itself
                raise user_error_in(e) or e
            finally:
                bar.close()
            summary["tasks"] += len(results)
            info["task_seconds"] = round(sum(r["seconds"] for r in results), 2)
            info["task_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in results), 1)  # a worker's high-water mark
            frob = _stored_frob(lake, key, plan.layers)
            parts = {}
            for r in results:
                frob.update(r["frob"])
                parts.update(r["pair_parts"])
            prov = _provenance(plan.mask.source)
            rows = [dict(key, layer_a=a, layer_b=b, origin="stats", n_tokens=p["n"], weight_sum=p["w"], mean_cos=p["cos"],
                         mean_angular=p["angular"], cka=cka_from_norms(p["frob_ab"], frob[a], frob[b]),
                         rel_rms_diff=p["rel_rms"], **prov) for (a, b), p in sorted(parts.items())]
            if rows:
                s = lk.schema("pair_stats")
                lake.append("pair_stats", pa.Table.from_pylist(rows, schema=s), s)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
