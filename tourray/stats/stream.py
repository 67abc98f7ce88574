"""Streams of aligned per-layer token vectors: the one reader statistics and solves use.

`Selection` says which tokens count (text tokens by default, any SQL predicate on `samples` /
`tokens` columns, optional per-token weights) and is resolved once into a `TokenMask`: per-sample
text spans (no join against `tokens`) or, when a predicate or weights are asked for, per-sample
position weights read from the narrow `tokens` table.

`layer_stream` reads several layers of one run side by side: one Lance scan for all of them (the
layer filter reads only those layers' bytes, and the run/site filters decode their string columns
once, not once per layer), only rows of selected samples and positions kept (the span of
positions the mask can select is part of the Lance filter), split by layer, re-chunked to common
row counts of selected rows, keys checked (sample and pos must agree across layers, row for row;
they are not assumed from physical order) and weighted; rows of samples outside the selection
(including a killed capture's leftovers, which have no `samples` row) are dropped before
alignment. Only kept rows are widened to float64. Memory is one batch per layer (plus one
sample's blocks, as capture writes them), flat in corpus size; reading and conversion run on a
background thread so that they overlap the caller's compute.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tourray.errors import UserError
from tourray.lake.tables import Lake, arrow_to_numpy, sql_quote


@dataclass(frozen=True)
class Selection:
    """Which tokens of a run a statistic covers.

    where: SQL predicate over `samples` and `tokens` columns (e.g. "category = 'seen_cities'",
      "surprisal > 2", "source LIKE 'train/%'"); evaluated by DuckDB.
    weight: 'entropy' weighs each token by `tokens.entropy`, the entropy of the distribution that
      predicted it (high-entropy tokens weigh more).
    text_only: only tokens of the text segment (not system prompt or chat template).
    split: 'fit' or 'heldout' keeps one side of a deterministic split of samples by id hash, with
      a `heldout` fraction of them held out (solves fit on one side and are judged on the other).
    """

    where: str | None = None
    weight: Literal["none", "entropy"] = "none"
    text_only: bool = True
    split: Literal["all", "fit", "heldout"] = "all"
    heldout: float = 0.1

    def key(self) -> str:
        """Canonical text: two statistics with the same key covered the same tokens, weighted alike."""
        d = {"where": self.where, "weight": self.weight, "text_only": self.text_only}
        if self.split != "all":
            d |= {"split": self.split, "heldout": self.heldout}
        return json.dumps(d, sort_keys=True)

    @property
    def needs_tokens(self) -> bool:
        return self.where is not None or self.weight != "none"

    def keeps(self, sample_ids: list[str]) -> np.ndarray:
        """Which samples this selection's split keeps (sample ids are hex hashes: stable buckets)."""
        if self.split == "all":
            return np.ones(len(sample_ids), bool)
        held = np.array([int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 2**32 < self.heldout for s in sample_ids],
                        bool).reshape(-1)
        return held if self.split == "heldout" else ~held


@dataclass
class TokenMask:
    """Resolved selection of one run: per selected sample either a [start, end) span (unit weights)
    or a dense weight per position (0 = not selected)."""

    ids: pa.Array                          # selected sample ids, in lookup order
    start: np.ndarray                      # [k] span start (span mode)
    end: np.ndarray                        # [k]
    offsets: np.ndarray | None = None      # [k + 1] into `weights` (weight mode)
    weights: np.ndarray | None = None      # [sum n_tokens] float64
    source: dict = field(default_factory=dict)   # Lance versions and digest of what was read

    @property
    def n_samples(self) -> int:
        return len(self.ids)

    def apply(self, sample_id: pa.Array, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Row indices selected in a chunk, and their weights (None = unit weights)."""
        rows, _, w = self.locate(sample_id, pos)
        return rows, w

    def locate(self, sample_id: pa.Array, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Row indices selected in a chunk, each one's sample as an index into `ids`, and their
        weights (None = unit weights). Rows of samples outside `ids` are never selected."""
        idx = pc.index_in(sample_id, value_set=self.ids)
        valid = ~np.asarray(idx.is_null().to_numpy(zero_copy_only=False))
        k = np.asarray(idx.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        if self.weights is None:
            rows = np.flatnonzero(valid & (pos >= self.start[k]) & (pos < self.end[k]))
            return rows, k[rows], None
        flat = self.offsets[k] + pos
        inside = valid & (pos < self.offsets[k + 1] - self.offsets[k])
        w = np.where(inside, self.weights[np.where(inside, flat, 0)], 0.0)
        rows = np.flatnonzero(w > 0)
        return rows, k[rows], w[rows]

    def pos_range(self) -> tuple[int, int]:
        """[lo, hi): every selected position lies inside (a filter the Lance scan can apply itself:
        the system prompt's rows are never decoded when only text tokens count)."""
        if self.weights is None:
            live = self.end > self.start
            return (int(self.start[live].min()), int(self.end[live].max())) if live.any() else (0, 0)
        flat = np.flatnonzero(self.weights > 0)
        if not len(flat):
            return 0, 0
        pos = flat - self.offsets[np.searchsorted(self.offsets, flat, side="right") - 1]
        return int(pos.min()), int(pos.max()) + 1


def complete_samples(lake: Lake, run: str) -> pa.Table:
    """The run's complete samples (those with a `samples` row), sorted by id."""
    t = lake.read("samples", ["sample_id", "n_tokens", "text_start", "text_end"], filter=f"run = {sql_quote(run)}")
    return t.sort_by("sample_id")


def source_digest(samples: pa.Table) -> str:
    """Identity of a run's complete content: its sample ids and token counts (a run's committed
    samples never change, so equal digests mean equal vectors)."""
    h = hashlib.sha256()
    for sid, n in zip(samples.column("sample_id").to_pylist(), samples.column("n_tokens").to_pylist()):
        h.update(f"{sid}:{n}\n".encode())
    return h.hexdigest()[:32]


def resolve(lake: Lake, run: str, sel: Selection) -> TokenMask:
    """Turn a Selection into a TokenMask; refuse one that selects no tokens."""
    samples = complete_samples(lake, run)
    if sel.split != "all":
        samples = samples.filter(pa.array(sel.keeps(samples.column("sample_id").to_pylist())))
    source = {"samples_version": lake.dataset("samples").version, "digest": source_digest(samples)}
    if not sel.needs_tokens:
        start = samples.column("text_start").to_numpy() if sel.text_only else np.zeros(len(samples), np.int32)
        end = samples.column("text_end").to_numpy() if sel.text_only else samples.column("n_tokens").to_numpy()
        mask = TokenMask(samples.column("sample_id").combine_chunks(), start.astype(np.int64), end.astype(np.int64),
                         source=source)
        if int((mask.end - mask.start).clip(0).sum()) == 0:
            raise UserError(f"run {run}: the selection {sel.key()} selects no tokens")
        return mask
    return _resolve_with_tokens(lake, run, sel, samples, source)


def _resolve_with_tokens(lake: Lake, run: str, sel: Selection, samples: pa.Table, source: dict) -> TokenMask:
    import duckdb

    from tourray.lake.sql import connect

    con = connect(lake)
    con.register("selected_samples", samples.select(["sample_id"]))
    weight = "coalesce(t.entropy, 0)" if sel.weight == "entropy" else "1.0"
    conds = ["t.run = $run"] + (["t.segment = 'text'"] if sel.text_only else []) + ([f"({sel.where})"] if sel.where else [])
    sql = f"""
        SELECT t.sample_id, t.pos, CAST({weight} AS DOUBLE) AS w
        FROM tokens AS t JOIN samples AS s USING (run, sample_id)
        SEMI JOIN selected_samples AS k ON k.sample_id = t.sample_id
        WHERE {' AND '.join(conds)}"""
    try:
        chosen = con.sql(sql, params={"run": run}).to_arrow_table()
    except duckdb.Error as e:
        raise UserError(f"--where {sel.where!r}: {str(e).splitlines()[0]}") from None
    source["tokens_version"] = lake.dataset("tokens").version
    ids = samples.column("sample_id").combine_chunks()
    n = samples.column("n_tokens").to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n)])
    weights = np.zeros(int(offsets[-1]))
    k = np.asarray(pc.index_in(chosen.column("sample_id"), value_set=ids).to_numpy(zero_copy_only=False), np.int64)
    weights[offsets[k] + chosen.column("pos").to_numpy()] = chosen.column("w").to_numpy()
    if not (weights > 0).any():
        raise UserError(f"run {run}: --where {sel.where!r} (weight {sel.weight}) selects no tokens")
    return TokenMask(ids, np.zeros(len(ids), np.int64), n, offsets, weights, source)


@dataclass
class Chunk:
    """Aligned rows of several layers: h[layer] is [n, d] for the same (sample_id, pos) rows."""

    sample_id: pa.Array
    pos: np.ndarray
    weights: np.ndarray | None
    h: dict[int, np.ndarray]

    def __len__(self) -> int:
        return len(self.pos)


class _Buffer:
    """One layer's selected rows (sample index, position, stored vector bits, weight), buffered
    until every layer read has a chunk's worth."""

    def __init__(self):
        self.parts: list[tuple] = []
        self.size = 0

    def push(self, k: np.ndarray, pos: np.ndarray, h: np.ndarray, w: np.ndarray | None) -> None:
        if len(pos):
            self.parts.append((k, pos, h, w))
            self.size += len(pos)

    def take(self, rows: int) -> list[tuple]:
        """The first `rows` rows, as parts."""
        out, n = [], 0
        while n < rows:
            k, pos, h, w = self.parts[0]
            if n + len(pos) <= rows:
                out.append(self.parts.pop(0))
                n += len(pos)
                continue
            cut = rows - n
            out.append((k[:cut], pos[:cut], h[:cut], None if w is None else w[:cut]))
            self.parts[0] = (k[cut:], pos[cut:], h[cut:], None if w is None else w[cut:])
            n = rows
        self.size -= rows
        return out


def _widen(parts: list[tuple], dtype) -> np.ndarray:
    """The parts' stored vectors (float16 / float32, or bfloat16 as uint16 bits) as one [n, d] `dtype`
    array, converted straight into it (no float64 temporaries of rows that are not kept)."""
    out = np.empty((sum(len(p[1]) for p in parts), parts[0][2].shape[1]), dtype)
    i = 0
    for _, pos, h, _ in parts:
        out[i:i + len(pos)] = (h.astype(np.uint32) << 16).view(np.float32) if h.dtype == np.uint16 else h
        i += len(pos)
    return out


def layer_stream(lake: Lake, run: str, site: str, layers: list[int], mask: TokenMask, batch_rows: int = 4096,
                 dtype=np.float64, prefetch: int = 2) -> Iterator[Chunk]:
    """Selected rows of `layers` (one run, one site), aligned row for row, as `dtype` arrays, in
    chunks of `batch_rows` selected rows (the last one shorter).

    One Lance scan reads every layer asked for (`layer IN (...)`, and the span of positions the mask
    can select): the run and site filters, which decode string columns, run once over the table
    rather than once per layer. Rows are split by layer in scan order; capture writes each sample's
    (layer, site) blocks next to each other, so each layer's buffer holds about a chunk plus one
    sample's block. Only selected rows are kept and widened to `dtype`."""
    from tourray.runtime import overlapped

    ds = lake.dataset("activations", version=mask.source.get("activations_version"))  # pinned: what the plan saw
    mask.source.setdefault("activations_version", ds.version)
    order = list(dict.fromkeys(layers))

    def chunks() -> Iterator[Chunk]:
        lo, hi = mask.pos_range()
        if hi <= lo:
            return
        q = (f"run = {sql_quote(run)} AND site = {sql_quote(site)} AND layer IN ({', '.join(map(str, order))}) "
             f"AND pos >= {lo} AND pos < {hi}")
        bufs = {l: _Buffer() for l in order}
        scan = lake.scan("activations", ["sample_id", "pos", "layer", "h"], q, batch_rows * len(order), dataset=ds)

        def emit(rows: int) -> Chunk:
            parts = {l: b.take(rows) for l, b in bufs.items()}
            first = parts[order[0]]
            k, pos = np.concatenate([p[0] for p in first]), np.concatenate([p[1] for p in first])
            for l, ps in parts.items():
                if l != order[0] and not (np.array_equal(np.concatenate([p[1] for p in ps]), pos)
                                          and np.array_equal(np.concatenate([p[0] for p in ps]), k)):
                    raise UserError(f"run {run} site {site}: rows of layer {l} are not aligned with layer {order[0]} "
                                    "(same sample and position expected row for row); run `tourray verify`")
            w = None if mask.weights is None else np.concatenate([p[3] for p in first])
            return Chunk(mask.ids.take(pa.array(k)), pos, w, {l: _widen(ps, dtype) for l, ps in parts.items()})

        for b in scan:
            pos = b.column("pos").to_numpy()
            rows, k, w = mask.locate(b.column("sample_id"), pos)
            if not len(rows):
                continue
            layer = b.column("layer").to_numpy()[rows]
            h = arrow_to_numpy(b.column("h"))  # the stored bits, no copy
            if layer[0] == layer[-1] and (layer == layer[0]).all():
                groups = [(int(layer[0]), slice(None))]
            else:
                by = np.argsort(layer, kind="stable")  # stable: each layer's rows stay in scan order
                cuts = np.flatnonzero(np.diff(layer[by])) + 1
                groups = [(int(layer[g[0]]), g) for g in np.split(by, cuts)]
            for l, g in groups:
                r = rows[g]
                hl = h[r[0]:r[-1] + 1] if r[-1] - r[0] == len(r) - 1 else h[r]  # a run of rows: a view
                bufs[l].push(k[g], pos[r], hl, None if w is None else w[g])
            while min(buf.size for buf in bufs.values()) >= batch_rows:
                yield emit(batch_rows)
        while rows := min(buf.size for buf in bufs.values()):
            yield emit(min(rows, batch_rows))
        left = {l: buf.size for l, buf in bufs.items() if buf.size}
        if left:
            raise UserError(f"run {run} site {site}: layers differ in row count (rows left over: {left}); "
                            "run `tourray verify` on this lake")

    if prefetch <= 0:
        yield from chunks()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lake-read") as pool, \
            overlapped(chunks(), pool, depth=prefetch) as it:
        yield from it


def paired_stream(a: tuple[Lake, str, int, str], b: tuple[Lake, str, int, str], mask: TokenMask,
                  group_samples: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Aligned float64 rows of two streams of the same texts in two runs (or two lakes): for each
    selected token of stream a (selection: `mask`, resolved on a's run), b's vector at the same
    position when both runs used one tokenizer, else the mean of b's text-token vectors whose
    character spans overlap the a-token's span (the rotation recipe's span alignment).

    `a` and `b` are (lake, run, layer, site). Samples are matched by sample_id (a hash of path and
    text) and processed `group_samples` at a time (memory: one group of both streams); each group
    is read with a `sample_id IN (...)` filter, so the cost grows with groups x rows of one layer
    (fine to millions of tokens; a scalar index on sample_id removes it at larger scale)."""
    (lake_a, run_a, layer_a, site_a), (lake_b, run_b, layer_b, site_b) = a, b
    same_tok = _run_field(lake_a, run_a, "tokenizer_sha256") == _run_field(lake_b, run_b, "tokenizer_sha256")
    spans_b = {r["sample_id"]: r for r in lake_b.read("samples", ["sample_id", "sha256", "n_tokens"],
                                                       filter=f"run = {sql_quote(run_b)}").to_pylist()}
    texts_a = {r["sample_id"]: r for r in lake_a.read("samples", ["sample_id", "source", "sha256", "n_tokens"],
                                                       filter=f"run = {sql_quote(run_a)}").to_pylist()}
    ids = mask.ids.to_pylist()
    missing = [texts_a[s]["source"] for s in ids if s not in spans_b or spans_b[s]["sha256"] != texts_a[s]["sha256"]]
    if missing:
        raise UserError(f"runs {run_a} and {run_b} are not over the same texts: {len(missing)} selected text(s) of "
                        f"{run_a} are missing or different in {run_b} (e.g. {', '.join(missing[:3])})")
    if same_tok and (bad := [texts_a[s]["source"] for s in ids if spans_b[s]["n_tokens"] != texts_a[s]["n_tokens"]]):
        raise UserError(f"runs {run_a} and {run_b} share a tokenizer but tokenised {bad[0]} differently "
                        "(another prompt format or system prompt?)")

    def rows(lake, run, layer, site, group, table="activations", columns=("sample_id", "pos", "h"), extra=""):
        inn = ", ".join(sql_quote(s) for s in group)
        t = lake.read(table, list(columns), filter=f"run = {sql_quote(run)} AND sample_id IN ({inn})"
                      + (f" AND layer = {layer} AND site = {sql_quote(site)}" if layer is not None else "") + extra)
        return t.sort_by([("sample_id", "ascending"), ("pos", "ascending")])

    for g in range(0, len(ids), group_samples):
        group = ids[g:g + group_samples]
        ta, tb = rows(lake_a, run_a, layer_a, site_a, group), rows(lake_b, run_b, layer_b, site_b, group)
        sel, w = mask.apply(ta.column("sample_id").combine_chunks(), ta.column("pos").to_numpy())
        if len(sel) == 0:
            continue
        ta = ta.take(pa.array(sel))
        xa = arrow_to_numpy(ta.column("h"), np.float64)
        hb = arrow_to_numpy(tb.column("h"), np.float64)
        if same_tok:
            key_b = {(s, p): i for i, (s, p) in enumerate(zip(tb.column("sample_id").to_pylist(), tb.column("pos").to_pylist()))}
            xb = hb[[key_b[k] for k in zip(ta.column("sample_id").to_pylist(), ta.column("pos").to_pylist())]]
            yield xa, xb, w
            continue
        # span alignment: a-token [s, e) <- mean of b's text tokens overlapping it
        cols = ("sample_id", "pos", "char_start", "char_end")
        ka = rows(lake_a, run_a, None, None, group, "tokens", cols, " AND segment = 'text'")
        kb = rows(lake_b, run_b, None, None, group, "tokens", cols, " AND segment = 'text'")
        sid_a, pos_a = np.asarray(ta.column("sample_id").to_pylist(), object), ta.column("pos").to_numpy()
        sid_b, pos_b = np.asarray(tb.column("sample_id").to_pylist(), object), tb.column("pos").to_numpy()
        sid_ka, sid_kb = (np.asarray(k.column("sample_id").to_pylist(), object) for k in (ka, kb))
        keep, means = [], []
        for sid in dict.fromkeys(sid_a.tolist()):
            here, in_b = np.flatnonzero(sid_a == sid), np.flatnonzero(sid_b == sid)
            kas, kbs = np.flatnonzero(sid_ka == sid), np.flatnonzero(sid_kb == sid)
            if not len(kas) or not len(kbs):
                continue
            tpos_a, c0, c1 = (ka.column(c).to_numpy(zero_copy_only=False)[kas] for c in cols[1:])
            tpos_b, start_b, end_b = (kb.column(c).to_numpy(zero_copy_only=False)[kbs] for c in cols[1:])
            rows_b = in_b[np.searchsorted(pos_b[in_b], tpos_b)]        # b's text-token rows, in text order
            csum = np.vstack([np.zeros((1, hb.shape[1])), np.cumsum(hb[rows_b], 0)])
            j = np.minimum(np.searchsorted(tpos_a, pos_a[here]), len(tpos_a) - 1)
            is_text = tpos_a[j] == pos_a[here]
            s0, s1 = c0[j], c1[j]
            lo, hi = np.searchsorted(end_b, s0, "right"), np.searchsorted(start_b, s1, "left")
            ok = is_text & (s1 > s0) & (hi > lo)                        # a text token overlapping some b token
            keep.append(here[ok])
            means.append((csum[hi[ok]] - csum[lo[ok]]) / (hi[ok] - lo[ok])[:, None])
        keep = np.concatenate(keep)
        if len(keep):
            yield xa[keep], np.concatenate(means), None if w is None else w[keep]


def _run_field(lake: Lake, run: str, name: str):
    rows = lake.read("runs", [name], filter=f"run = {sql_quote(run)}").to_pylist()
    if not rows:
        raise UserError(f"no run {run!r} in {lake.root}")
    return rows[0][name]
