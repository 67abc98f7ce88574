"""`tourray verify`: is every committed sample complete, unduplicated and intact?

Only complete samples count (those with a `samples` row; the capture driver commits it last, so
rows of a sample without one are a killed run's leftovers, which a re-run deletes). For each:

- completeness: every (layer, site) block the run stores is recorded once in `blocks` and has
  rows in `activations` and in `token_layers`, each once, positions 0..n_tokens-1 in order; its
  `tokens` rows are positions 0..n_tokens-1, once each;
- integrity: each activation block's h bytes hash to the sha256 recorded in `blocks`, and each
  sample's `tokens` rows to `samples.tokens_sha256` (tourray/lake/checksum.py, the function capture
  used), so a changed value or a flipped byte names its sample and file. `token_layers` holds
  scalars derived from the vectors and has no checksum; lakes whose samples predate
  tokens_sha256 (schema v2) get their tokens checked by position only, with a note;
- readability: a data file Lance cannot decode, or one that is gone, is named as a problem;
- `logits` (runs captured with --logits): one row per text token at pos >= 1 of each complete sample
  (positions max(text_start, 1) .. text_end - 1, once each, in order), none for runs without it. Its
  values carry no checksum (like `token_layers`): rows and positions are what is checked.

`activations`, `token_layers` and `tokens` are read fragment by fragment in parallel Ray tasks (one
per group of consecutive fragments); each returns one small record (with a running sha256) per
contiguous run of rows of a key, which the driver merges; a run cut by a fragment boundary is
re-hashed from just those fragments. Memory is one batch per task plus one record per block,
flat in lake size.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tourray.lake.checksum import TOKEN_COLUMNS, tokens_bytes
from tourray.lake.sql import BLOCK_SUMS, block_sums_from_rows, connect
from tourray.lake.tables import Lake, arrow_to_numpy, run_row, sql_quote

ACT_KEY = ("run", "sample_id", "layer", "site")
TOK_KEY = ("run", "sample_id")


class Hashed(NamedTuple):
    """What a table's checksum covers: the columns to read and their bytes for a batch of rows.
    The bytes must concatenate (rows [a, c) = [a, b) then [b, c)) so runs hash batch by batch."""

    columns: tuple[str, ...]
    to_bytes: Callable[[pa.RecordBatch], bytes]


def _h_bytes(b: pa.RecordBatch) -> bytes:
    return np.ascontiguousarray(arrow_to_numpy(b.column("h"))).tobytes()


ACT_HASH = Hashed(("h",), _h_bytes)                       # blocks.sha256
TOK_HASH = Hashed(tuple(TOKEN_COLUMNS), tokens_bytes)     # samples.tokens_sha256


@dataclass
class Report:
    """What `verify` checked and found; `notes` say what was skipped or could not be checked."""

    blocks: int = 0
    samples: int = 0
    token_rows: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Seg:
    """One contiguous run of rows of one key inside one fragment."""

    key: tuple
    start: int
    rows: int
    bad: tuple | None        # first (wanted, found) position that broke the run, else None
    sha: str | None
    frag: int                # index of its fragment in the table's fragment list
    first: bool              # first segment of its fragment
    last: bool               # last segment of its fragment

    @property
    def end(self) -> int:
        return self.start + self.rows


def _files(frag) -> str:
    return ", ".join(f"data/{d.path}" for d in frag.data_files())


def _scan_fragments(uri: str, version: int, storage_options, table: str, indexes: list[int], key: tuple[str, ...],
                    hashed: Hashed | None, where: str | None, batch_rows: int = 4096):
    """Segments of fragments `indexes` of one table version, plus problems for unreadable files.
    Runs as a Ray task: opens the dataset itself and returns only small records."""
    import lance

    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    frags = ds.get_fragments()
    segs, problems, rows = [], [], 0
    for i in indexes:
        frag = frags[i]
        out: list[_Seg] = []
        cur = None
        try:
            cols = list(dict.fromkeys([*key, "pos", *(hashed.columns if hashed else ())]))
            for b in ds.scanner(fragments=[frag], columns=cols, filter=where, batch_size=batch_rows,
                                scan_in_order=True).to_batches():
                if not b.num_rows:
                    continue
                rows += b.num_rows
                kc = [b.column(c).to_numpy(zero_copy_only=False) for c in key]
                pos = b.column("pos").to_numpy()
                change = np.zeros(len(b), bool)
                change[0] = True
                for c in kc:
                    change[1:] |= c[1:] != c[:-1]
                starts = np.flatnonzero(change).tolist() + [len(b)]
                for a, z in zip(starts[:-1], starts[1:]):
                    k = tuple(c[a].item() if hasattr(c[a], "item") else c[a] for c in kc)
                    if cur is None or k != cur[0].key:
                        if cur is not None:
                            cur[0].sha = cur[1].hexdigest() if cur[1] else None
                            out.append(cur[0])
                        cur = (_Seg(k, int(pos[a]), 0, None, None, i, not out, False),
                               hashlib.sha256() if hashed else None)
                    seg, hasher = cur
                    p, want = pos[a:z], np.arange(seg.end, seg.end + (z - a))
                    if seg.bad is None and not np.array_equal(p, want):
                        j = int(np.flatnonzero(p != want)[0])
                        seg.bad = (int(want[j]), int(p[j]))
                    seg.rows += z - a
                    if hasher:
                        hasher.update(hashed.to_bytes(b.slice(a, z - a)))
        except Exception as e:  # noqa: BLE001 - any decode/IO failure is a verify finding, not a crash
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"table {table} fragment {frag.fragment_id} ({_files(frag)}): unreadable: {msg[:300]}")
            continue
        if cur is not None:
            cur[0].sha = cur[1].hexdigest() if cur[1] else None
            out.append(cur[0])
        if out:
            out[-1].last = True
        segs += out
    return segs, problems, rows


def _scan_table(ray, lake: Lake, table: str, key, hashed, where, bar) -> tuple[list[_Seg], list[str], object]:
    """All segments of `table` in physical order, scanned by parallel Ray tasks. A task that dies
    (Lance can abort the process on a corrupt file) is re-run fragment by fragment, so the problem
    names the one file that kills its reader and the others are still checked."""
    ds = lake.dataset(table)
    frags = ds.get_fragments()
    n = len(frags)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per = max(1, -(-n // (4 * cpus)))  # ~4 tasks per CPU: balance without a task per tiny fragment
    task = ray.remote(num_cpus=1, max_retries=1)(_scan_fragments)  # a corrupt file crashes it every time

    def submit(indexes):
        return task.remote(ds.uri, ds.version, lake.storage_options, table, indexes, key, hashed, where)

    refs = {submit(list(range(i, min(i + per, n)))): list(range(i, min(i + per, n))) for i in range(0, n, per)}
    parts, pending = {}, list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        indexes = refs[done[0]]
        try:
            segs, problems, rows = ray.get(done[0])
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as e:  # a finding, not a crash
            if len(indexes) > 1:
                more = {submit([i]): [i] for i in indexes}
                refs.update(more)
                pending += list(more)
                continue
            frag, msg = frags[indexes[0]], (str(e).strip().splitlines() or [type(e).__name__])[-1]
            segs, rows = [], 0
            problems = [f"table {table} fragment {frag.fragment_id} ({_files(frag)}): unreadable: its reader died "
                        f"({msg[:300]})"]
        parts[indexes[0]] = (segs, problems)
        bar.update(rows)
    segs = [s for i in sorted(parts) for s in parts[i][0]]
    return segs, [p for i in sorted(parts) for p in parts[i][1]], ds


def _merge(segs: list[_Seg]) -> list[list[_Seg]]:
    """Chain segments that continue a key across a fragment boundary (one block split by
    compaction): each chain is one physically contiguous run of one key."""
    chains: list[list[_Seg]] = []
    for s in segs:
        prev = chains[-1][-1] if chains else None
        if prev is not None and prev.key == s.key and prev.last and s.first and s.frag == prev.frag + 1:
            chains[-1].append(s)
        else:
            chains.append([s])
    return chains


def _sha(ds, chain: list[_Seg], key: tuple[str, ...], hashed: Hashed) -> str:
    """sha256 of one chain: its task's running hash, or, for a key split across fragments (whose
    hashes ran in separate tasks), a re-read of just those fragments filtered to it."""
    if len(chain) == 1:
        return chain[0].sha
    frags = ds.get_fragments()
    where = " AND ".join(f"{c} = {sql_quote(v) if isinstance(v, str) else v}" for c, v in zip(key, chain[0].key))
    hasher = hashlib.sha256()
    for b in ds.scanner(fragments=[frags[s.frag] for s in chain], columns=list(hashed.columns), filter=where,
                        scan_in_order=True).to_batches():
        hasher.update(hashed.to_bytes(b))
    return hasher.hexdigest()


def _gap(chain: list[_Seg]) -> tuple | None:
    """First (wanted, found) position that breaks a chain: inside a fragment, or at a boundary."""
    return next((s.bad for s in chain if s.bad), None) or next(
        ((a.end, b.start) for a, b in zip(chain, chain[1:]) if b.start != a.end), None)


def _read_small(lake: Lake, table: str, columns: list[str], where: str | None, report: Report) -> pa.Table | None:
    """A small table read whole; if Lance cannot read it, name each bad fragment and return None."""
    try:
        return lake.read(table, columns, filter=where)
    except Exception:  # noqa: BLE001 - find and name the unreadable file(s)
        ds = lake.dataset(table)
        for frag in ds.get_fragments():
            try:
                ds.scanner(fragments=[frag], columns=columns, filter=where).to_table()
            except Exception as e:  # noqa: BLE001
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                report.problems.append(f"table {table} fragment {frag.fragment_id} ({_files(frag)}): unreadable: {msg[:300]}")
        return None


def _rows_to_scan(lake: Lake, tables: tuple[str, ...], where: str | None) -> int | None:
    """The progress bar's total. A filtered count reads the data files, so a missing or unreadable one
    would fail here, before the per-fragment scan that names it: then the bar has no total."""
    try:
        return sum(lake.dataset(t).count_rows(filter=where) for t in tables if lake.exists(t))
    except Exception:  # noqa: BLE001 - the scan reports the bad file as a problem
        return None


def stored_keys(run: dict) -> list[tuple[int, str]]:
    """(layer, site) the run stores: the embedding (-1) has no mid-block site, as in every engine."""
    return [(l, s) for l in expected_layers(run) for s in run["sites"] if l != -1 or s == "resid_post"]


def expected_layers(run: dict) -> list[int]:
    """The layers whose vectors a run stores: its hooked layers, narrowed by --store."""
    from tourray.config import parse_layers

    store = (json.loads(run["manifest"]).get("config") or {}).get("store", "all") or "all"
    hooked = list(run["layers"] or [])
    return hooked if store.strip().lower() == "all" else [l for l in parse_layers(store, run["num_layers"]) if l in hooked]


def verify_lake(lake: str | Lake, run: str | None = None, progress: bool = False) -> Report:
    """Check completeness, duplicates and checksums of the complete samples of `run` (or all runs)."""
    from tqdm import tqdm

    from tourray.runtime import init_ray

    lake = lake if isinstance(lake, Lake) else Lake(lake)
    report = Report()
    where = f"run = {sql_quote(run)}" if run else None
    if not lake.exists("runs"):
        run_row(lake, run or "")  # the one error for a folder without tourray tables
    runs_t = _read_small(lake, "runs", None, where, report)
    if runs_t is None:
        report.notes.append("runs is unreadable: nothing else was checked")
        return report
    if run and not runs_t.num_rows:
        run_row(lake, run)  # names the runs there are
    runs = runs_t.to_pylist()
    sam_schema = lake.dataset("samples").schema if lake.exists("samples") else pa.schema([])
    has_sha = "tokens_sha256" in sam_schema.names
    has_span = "text_start" in sam_schema.names
    samples = _read_small(lake, "samples", ["run", "sample_id", "n_tokens", "source"] + ["tokens_sha256"] * has_sha
                          + ["text_start", "text_end"] * has_span, where, report)
    blocks = _read_small(lake, "blocks", ["run", "sample_id", "layer", "site", "pos_start", "pos_end", "sha256"],
                         where, report) if lake.exists("blocks") else pa.table({})
    if samples is None or blocks is None:
        report.notes.append("samples or blocks is unreadable: nothing else was checked")
        return report
    info = {(r["run"], r["sample_id"]): r for r in samples.to_pylist()}
    n_tokens = {k: r["n_tokens"] for k, r in info.items()}
    report.samples = len(n_tokens)
    if samples.num_rows != len(n_tokens):
        dup = samples.group_by(["run", "sample_id"]).aggregate([("n_tokens", "count")]).filter(
            pc.greater(pc.field("n_tokens_count"), 1)).to_pylist()
        report.problems += [f"run {r['run']} sample {r['sample_id']}: {r['n_tokens_count']} rows in samples (expected 1)"
                            for r in dup]

    def name(k):
        return f"run {k[0]} sample {k[1]} layer {k[2]} site {k[3]}"

    orphans: set[tuple] = set()
    expected: dict[tuple, tuple] = {}  # blocks: key -> (pos_start, pos_end, sha256)
    for r in (blocks.to_pylist() if blocks.num_rows else []):
        k = (r["run"], r["sample_id"], r["layer"], r["site"])
        if k[:2] not in n_tokens:
            orphans.add(k[:2])
        elif k in expected:
            report.problems.append(f"{name(k)}: recorded more than once in blocks")
        else:
            expected[k] = (r["pos_start"], r["pos_end"], r["sha256"])
    report.blocks = len(expected)
    by_run = {r["run"]: r for r in runs}
    stored = {rn: stored_keys(r) for rn, r in by_run.items()}
    per_run: dict[tuple, tuple] = {}  # what the run stores: key -> (0, n_tokens, None), for token_layers
    for (rn, sid), n in n_tokens.items():
        if rn not in by_run:
            report.problems.append(f"run {rn} sample {sid}: has a samples row but no runs row")
            continue
        for layer, site in stored[rn]:
            k = (rn, sid, layer, site)
            per_run[k] = (0, n, None)
            if k not in expected:
                report.problems.append(f"{name(k)}: expected by the run but not recorded in blocks")
            elif expected[k][:2] != (0, n):
                s, e = expected[k][:2]
                report.problems.append(f"{name(k)}: span {s}-{e} does not cover the sample's {n} tokens")
    report.problems += [f"{name(k)}: recorded in blocks but the run does not store it" for k in expected
                        if k[0] in stored and k[2:] not in stored[k[0]]]

    ray = init_ray()
    tables = ("activations", "token_layers", "tokens", "logits")
    bar = tqdm(total=_rows_to_scan(lake, tables, where), unit="row", disable=not progress, desc="verify")

    def scan_blocks(table: str, want: dict[tuple, tuple], hashed: Hashed | None) -> set[tuple]:
        """`table`'s (sample, layer, site) runs of rows against `want` (key -> (start, end, sha256 or
        None)): each once, in pos order, spanning and hashing as wanted. Returns the keys seen."""
        segs, problems, ds = _scan_table(ray, lake, table, ACT_KEY, hashed, where, bar)
        report.problems += problems
        tag, source = ("", "recorded") if table == "activations" else (f" {table}", "expected")
        seen: set[tuple] = set()
        for chain in _merge(segs):
            k = chain[0].key
            if k[:2] not in n_tokens:
                orphans.add(k[:2])
                continue
            if k in seen:
                report.problems.append(f"{name(k)}{tag}: rows are not contiguous (block appears twice)")
            seen.add(k)
            start, end = chain[0].start, chain[0].start + sum(s.rows for s in chain)
            if (bad := _gap(chain)) is not None:
                report.problems.append(f"{name(k)}{tag}: positions out of order or missing at pos {bad[0]} "
                                       f"(found {bad[1]})")
            w = want.get(k)
            if w is None:
                report.problems.append(f"{name(k)}{tag}: rows with no record in blocks" if hashed else
                                       f"{name(k)}{tag}: rows for a block the run does not store")
            elif (start, end) != w[:2]:
                report.problems.append(f"{name(k)}{tag}: span {start}-{end} differs from {source} {w[0]}-{w[1]}")
            elif hashed and _sha(ds, chain, ACT_KEY, hashed) != w[2]:
                report.problems.append(f"{name(k)}{tag}: sha256 differs from the recorded checksum")
        return seen

    seen = scan_blocks("activations", expected, ACT_HASH) if lake.exists("activations") else set()
    report.problems += [f"{name(k)}: recorded in blocks but has no rows" for k in sorted(expected.keys() - seen, key=str)]
    if lake.exists("token_layers"):
        seen = scan_blocks("token_layers", per_run, None)
        report.problems += [f"{name(k)} token_layers: expected by the run but has no rows"
                            for k in sorted(per_run.keys() - seen, key=str)]
    elif per_run:
        report.problems.append(f"table token_layers is missing: the runs store {len(per_run)} blocks of it")

    tok_seen: dict[tuple, int] = {}
    if lake.exists("tokens"):
        segs, problems, ds = _scan_table(ray, lake, "tokens", TOK_KEY, TOK_HASH if has_sha else None, where, bar)
        report.problems += problems
        frags = ds.get_fragments()
        for chain in _merge(segs):
            k = chain[0].key
            if k not in n_tokens:
                orphans.add(k)
                continue
            rows = sum(s.rows for s in chain)
            report.token_rows += rows
            tok = f"run {k[0]} sample {k[1]} tokens"
            if k in tok_seen:
                report.problems.append(f"{tok}: rows are not contiguous or duplicated (another run of its rows, "
                                       f"pos {chain[0].start}-{chain[0].start + rows - 1})")
                continue
            tok_seen[k] = rows
            n = n_tokens[k]
            bad = (0, chain[0].start) if chain[0].start != 0 else _gap(chain)
            if bad is not None:
                report.problems.append(f"{tok}: positions out of order or missing at pos {bad[0]} (found {bad[1]})")
            if rows != n:
                report.problems.append(f"{tok}: {rows} rows, samples says n_tokens {n}")
            elif bad is None and has_sha and _sha(ds, chain, TOK_KEY, TOK_HASH) != info[k]["tokens_sha256"]:
                files = ", ".join(_files(frags[s.frag]) for s in chain)
                report.problems.append(f"run {k[0]} sample {k[1]} ({info[k]['source']}) tokens: rows differ from "
                                       f"samples.tokens_sha256 (in {files})")
    report.problems += [f"run {k[0]} sample {k[1]} tokens: no rows for a complete sample"
                        for k in sorted(n_tokens.keys() - tok_seen.keys())]
    _check_logits(ray, lake, by_run, info if has_span else {}, where, bar, report, orphans)
    if per_run and has_span:  # last: its sums are compared only for samples whose rows checked clean
        _check_block_sums(lake, per_run, where, report, name)
    bar.close()
    if not has_sha and n_tokens:
        version = (sam_schema.metadata or {}).get(b"tourray.schema_version", b"1").decode()
        report.notes.append(f"tokens not checksummed (samples schema v{version}, before tokens_sha256): "
                            "their rows were checked by count and position (0..n-1) only")
    if orphans:
        report.notes.append(f"ignored rows of {len(orphans)} incomplete sample(s) with no samples row "
                            "(an interrupted capture; re-running it removes them)")
    return report


def _check_block_sums(lake: Lake, per_run: dict[tuple, tuple], where, report: Report, name) -> None:
    """`block_sums` against a recomputation from `token_layers`: one row per stored block of each
    complete sample, the same text-token count, sums within 1e-9 per token (float64 sums of the same
    float32 values, in another order). A sample with no rows at all was captured before the table
    existed: a note (`layer_similarity.sql` reads its token rows; `tourray optimize` writes them)."""
    stored = _read_small(lake, "block_sums", ["run", "sample_id", "layer", "site", "text_tokens", *BLOCK_SUMS],
                         where, report) if lake.exists("block_sums") else pa.table({})
    if stored is None:
        return
    complete = {k[:2] for k in per_run}
    have: dict[tuple, dict] = {}
    for r in (stored.to_pylist() if stored.num_rows else []):
        k = (r["run"], r["sample_id"], r["layer"], r["site"])
        if k[:2] not in complete:  # an incomplete sample's leftovers (noted by the scans above)
            continue
        if k in have:
            report.problems.append(f"{name(k)} block_sums: recorded more than once")
        elif k not in per_run:
            report.problems.append(f"{name(k)} block_sums: a row for a block the run does not store")
        have[k] = r
    with_rows = {k[:2] for k in have}
    without = complete - with_rows
    report.problems += [f"{name(k)} block_sums: no row (the sample has rows for other blocks)"
                        for k in sorted(per_run, key=str) if k[:2] in with_rows and k not in have]
    if without:
        report.notes.append(f"{len(without)} complete sample(s) have no block_sums rows (captured before that table "
                            "existed): layer_similarity reads their token_layers rows; `tourray optimize` writes them")
    try:
        con = connect(lake)
        again = [block_sums_from_rows(con, rn) for rn in sorted({k[0] for k in per_run if k[:2] in with_rows})]
    except Exception as e:  # noqa: BLE001 - an unreadable token_layers file is named by the scan above
        report.notes.append(f"block_sums not recomputed: token_layers could not be read whole ({str(e)[:200]})")
        return
    # a sample already named (a missing, doubled or changed token row) would have its sums named again
    # for the same cause: only samples whose rows checked clean are compared (run names have no spaces)
    named = {m.groups() for p in report.problems if (m := re.match(r"run (\S+) sample (\S+) ", p))}
    for r in (row for t in again for row in t.to_pylist()):
        k = (r["run"], r["sample_id"], r["layer"], r["site"])
        got = have.get(k)
        if got is None or k[:2] in named:
            continue
        if got["text_tokens"] != r["text_tokens"]:
            report.problems.append(f"{name(k)} block_sums: {got['text_tokens']} text tokens, token_layers has "
                                   f"{r['text_tokens']}")
        elif bad := [c for c in BLOCK_SUMS if not np.isclose(got[c], r[c], rtol=0, equal_nan=True,
                                                                 atol=1e-9 * max(1, r["text_tokens"], abs(r[c])))]:
            report.problems.append(f"{name(k)} block_sums: sums differ from token_layers' rows ("
                                   + ", ".join(f"{c} {got[c]!r} against {r[c]!r}" for c in bad) + ")")


def _logits_spans(by_run: dict, info: dict) -> dict[tuple, tuple[int, int]]:
    """(run, sample) -> the [start, end) positions its `logits` rows must cover, for runs captured
    with --logits: the text tokens at pos >= 1 (the ones with a surprisal)."""
    with_logits = {rn for rn, r in by_run.items() if (json.loads(r["manifest"]).get("config") or {}).get("logits")}
    return {k: (max(r["text_start"], 1), r["text_end"]) for k, r in info.items() if k[0] in with_logits}


def _check_logits(ray, lake: Lake, by_run: dict, info: dict, where, bar, report: Report, orphans: set) -> None:
    want = _logits_spans(by_run, info)
    if not lake.exists("logits"):
        if want:
            report.problems.append(f"table logits is missing: {len(want)} complete sample(s) of runs captured with "
                                   "--logits need it")
        return
    segs, problems, _ = _scan_table(ray, lake, "logits", TOK_KEY, None, where, bar)
    report.problems += problems
    seen: set[tuple] = set()
    for chain in _merge(segs):
        k = chain[0].key
        if k not in info:
            orphans.add(k)
            continue
        name = f"run {k[0]} sample {k[1]} ({info[k]['source']}) logits"
        if k not in want:
            report.problems.append(f"{name}: rows, but run {k[0]} was not captured with --logits")
            continue
        rows = sum(s.rows for s in chain)
        if k in seen:
            report.problems.append(f"{name}: rows are not contiguous or duplicated (pos {chain[0].start}-"
                                   f"{chain[0].start + rows - 1} again)")
            continue
        seen.add(k)
        a, b = want[k]
        bad = (a, chain[0].start) if chain[0].start != a else _gap(chain)
        if bad is not None:
            report.problems.append(f"{name}: positions out of order or missing at pos {bad[0]} (found {bad[1]})")
        elif rows != b - a:
            report.problems.append(f"{name}: {rows} rows, the sample has {b - a} text tokens at pos >= 1 "
                                   f"({a}..{b - 1})")
    report.problems += [f"run {k[0]} sample {k[1]} ({info[k]['source']}) logits: no rows for a complete sample "
                        f"({b - a} text tokens)" for k, (a, b) in sorted(want.items()) if k not in seen and b > a]


def verify(lake: str | Lake, run: str | None = None, progress: bool = False) -> tuple[int, list[str]]:
    """Returns (blocks checked, problems); each problem names run, sample, layer and site (or the file)."""
    r = verify_lake(lake, run, progress)
    return r.blocks, r.problems
