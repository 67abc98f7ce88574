"""`CaptureStage`: the Ray Data stage that runs an engine on one group of samples and writes the
group's Lance fragments from inside the actor, returning only their metadata (bulk vectors never
enter Ray's object store)."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa

from tourray.corpus import texts as corpus
from tourray.lake import tables as lk
from tourray.capture.config import CaptureConfig
from tourray.capture.engine import INNER_SITES, Captured, Engine, RefSupport
from tourray.lake.checksum import tokens_sha256
from tourray.lake.sql import BLOCK_SUMS
from tourray.errors import UserError
from tourray.model.identity import load_tokenizer
from tourray.model.prompt import SEGMENTS, Encoded, PromptFormat
from tourray.runtime import overlapped
from tourray.stage import Stage
from tourray.stats.inline import InlineStats
from tourray.stats.tasks import moments_table
from tourray.corpus.token_class import classify

#: Order in which a group's tables are committed; `samples` last marks the group complete.
COMMIT_ORDER = ("blocks", "tokens", "activations", "token_layers", "block_sums", "moments", "logits", "samples")


def make_engine(cfg, layers: list[int], num_layers: int, stored: list[int], inner_sites: tuple[str, ...]) -> Engine:
    """The engine `cfg.engine` names, built inside the actor from the capture config and its engine
    sub-config (`cfg.hf`, `cfg.vllm`)."""
    if cfg.engine.value == "vllm":
        from tourray.capture.vllm import VLLMEngine

        return VLLMEngine(cfg, layers, num_layers, stored, inner_sites)
    from tourray.capture.hf import HFEngine

    return HFEngine.from_config(cfg, layers, num_layers, stored, inner_sites)


def shared_prefix(seqs: list[np.ndarray], limit: int) -> int:
    """How many leading tokens every sequence of a group shares, at most `limit` (the first text
    token) and leaving each sequence a token after it: the prompt an engine may run once."""
    n = min(min(len(s) for s in seqs) - 1, limit)
    if n <= 0:
        return 0
    head = np.stack([s[:n] for s in seqs])
    diff = np.flatnonzero((head != head[:1]).any(0))
    return int(diff[0]) if len(diff) else n


class CaptureStage(Stage):
    """Ray Data stage: one call = one group of samples in, one row of fragment metadata out."""

    inputs = ("sample_id", "source", "category", "text", "sha256")
    _ROWS_PER_BATCH_BYTES = 8 << 20  # ~8 MB record batches: Lance's fast path (see FIELD_GUIDE)
    _TEXT = SEGMENTS.index("text")

    def __init__(self, cfg: CaptureConfig, lake_root: str, layers: list[int], hidden_size: int, num_layers: int,
                 stored: list[int] | None = None, system_prompt: str | None = None, tokenizer=None):
        """`system_prompt` (the text) and `tokenizer` are what the driver resolved and ships, so an
        actor on another node never re-reads a file only the driver has; None: resolve from `cfg`."""
        super().__init__()
        self.cfg, self.layers = cfg, layers
        self.lake = lk.Lake(lake_root, cfg.storage_options)
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)
        if system_prompt is None:
            system_prompt = corpus.read_system_prompt(cfg.system_prompt)
        self.fmt = PromptFormat(self.tok, system_prompt, cfg.text_role, cfg.user_prompt, cfg.chat_template)
        self.engine = make_engine(cfg, layers, num_layers, stored,
                                  tuple(INNER_SITES) if {"moments", "units"} & set(cfg.stats) else ())
        residual = self.engine.keys if {"moments", "pairs"} & set(cfg.stats) else []  # units: inner sites only
        self.inline = InlineStats(residual, "pairs" in cfg.stats, self.engine.inner_keys,
                                  self.engine.num_heads) if cfg.stats else None
        self.schemas = {t: lk.schema(t, store_dtype=cfg.store_dtype.value, hidden_size=hidden_size) for t in COMMIT_ORDER}
        self._pieces: dict[int, str] = {}
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-forward")
        if cfg.gpus_per_actor == 0:  # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors: undo it
            import torch

            threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.actors)
            torch.set_num_threads(threads)
            self._forward_thread.submit(torch.set_num_threads, threads).result()  # where forwards run

    def _token_text(self, ids: np.ndarray) -> list[str]:
        missing = [int(i) for i in set(ids.tolist()) if i not in self._pieces]
        for i, s in zip(missing, self.tok.batch_decode([[i] for i in missing])):
            self._pieces[i] = s
        return [self._pieces[int(i)] for i in ids]

    def process(self, batch: pa.Table) -> pa.Table:
        cfg, run = self.cfg, self.cfg.run
        rows = batch.to_pylist()
        enc = [self.fmt.encode(r["text"], cfg.max_length) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(enc[i].input_ids))
        spans = [self._text_span(e) for e in enc]  # once per sample: the inline sink and `samples` use them
        tokens, layer_rows, blocks, nbytes, logit_rows = [], [], [], [0], []
        tokens_sha = [""] * len(rows)  # samples.tokens_sha256, of the rows exactly as written

        if self.inline is not None:
            self.inline.reset()  # a failed attempt at this group must not count twice
        ref = None if cfg.reference_run is None else self._reference_rows(rows, spans)
        prefix = shared_prefix([e.input_ids for e in enc], min(a for a, _ in spans))

        def forwards():  # on the forward thread: the model and nothing else
            for a in range(0, len(order), cfg.batch_size):
                idx = order[a : a + cfg.batch_size]
                sink = None if self.inline is None else \
                    (lambda t, n, idx=idx: self.inline(t, n, [spans[i] for i in idx]))
                yield idx, self.engine.capture([enc[i].input_ids for i in idx], sink=sink, prefix=prefix,
                                               reference=None if ref is None else [ref[i] for i in idx])

        def activation_batches(captured) -> Iterator[pa.RecordBatch]:  # here: checksums, Arrow, token tables
            pending, size = [], 0
            for idx, caps in captured:
                for i, cap in zip(idx, caps):
                    sid, e = rows[i]["sample_id"], enc[i]
                    if cap.vectors:  # first: it refuses non-finite vectors before anything of the sample is written
                        layer_rows.append(self._token_layers_table(rows[i], cap, spans[i]))
                    tokens.append(self._tokens_table(sid, rows[i]["text"], e, cap))
                    tokens_sha[i] = tokens_sha256(tokens[-1])
                    if cfg.logits is not None:
                        logit_rows.append(self._logits_table(sid, spans[i], cap))
                    for (layer, site), h in cap.vectors.items():
                        n = len(h)
                        blocks.append((sid, layer, site, 0, n, hashlib.sha256(np.ascontiguousarray(h)).hexdigest()))
                        pending.append((sid, layer, site, h))
                        size += h.nbytes
                        nbytes[0] += h.nbytes
                        if size >= self._ROWS_PER_BATCH_BYTES:
                            yield self._activations_batch(pending)
                            pending, size = [], 0
            if pending:
                yield self._activations_batch(pending)

        frags = {}
        # forward passes run ahead on their own thread while this one hashes, builds Arrow and Lance writes
        with overlapped(forwards(), self._forward_thread) as captured:
            acts = activation_batches(captured)
            if self.engine.stored_keys:
                frags["activations"] = self.lake.write_fragments("activations", acts, self.schemas["activations"])
            else:
                for _ in acts:
                    pass
        frags["tokens"] = self.lake.write_fragments("tokens", pa.concat_tables(tokens), self.schemas["tokens"])
        for table, parts in zip(("token_layers", "block_sums"), zip(*layer_rows)):
            frags[table] = self.lake.write_fragments(table, pa.concat_tables(parts), self.schemas[table])
        if cfg.logits is not None:
            frags["logits"] = self.lake.write_fragments("logits", pa.concat_tables(logit_rows), self.schemas["logits"])
        frags["blocks"] = self.lake.write_fragments("blocks", pa.table({
            "run": [run] * len(blocks),
            "sample_id": [b[0] for b in blocks],
            "layer": pa.array([b[1] for b in blocks], pa.int16()),
            "site": [b[2] for b in blocks],
            "pos_start": pa.array([b[3] for b in blocks], pa.int32()),
            "pos_end": pa.array([b[4] for b in blocks], pa.int32()),
            "sha256": [b[5] for b in blocks],
        }, schema=self.schemas["blocks"]), self.schemas["blocks"]) if blocks else []
        span_arr = np.array(spans, np.int32).reshape(-1, 2)
        samples = pa.table({
            "run": [run] * len(rows),
            **{c: [r[c] for r in rows] for c in ("sample_id", "source", "category", "text", "sha256")},
            "n_tokens": pa.array([len(e.input_ids) for e in enc], pa.int32()),
            "truncated": [e.truncated for e in enc],
            "text_start": pa.array(span_arr[:, 0]),
            "text_end": pa.array(span_arr[:, 1]),
            "tokens_sha256": tokens_sha,
        }, schema=self.schemas["samples"])
        if self.inline is not None:  # this group's partial statistics, committed with it
            parts = self.inline.part_rows(run, [r["sample_id"] for r in rows])
            frags["moments"] = self.lake.write_fragments("moments", moments_table(parts), self.schemas["moments"])
        frags["samples"] = self.lake.write_fragments("samples", samples, self.schemas["samples"])
        n_tokens = sum(len(e.input_ids) for e in enc)
        self.stats["samples"] += len(rows)
        self.stats["tokens"] += n_tokens
        return pa.table({
            "fragments": [json.dumps(frags)],
            "n_samples": [len(rows)],
            "n_tokens": [n_tokens],
            "truncated": [[r["source"] for r, e in zip(rows, enc) if e.truncated]],
            "bytes": [nbytes[0]],
        })

    def _tokens_table(self, sid: str, text: str, e: Encoded, cap: Captured) -> pa.Table:
        n = len(e.input_ids)
        in_text = e.char_start >= 0
        return pa.table({
            "run": [self.cfg.run] * n,
            "sample_id": [sid] * n,
            "pos": pa.array(np.arange(n, dtype=np.int32)),
            "token_id": pa.array(e.input_ids.astype(np.int32)),
            "token": self._token_text(e.input_ids),
            "char_start": pa.array(e.char_start, mask=~in_text),
            "char_end": pa.array(e.char_end, mask=~in_text),
            "segment": [SEGMENTS[s] for s in e.segment],
            "surprisal": pa.array(cap.surprisal, mask=np.isnan(cap.surprisal)),
            "entropy": pa.array(cap.entropy, mask=np.isnan(cap.entropy)),
            "token_class": classify(text, e.char_start, e.char_end),
            "kl_ref": pa.nulls(n, pa.float32()) if cap.kl_ref is None else pa.array(cap.kl_ref, mask=np.isnan(cap.kl_ref)),
        }, schema=self.schemas["tokens"])

    def _logits_table(self, sid: str, span: tuple[int, int], cap: Captured) -> pa.Table:
        """One sample's `logits` rows: the text tokens at pos >= 1 (the tokens surprisal is judged on),
        each with the distribution that predicted it (Support row pos - 1)."""
        sup = cap.logits
        if sup is None:
            raise RuntimeError(f"--logits {self.cfg.logits}: the {self.cfg.engine.value} engine returned no distribution")
        a, b = max(span[0], 1), span[1]
        m = max(b - a, 0)
        ids, lp, rest = sup.ids[a - 1 : b - 1], sup.logprobs[a - 1 : b - 1], sup.rest[a - 1 : b - 1]
        if sup.counts is None:
            keep = np.ones(ids.shape, bool)
            counts = pa.nulls(m, pa.list_(pa.int32()))
        else:  # sample mode: the distinct ids lead each row, padding (-1) follows
            keep = ids >= 0
        offsets = pa.array(np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32))
        if sup.counts is not None:
            counts = pa.ListArray.from_arrays(offsets, pa.array(sup.counts[a - 1 : b - 1][keep].astype(np.int32)))
        return pa.table({
            "run": pa.repeat(self.cfg.run, m),
            "sample_id": pa.repeat(sid, m),
            "pos": pa.array(np.arange(a, a + m, dtype=np.int32)),
            "top_ids": pa.ListArray.from_arrays(offsets, pa.array(ids[keep].astype(np.int32))),
            "top_logprobs": pa.ListArray.from_arrays(offsets, pa.array(lp[keep].astype(np.float32))),
            "rest_logprob": pa.array(rest.astype(np.float32)),
            "counts": counts,
        }, schema=self.schemas["logits"])

    def _reference_rows(self, rows: list[dict], spans: list[tuple[int, int]]) -> list[RefSupport]:
        """--reference-run: that run's stored distribution for this group's samples, one Lance read
        per group. Its rows must be exactly this capture's text tokens (one prompt, one truncation)."""
        ref_run = self.cfg.reference_run
        ids = ", ".join(lk.sql_quote(r["sample_id"]) for r in rows)
        t = self.lake.read("logits", ["sample_id", "pos", "top_ids", "top_logprobs", "rest_logprob"],
                           filter=f"run = {lk.sql_quote(ref_run)} AND sample_id IN ({ids})")
        t = t.sort_by([("sample_id", "ascending"), ("pos", "ascending")])
        sid = t.column("sample_id").to_numpy(zero_copy_only=False)
        pos = t.column("pos").to_numpy()
        out = []
        for r, (a, b) in zip(rows, spans):
            lo, hi = np.searchsorted(sid, r["sample_id"], "left"), np.searchsorted(sid, r["sample_id"], "right")
            want = np.arange(max(a, 1), b, dtype=np.int32)
            if not np.array_equal(pos[lo:hi], want):
                raise UserError(f"--reference-run {ref_run}: sample {r['source']} (id {r['sample_id']}) has stored rows "
                                f"for {hi - lo} text tokens, this capture {len(want)}; capture the reference with "
                                "the same system prompt, prompt settings and --max-length")
            sub = t.slice(lo, hi - lo)
            k = len(sub.column("top_ids")[0]) if hi > lo else 1
            ids, lp = (sub.column(c).combine_chunks().flatten().to_numpy().reshape(-1, k) for c in ("top_ids", "top_logprobs"))
            out.append(RefSupport(max(a, 1), ids.astype(np.int32), lp.astype(np.float32),
                                  sub.column("rest_logprob").to_numpy().astype(np.float32)))
        return out

    @classmethod
    def _text_span(cls, e: Encoded) -> tuple[int, int]:
        """[first, last + 1) of the text tokens, so readers select them by position with no join
        against `tokens` (they are contiguous); (n, n) when truncation cut them all."""
        text = np.flatnonzero(e.segment == cls._TEXT)
        n = len(e.segment)
        return (int(text[0]), int(text[-1]) + 1) if len(text) else (n, n)

    def _token_layers_table(self, row: dict, cap: Captured, span: tuple[int, int]) -> tuple[pa.Table, pa.Table]:
        """One sample's `token_layers` rows: each stored vector's norm and its cosine with layer l-1's
        resid_post (the block input), in float32 from the stored values, so that layer-similarity
        queries read scalars instead of joining vectors; and their `block_sums` (float64 sums over the
        text `span`), which `layer_similarity.sql` and `block_evidence.sql` read instead of the rows. Keeps at most two layers
        in float32.

        The norms are also the finiteness check of the stored values, at no extra pass: a vector
        with an inf or nan (a float16 overflow) has a non-finite norm, and a finite one has a finite
        norm unless its squares overflow float32 (then the values themselves decide)."""
        sid = row["sample_id"]
        keys = sorted(cap.vectors, key=lambda k: k[0])  # layer order (stable): l needs l-1's resid_post
        post: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # layer -> (float32 vectors, norms)
        norms, coss, prev_norms = [], [], []
        for layer, site in keys:
            h = self._stored_float32(cap.vectors[layer, site])
            norm = np.sqrt(np.einsum("ij,ij->i", h, h))
            if not np.isfinite(norm).all() and not np.isfinite(h).all():
                raise UserError(
                    f"sample {row['source']} (id {sid}), layer {layer}, site {site}: values are not finite in "
                    f"{self.cfg.store_dtype.value}; use --store-dtype bfloat16 or float32")
            prev = post.get(layer - 1)  # none for the embedding (-1)
            if prev is None:
                cos = np.full(len(h), np.nan, np.float32)
            else:
                with np.errstate(divide="ignore", invalid="ignore"):  # a zero vector: nan, as numpy says
                    cos = np.einsum("ij,ij->i", h, prev[0]) / (norm * prev[1])
            if site == "resid_post":
                post[layer] = (h, norm)
                post.pop(layer - 2, None)
            norms.append(norm)
            coss.append(cos)
            prev_norms.append(None if prev is None else prev[1])
        n, k = len(norms[0]), len(keys)
        sums = [_block_sums(c, nb, na, cap.entropy, span) for c, nb, na in zip(coss, norms, prev_norms)]
        sums = pa.table({
            "run": pa.repeat(self.cfg.run, k),
            "sample_id": pa.repeat(sid, k),
            "layer": pa.array([key[0] for key in keys], pa.int16()),
            "site": [key[1] for key in keys],
            "text_tokens": pa.array([x[0] for x in sums], pa.int32()),
            **{c: pa.array([x[i] for x in sums], pa.float64()) for i, c in enumerate(BLOCK_SUMS, 1)},
        }, schema=self.schemas["block_sums"])
        return pa.table({
            "run": pa.repeat(self.cfg.run, n * k),
            "sample_id": pa.repeat(sid, n * k),
            "pos": pa.array(np.tile(np.arange(n, dtype=np.int32), k)),
            "layer": pa.array(np.repeat(np.array([key[0] for key in keys], np.int16), n)),
            "site": pa.array([key[1] for key in keys]).take(pa.array(np.repeat(np.arange(k), n))),
            "norm": pa.array(np.concatenate(norms)),
            "cos_prev": pa.array(np.concatenate(coss), mask=np.repeat([p is None for p in prev_norms], n)),
        }, schema=self.schemas["token_layers"]), sums

    @staticmethod
    def _stored_float32(h: np.ndarray) -> np.ndarray:
        """Stored vectors widened (exactly) to float32; bfloat16 arrives as its uint16 bit patterns.
        torch widens half floats ~8x faster than numpy's astype, which would dominate the cost."""
        import torch

        if h.dtype == np.float32:
            return h
        t = torch.from_numpy(h.view(np.int16)).view(torch.bfloat16) if h.dtype == np.uint16 else torch.from_numpy(h)
        return t.float().numpy()

    def _activations_batch(self, pending) -> pa.RecordBatch:
        n = [len(h) for *_, h in pending]
        total = sum(n)
        h = np.concatenate([h for *_, h in pending])
        return pa.RecordBatch.from_arrays([
            pa.array([self.cfg.run] * total),
            pa.array(np.repeat([p[0] for p in pending], n).tolist()),
            pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in n])),
            pa.array(np.repeat(np.array([p[1] for p in pending], np.int16), n)),
            pa.array(np.repeat([p[2] for p in pending], n).tolist()),
            lk.vectors_to_arrow(h, self.cfg.store_dtype.value),
        ], schema=self.schemas["activations"])


def _block_sums(cos: np.ndarray, norm: np.ndarray, prev_norm: np.ndarray | None, entropy: np.ndarray,
                span: tuple[int, int]) -> tuple:
    """One block's `block_sums` over the text `span`, in float64 from the float32 values written to
    `token_layers` and `tokens`: (text tokens, *BLOCK_SUMS, in the schema's order). No input block (the
    embedding): zeros."""
    a, b = span
    if prev_norm is None or b <= a:
        return (0,) + (0.0,) * len(BLOCK_SUMS)
    c, nb, na = (x[a:b].astype(np.float64) for x in (cos, norm, prev_norm))
    e = np.append(entropy[1:], np.nan)[a:b].astype(np.float64)  # next-token entropy (stored at pos + 1)
    has_e = ~np.isnan(e)
    with np.errstate(divide="ignore", invalid="ignore"):
        upd = np.sqrt(np.maximum(nb * nb + na * na - 2 * na * nb * c, 0))
        return (b - a, c.sum(), (np.arccos(np.clip(c, -1.0, 1.0)) / np.pi).sum(), e[has_e].sum(),
                (e * c)[has_e].sum(), upd.sum(), (upd / na).sum())
