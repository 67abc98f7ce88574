"""Statistics accumulated inside the capture actor, from the hooked tensors themselves.

`InlineStats` is a capture sink: the engine hands it every hooked tensor of a batch in the model's
dtype, on the model's device, before the store-dtype cast; it selects text tokens (the same rule as
`tourray stats`' default selection) and updates float64 `Moments` / `CrossMoments` there. A group's
accumulators are written as `moments` rows of kind `*_part` and committed with the group, before
its `samples` rows, so a killed capture keeps exactly the parts of committed groups and resumes
without counting a group twice. `finalize` merges the parts of a run into the same `layer_stats`,
`pair_stats` and `moments` rows that `tourray stats` writes (origin `capture`).

Besides the residual stream it accumulates what width pruning needs and is never stored as vectors:
per-channel moments of the MLP activation (input of down_proj, d_ff wide) and of per-head output
norms (input of o_proj, one norm per head).
"""

from __future__ import annotations

import hashlib
import logging

import pyarrow as pa

from tourray.lake import tables as lk
from tourray.stats.moments import CrossMoments, Moments
from tourray.stats.stream import Selection, complete_samples, source_digest

log = logging.getLogger("tourray")

#: Token selection of inline statistics: text tokens, unit weights (= `tourray stats` defaults).
INLINE_SELECTION = Selection()


def group_key(sample_ids: list[str]) -> str:
    """Identity of a capture group's partial statistics."""
    return "group:" + hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()[:24]


class InlineStats:
    """Per-group accumulators for the hooked keys, fed by the engine."""

    def __init__(self, keys: list[tuple[int, str]], pairs: bool, inner_keys: list[tuple[int, str]],
                 num_heads: int, near_zero: float = 1e-3):
        self.keys, self.inner_keys = set(keys), set(inner_keys)
        self.num_heads, self.near_zero = num_heads, near_zero
        by_site: dict[str, list[int]] = {}
        for layer, site in keys:
            by_site.setdefault(site, []).append(layer)
        # consecutive pairs per site, as `tourray stats --pairs consecutive` forms them: second -> first
        self.pair_of = {(b, site): (a, site) for site, ls in by_site.items() for a, b in zip(sorted(ls), sorted(ls)[1:])} \
            if pairs else {}
        self._firsts = set(self.pair_of.values())
        self.reset()

    def reset(self) -> None:
        self.moments: dict[tuple[int, str], Moments] = {}
        self.cross: dict[tuple, CrossMoments] = {}
        self._mask_key, self._text, self._held = None, None, {}

    def __call__(self, tensors: dict, lengths: list[int], spans: list[tuple[int, int]]) -> None:
        """Update from hooked tensors of one padded batch [B, T, ...], any subset of the keys at a
        time (an engine calls from each hook, in layer order); `spans[i]` is sample i's
        [text_start, text_end). A pair's first member is held (its text rows, float64) until its
        second arrives, so memory is a layer's rows per site, not the batch's tensors."""
        import torch

        any_t = next(iter(tensors.values()))
        T = any_t.shape[1]
        mask_key = (T, tuple(lengths), tuple(spans), any_t.device)
        if mask_key != self._mask_key:  # a new batch
            pos = torch.arange(T, device=any_t.device)[None, :]
            start = torch.tensor([s for s, _ in spans], device=any_t.device)[:, None]
            end = torch.tensor([min(e, n) for (_, e), n in zip(spans, lengths)], device=any_t.device)[:, None]
            text = (pos >= start) & (pos < end)  # [B, T]
            self._mask_key, self._text, self._held = mask_key, text if bool(text.any()) else None, {}
        text = self._text
        if text is None:
            return
        for k in sorted(tensors, key=lambda k: k[0]):  # layer order: a pair's first member comes first
            # the model's dtype: `Moments` widens to float64 itself, after its exact |x| passes
            x = tensors[k][text]
            if k in self.keys:
                self.moments.setdefault(k, Moments(x.shape[1], near_zero=self.near_zero)).update(x)
                a = self.pair_of.get(k)
                rows = x.to(torch.float64) if a is not None or k in self._firsts else None
                if a is not None:
                    first = self._held.pop(a)
                    self.cross.setdefault((a, k), CrossMoments(first.shape[1], rows.shape[1])).update(first, rows)
                if k in self._firsts:
                    self._held[k] = rows
            elif k in self.inner_keys:
                if k[1] == "head_out":  # [n, H * head_dim] -> per-head norms [n, H]
                    x = torch.linalg.vector_norm(x.reshape(x.shape[0], self.num_heads, -1), dim=-1, dtype=torch.float64)
                self.moments.setdefault(k, Moments(x.shape[1], full=False, near_zero=self.near_zero)).update(x)

    def part_rows(self, run: str, sample_ids: list[str]) -> list[dict]:
        """This group's accumulators as `moments` rows (kind *_part), then reset."""
        from tourray.stats.tasks import _provenance, moments_row

        key = dict(run=run, selection=INLINE_SELECTION.key(), source=group_key(sample_ids))
        prov = _provenance({"group": sorted(sample_ids)})
        rows = []
        for (layer, site), m in self.moments.items():
            kind = "layer_part" if site in ("resid_post", "resid_mid") else f"{'mlp' if site == 'mlp_act' else 'head'}_part"
            rows.append(moments_row(dict(key, site=site), kind, layer, layer, m.to_numpy(), prov))
        for ((a, site), (b, _)), x in self.cross.items():
            rows.append(moments_row(dict(key, site=site), "pair_part", a, b, x.to_numpy(), prov))
        self.reset()
        return rows


#: The run manifest's mark of a finished merge: the source digest of the samples it merged.
MERGED_MARK = "inline_stats_merged"


def finalized(lake: lk.Lake, run: str) -> bool:
    """Whether `finalize` completed for the run's current complete samples: its manifest carries the
    mark with their digest. Decided per run (a lake-wide test, such as "layer_stats exists", skips
    the merge of a run killed inside it for good)."""
    from tourray.lake.runs import read_manifest

    mark = read_manifest(lake, run).get(MERGED_MARK)
    return mark is not None and mark == source_digest(complete_samples(lake, run))


def finalize(lake: lk.Lake, run: str) -> dict:
    """Merge a run's committed parts into `layer_stats`, `pair_stats` and `moments` (kinds layer,
    pair, mlp, head), keyed like `tourray stats` output so that it reuses them. Streams the parts one
    row at a time: memory is one accumulator per key.

    Crash-safe: the new merged rows are committed first, then the run's older merged rows (all but
    this merge's, told apart by their `sources`) are deleted, and last the manifest gets the mark
    (`finalized`). A merge killed at any point leaves the previous merged rows readable and no mark,
    so the next capture of the run merges again."""
    import uuid

    from tourray.lake.runs import update_manifest
    from tourray.stats.linalg import cka
    from tourray.stats.tasks import _provenance, layer_row, moment_rows, moments_from_row, moments_row, moments_table

    q = lk.sql_quote(run)
    samples = complete_samples(lake, run)
    digest = source_digest(samples)
    sel = INLINE_SELECTION.key()
    merged: dict[tuple, object] = {}
    groups = set()
    for batch in lake.scan("moments", filter=f"run = {q} AND kind LIKE '%_part'", batch_rows=1):
        for r, matrix in moment_rows(batch):
            k = (r["kind"], r["layer_a"], r["layer_b"], r["site"])
            m = moments_from_row(r, matrix)
            merged[k] = merged[k].merge(m) if k in merged else m
            groups.add(r["source"])
    if not merged:
        return {}
    # `merge`: this merge's id, so that its rows are told apart from an earlier (or interrupted) one's
    prov = _provenance({"capture_groups": len(groups), "samples_version": lake.dataset("samples").version,
                        "merge": uuid.uuid4().hex[:16]})
    key = dict(run=run, selection=sel, source=digest)
    mrows, lrows, prows = [], [], []
    for (kind, a, b, site), m in sorted(merged.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][1])):
        final = kind.removesuffix("_part")
        mrows.append(moments_row(dict(key, site=site), final, a, b, m, prov))
        if kind == "layer_part":
            lrows.append(layer_row(dict(key, layer=a, site=site), m, "capture", prov))
        elif kind == "pair_part":
            ma, mb = merged[("layer_part", a, a, site)], merged[("layer_part", b, b, site)]
            prows.append(dict(key, layer_a=a, layer_b=b, site=site, origin="capture", n_tokens=m.n, weight_sum=m.w,
                              mean_cos=m.mean_cos, mean_angular=m.mean_angular, cka=cka(ma, mb, m),
                              rel_rms_diff=m.rel_rms_diff, **prov))
    for t in ("moments", "layer_stats", "pair_stats"):
        lake.ensure(t, lk.schema(t))
    # the new rows first (matrices before the summaries that imply them) ...
    lake.append("moments", moments_table(mrows), lk.schema("moments"))
    for table, rows in (("layer_stats", lrows), ("pair_stats", prows)):
        if rows:
            s = lk.schema(table)
            lake.append(table, pa.Table.from_pylist(rows, schema=s), s)
    # ... then the rows they replace: a re-finalised run (resumed capture, or a merge killed midway)
    # keeps only this merge's
    mine = lk.sql_quote(prov["sources"])
    lake.delete("moments", f"run = {q} AND selection = {lk.sql_quote(sel)} AND source = {lk.sql_quote(digest)} "
                           f"AND kind NOT LIKE '%_part' AND sources != {mine}")
    lake.delete("layer_stats", f"run = {q} AND origin = 'capture' AND sources != {mine}")
    lake.delete("pair_stats", f"run = {q} AND origin = 'capture' AND sources != {mine}")
    update_manifest(lake, run, **{MERGED_MARK: digest})
    return dict(groups=len(groups), layers=len(lrows), pairs=len(prows), inner=len(mrows) - len(lrows) - len(prows))
