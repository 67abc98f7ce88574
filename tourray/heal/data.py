"""The training texts of a heal, from the lake: which samples (train / held-out split by a hash of the
sample id), the Ray Datasets that stream them (tokens and stored distribution joined per sample, read
from Lance a few samples at a time), and a batch of them as tensors.

    sample ids (small, from `samples`) ──ray.data.from_items──► map_batches(read_samples): Lance reads of
    `tokens` + `logits` for just those ids ──► one row per sample: input_ids, pos, top_ids, ... ──► workers
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tourray.errors import UserError
from tourray.lake import tables as lk
from tourray.model.prompt import right_padded

#: Rows (samples) per Lance read: one filter `sample_id IN (...)` on tokens and logits.
READ_BATCH = 8


def held_out(sample_id: str, fraction: float) -> bool:
    """The validation slice: a fixed share of sample ids by their sha256 (no seed: a heal, its resume
    and a soup judged later all hold out the same texts)."""
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction


@dataclass
class TeacherRun:
    """A teacher run as the heal reads it."""

    lake: lk.Lake
    run: str
    row: dict                 # its runs row
    spec: tuple[str, int]     # ("top", K) or ("sample", N)
    samples: list[dict]       # complete samples with text tokens: sample_id, source, sha256, n_tokens, text_start, text_end
    versions: dict[str, int]  # Lance versions of the tables read


def open_teacher(lake: lk.Lake, run: str) -> TeacherRun:
    """The run's row, its --logits setting and its complete samples; refusals name the fix."""
    row = lk.run_row(lake, run, "--teacher-run")
    cfg = (json.loads(row["manifest"]).get("config") or {})
    spec = cfg.get("logits")
    if not spec:
        raise UserError(f"--teacher-run {run}: captured without --logits, so the lake holds no teacher distribution; "
                        f"capture the texts again as a new run with `tourray capture --logits 64 ...` (or --logits sample:12)")
    if not lake.exists("logits"):
        raise UserError(f"--teacher-run {run}: the lake {lake.root} has no logits table")
    mode, _, n = str(spec).rpartition(":")
    q = f"run = {lk.sql_quote(run)}"
    samples = [s for s in lake.read("samples", ["sample_id", "source", "sha256", "n_tokens", "text_start", "text_end"],
                                    filter=q).to_pylist() if s["text_end"] > max(s["text_start"], 1)]
    if not samples:
        raise UserError(f"--teacher-run {run}: no complete sample with text tokens (is the capture finished?)")
    versions = {t: lake.dataset(t).version for t in ("samples", "tokens", "logits")}
    return TeacherRun(lake, run, row, ("sample" if mode else "top", int(n)), sorted(samples, key=lambda s: s["sample_id"]),
                      versions)


def split(samples: list[dict], fraction: float) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids), each sorted."""
    train = [s["sample_id"] for s in samples if not held_out(s["sample_id"], fraction)]
    val = [s["sample_id"] for s in samples if held_out(s["sample_id"], fraction)]
    if not train or not val:
        raise UserError(f"--val-fraction {fraction}: {len(train)} training and {len(val)} held-out texts of "
                        f"{len(samples)}; both need at least one (change --val-fraction or capture more texts)")
    return train, val


def schedule(train: list[str], rows: int, seed: int) -> list[dict]:
    """The training stream: `rows` sample ids, pass after pass over `train`, each pass in a new seeded
    order; `idx` is a row's place in the stream (what a resume skips by)."""
    out, p, rng = [], 0, np.random.default_rng(seed)
    while len(out) < rows:
        order = rng.permutation(len(train))
        out += [dict(idx=len(out) + i, sample_id=train[j], epoch=p) for i, j in enumerate(order[: rows - len(out)])]
        p += 1
    return out


SAMPLE_SCHEMA = pa.schema([
    ("idx", pa.int64()), ("sample_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("pos", pa.list_(pa.int32())),
    ("top_ids", pa.list_(pa.list_(pa.int32()))), ("top_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("rest_logprob", pa.list_(pa.float32())), ("counts", pa.list_(pa.list_(pa.int32()))),
])


def read_samples(batch: pa.Table, root: str, storage_options, run: str, versions: dict[str, int]) -> pa.Table:
    """Ray Data UDF: the rows `idx`, `sample_id` of `batch` -> one row per sample with its prompt's
    token ids and its stored distribution (text tokens), read from the pinned table versions."""
    lake = lk.Lake(root, storage_options)
    ids = batch.column("sample_id").to_pylist()
    uniq = sorted(set(ids))
    q = f"run = {lk.sql_quote(run)} AND sample_id IN ({', '.join(lk.sql_quote(s) for s in uniq)})"
    tok = lake.dataset("tokens", versions["tokens"]).to_table(columns=["sample_id", "pos", "token_id"], filter=q)
    lg = lake.dataset("logits", versions["logits"]).to_table(
        columns=["sample_id", "pos", "top_ids", "top_logprobs", "rest_logprob", "counts"], filter=q)
    tok = tok.sort_by([("sample_id", "ascending"), ("pos", "ascending")])
    lg = lg.sort_by([("sample_id", "ascending"), ("pos", "ascending")])
    per = {}
    for name, t in (("tok", tok), ("lg", lg)):
        sid = np.array(t.column("sample_id").to_pylist(), dtype=object)
        bounds = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1], True]) if len(sid) else np.array([0])
        for a, b in zip(bounds[:-1], bounds[1:]):
            per.setdefault(sid[a], {})[name] = t.slice(a, b - a)
    rows = []
    for idx, s in zip(batch.column("idx").to_pylist(), ids):
        got = per.get(s, {})
        if "tok" not in got or "lg" not in got:
            raise UserError(f"teacher run {run}: sample {s} has no tokens or logits rows (was it repaired or deleted "
                            "since the heal started?)")
        t, g = got["tok"], got["lg"]
        if t.column("pos").to_pylist() != list(range(t.num_rows)):
            raise UserError(f"teacher run {run}: sample {s}: tokens rows are not positions 0..n-1 (run tourray verify)")
        rows.append(dict(idx=idx, sample_id=s, input_ids=t.column("token_id").to_pylist(), pos=g.column("pos").to_pylist(),
                         top_ids=g.column("top_ids").to_pylist(), top_logprobs=g.column("top_logprobs").to_pylist(),
                         rest_logprob=g.column("rest_logprob").to_pylist(),
                         counts=None if g.column("counts").null_count == g.num_rows else g.column("counts").to_pylist()))
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def dataset(items: list[dict], teacher: TeacherRun):
    """A lazy Ray Dataset of `items` (idx, sample_id) in order, read from the lake `READ_BATCH`
    samples per task: nothing of the table is held beyond the rows in flight."""
    import ray

    return ray.data.from_items(items, override_num_blocks=max(1, len(items) // READ_BATCH)).map_batches(
        read_samples, batch_size=READ_BATCH, batch_format="pyarrow", num_cpus=0.25,
        fn_kwargs=dict(root=teacher.lake.root, storage_options=teacher.lake.storage_options, run=teacher.run,
                       versions=teacher.versions))


@dataclass
class Batch:
    """A padded batch: the prompts and, for each text token at pos >= 1, the row of its predicting
    position, its token, and the stored support."""

    input_ids: "object"      # long [B, T]
    attention_mask: "object"  # long [B, T]
    rows_b: "object"         # long [m]: the sample of each predicted token
    rows_t: "object"         # long [m]: the predicting position (pos - 1)
    targets: "object"        # long [m]: the token at pos
    sup_ids: "object"        # long [m, k]
    sup_logprobs: "object"   # float32 [m, k]
    rest: "object"           # float32 [m]
    weights: "object"        # float32 [m, k]: sample mode, count / N (padding 0); None for top-K
    n_tokens: int


def collate(rows: list[dict], device="cpu") -> Batch:
    """Sample rows (from `read_samples`) -> tensors; sample mode pads each token's support to the
    longest with id 0 and weight 0."""
    import torch

    ids, mask = right_padded([r["input_ids"] for r in rows])
    rb, rt, tg, sid, slp, rest, w = [], [], [], [], [], [], []
    sample_mode = any(r["counts"] is not None for r in rows)
    k = max(len(x) for r in rows for x in r["top_ids"])
    for b, r in enumerate(rows):
        x = ids[b, : len(r["input_ids"])]
        pos = torch.tensor(r["pos"], dtype=torch.long)
        rb.append(torch.full_like(pos, b))
        rt.append(pos - 1)
        tg.append(x[pos])
        for j, (ti, tl) in enumerate(zip(r["top_ids"], r["top_logprobs"])):
            pad = k - len(ti)
            sid.append(list(ti) + [0] * pad)
            slp.append(list(tl) + [0.0] * pad)
            if sample_mode:
                c = r["counts"][j]
                n = float(sum(c))
                w.append([ci / n for ci in c] + [0.0] * pad)
        rest += list(r["rest_logprob"])
    return Batch(ids.to(device), mask.to(device), torch.cat(rb).to(device), torch.cat(rt).to(device), torch.cat(tg).to(device),
                 torch.tensor(sid, dtype=torch.long, device=device), torch.tensor(slp, dtype=torch.float32, device=device),
                 torch.tensor(rest, dtype=torch.float32, device=device),
                 torch.tensor(w, dtype=torch.float32, device=device) if sample_mode else None, int(sum(len(r["pos"]) for r in rows)))
