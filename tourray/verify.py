"""`tourray verify`: is every committed sample complete, unduplicated and intact?

Only complete samples count (those with a `samples` row; the capture driver commits it last, so
rows of a sample without one are a killed run's leftovers, which a re-run deletes). For each:

- completeness: every (layer, site) block the run stores is recorded once in `blocks` and has
  rows, spanning positions 0..n_tokens; its `tokens` rows are positions 0..n_tokens-1, once each;
- integrity: each activation block's h bytes hash to the sha256 recorded in `blocks`. `tokens`
  has no stored checksum (its schema has none), so its rows are checked by key and position only;
- readability: a data file Lance cannot decode, or one that is gone, is named as a problem.

`activations` and `tokens` are read fragment by fragment in parallel Ray tasks (one per group of
consecutive fragments); each returns one small record per contiguous run of rows of a key, which
the driver merges. Memory is one batch per task plus one record per block, flat in lake size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tourray.lake import Lake, arrow_to_numpy, run_row, sql_quote

ACT_KEY = ("run", "sample_id", "layer", "site")
TOK_KEY = ("run", "sample_id")


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
                    hashed: str | None, where: str | None, batch_rows: int = 4096):
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
            cols = list(key) + ["pos"] + ([hashed] if hashed else [])
            for b in ds.scanner(fragments=[frag], columns=cols, filter=where, batch_size=batch_rows,
                                scan_in_order=True).to_batches():
                if not b.num_rows:
                    continue
                rows += b.num_rows
                kc = [b.column(c).to_numpy(zero_copy_only=False) for c in key]
                pos = b.column("pos").to_numpy()
                h = arrow_to_numpy(b.column(hashed)) if hashed else None
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
                        hasher.update(np.ascontiguousarray(h[a:z]).tobytes())
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
    """All segments of `table` in physical order, scanned by parallel Ray tasks."""
    ds = lake.dataset(table)
    n = len(ds.get_fragments())
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per = max(1, -(-n // (4 * cpus)))  # ~4 tasks per CPU: balance without a task per tiny fragment
    task = ray.remote(num_cpus=1)(_scan_fragments)
    refs = {task.remote(ds.uri, ds.version, lake.storage_options, table, list(range(i, min(i + per, n))), key,
                        hashed, where): i for i in range(0, n, per)}
    parts, pending = {}, list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        segs, problems, rows = ray.get(done[0])
        parts[refs[done[0]]] = (segs, problems)
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


def _rehash(ds, chain: list[_Seg], key: tuple[str, ...], hashed: str) -> str:
    """sha256 of a block split across fragments: re-read just those fragments, filtered to it."""
    frags = ds.get_fragments()
    k = chain[0].key
    where = " AND ".join(f"{c} = {sql_quote(v) if isinstance(v, str) else v}" for c, v in zip(key, k))
    hasher = hashlib.sha256()
    for b in ds.scanner(fragments=[frags[s.frag] for s in chain], columns=[hashed], filter=where,
                        scan_in_order=True).to_batches():
        hasher.update(np.ascontiguousarray(arrow_to_numpy(b.column(hashed))).tobytes())
    return hasher.hexdigest()


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
    samples = _read_small(lake, "samples", ["run", "sample_id", "n_tokens"], where, report)
    blocks = _read_small(lake, "blocks", ["run", "sample_id", "layer", "site", "pos_start", "pos_end", "sha256"],
                         where, report) if lake.exists("blocks") else pa.table({})
    if samples is None or blocks is None:
        report.notes.append("samples or blocks is unreadable: nothing else was checked")
        return report
    n_tokens = {(r["run"], r["sample_id"]): r["n_tokens"] for r in samples.to_pylist()}
    report.samples = len(n_tokens)
    if samples.num_rows != len(n_tokens):
        dup = samples.group_by(["run", "sample_id"]).aggregate([("n_tokens", "count")]).filter(
            pc.greater(pc.field("n_tokens_count"), 1)).to_pylist()
        report.problems += [f"run {r['run']} sample {r['sample_id']}: {r['n_tokens_count']} rows in samples (expected 1)"
                            for r in dup]

    def name(k):
        return f"run {k[0]} sample {k[1]} layer {k[2]} site {k[3]}"

    orphans: set[tuple] = set()
    expected: dict[tuple, tuple] = {}
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
    for (rn, sid), n in n_tokens.items():
        r = by_run.get(rn)
        if r is None:
            report.problems.append(f"run {rn} sample {sid}: has a samples row but no runs row")
            continue
        for layer, site in stored_keys(r):
            k = (rn, sid, layer, site)
            if k not in expected:
                report.problems.append(f"{name(k)}: expected by the run but not recorded in blocks")
            elif expected[k][:2] != (0, n):
                s, e = expected[k][:2]
                report.problems.append(f"{name(k)}: span {s}-{e} does not cover the sample's {n} tokens")
    stored = {rn: set(stored_keys(r)) for rn, r in by_run.items()}
    report.problems += [f"{name(k)}: recorded in blocks but the run does not store it" for k in expected
                        if k[0] in stored and k[2:] not in stored[k[0]]]

    ray = init_ray()
    total = sum(lake.dataset(t).count_rows(filter=where) for t in ("activations", "tokens") if lake.exists(t))
    bar = tqdm(total=total, unit="row", disable=not progress, desc="verify")
    seen: set[tuple] = set()
    if lake.exists("activations"):
        segs, problems, ds = _scan_table(ray, lake, "activations", ACT_KEY, "h", where, bar)
        report.problems += problems
        for chain in _merge(segs):
            k = chain[0].key
            if k[:2] not in n_tokens:
                orphans.add(k[:2])
                continue
            if k in seen:
                report.problems.append(f"{name(k)}: rows are not contiguous (block appears twice)")
            seen.add(k)
            start, end = chain[0].start, chain[0].start + sum(s.rows for s in chain)
            bad = next((s.bad for s in chain if s.bad), None)
            if bad is None:  # a gap at a fragment boundary
                bad = next(((b.start, b.start) for a, b in zip(chain, chain[1:]) if b.start != a.end), None)
            if bad is not None:
                report.problems.append(f"{name(k)}: positions out of order or missing at pos {bad[0]} (found {bad[1]})")
            want = expected.get(k)
            sha = chain[0].sha if len(chain) == 1 else _rehash(ds, chain, ACT_KEY, "h")
            if want is None:
                report.problems.append(f"{name(k)}: rows with no record in blocks")
            elif (start, end) != want[:2]:
                report.problems.append(f"{name(k)}: span {start}-{end} differs from recorded {want[0]}-{want[1]}")
            elif sha != want[2]:
                report.problems.append(f"{name(k)}: sha256 differs from the recorded checksum")
    report.problems += [f"{name(k)}: recorded in blocks but has no rows" for k in sorted(expected.keys() - seen, key=str)]

    tok_seen: dict[tuple, int] = {}
    if lake.exists("tokens"):
        segs, problems, _ = _scan_table(ray, lake, "tokens", TOK_KEY, None, where, bar)
        report.problems += problems
        for chain in _merge(segs):
            k = chain[0].key
            if k not in n_tokens:
                orphans.add(k)
                continue
            rows = sum(s.rows for s in chain)
            report.token_rows += rows
            if k in tok_seen:
                report.problems.append(f"run {k[0]} sample {k[1]} tokens: rows are not contiguous or duplicated "
                                       "(the sample's rows appear twice)")
                continue
            tok_seen[k] = rows
            n = n_tokens[k]
            bad = next((s.bad for s in chain if s.bad), None) or next(
                ((b.start, b.start) for a, b in zip(chain, chain[1:]) if b.start != a.end), None)
            if chain[0].start != 0 or bad is not None:
                at = (0, chain[0].start) if chain[0].start != 0 else bad
                report.problems.append(f"run {k[0]} sample {k[1]} tokens: positions out of order or missing at pos "
                                       f"{at[0]} (found {at[1]})")
            if rows != n:
                report.problems.append(f"run {k[0]} sample {k[1]} tokens: {rows} rows, samples says n_tokens {n}")
    report.problems += [f"run {k[0]} sample {k[1]} tokens: no rows for a complete sample"
                        for k in sorted(n_tokens.keys() - tok_seen.keys())]
    bar.close()
    report.notes.append("tokens have no stored checksum: their rows were checked by count and position (0..n-1) only")
    if orphans:
        report.notes.append(f"ignored rows of {len(orphans)} incomplete sample(s) with no samples row "
                            "(an interrupted capture; re-running it removes them)")
    return report


def verify(lake: str | Lake, run: str | None = None, progress: bool = False) -> tuple[int, list[str]]:
    """Returns (blocks checked, problems); each problem names run, sample, layer and site (or the file)."""
    r = verify_lake(lake, run, progress)
    return r.blocks, r.problems
