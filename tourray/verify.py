"""`tourray verify`: recompute every activation block's checksum and span from the lake.

Each (run, sample, layer, site) block was written as one contiguous run of rows ordered by pos,
with its sha256 and span recorded in `blocks`. Verification streams `activations` once (memory
does not grow with the lake), hashes each block as its rows go by, and names every block whose
bytes, span or presence differ, plus samples whose token count disagrees with the span.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tourray.lake import Lake, arrow_to_numpy, sql_quote


def verify(lake: str | Lake, run: str | None = None, progress: bool = False) -> tuple[int, list[str]]:
    """Returns (blocks checked, problems); each problem names run, sample, layer and site."""
    from tqdm import tqdm

    lake = lake if isinstance(lake, Lake) else Lake(lake)
    where = f"run = {sql_quote(run)}" if run else None
    if not lake.exists("blocks"):
        return 0, []
    expected = {
        (r["run"], r["sample_id"], r["layer"], r["site"]): (r["pos_start"], r["pos_end"], r["sha256"])
        for r in lake.read("blocks", filter=where).to_pylist()
    }
    n_tokens = {(r["run"], r["sample_id"]): r["n_tokens"]
                for r in lake.read("samples", ["run", "sample_id", "n_tokens"], filter=where).to_pylist()}
    problems, seen = [], set()
    state = {"key": None, "hasher": None, "start": 0, "next": 0}

    def name(k):
        return f"run {k[0]} sample {k[1]} layer {k[2]} site {k[3]}"

    def close():
        k = state["key"]
        if k is None:
            return
        want = expected.get(k)
        got = (state["start"], state["next"], state["hasher"].hexdigest())
        if want is None:
            problems.append(f"{name(k)}: rows with no record in blocks")
        elif got[:2] != want[:2]:
            problems.append(f"{name(k)}: span {got[0]}-{got[1]} differs from recorded {want[0]}-{want[1]}")
        elif got[2] != want[2]:
            problems.append(f"{name(k)}: sha256 differs from the recorded checksum")
        state["key"] = None

    if lake.exists("activations"):
        ds = lake.dataset("activations")
        scanner = ds.scanner(columns=["run", "sample_id", "layer", "site", "pos", "h"], filter=where,
                             batch_size=4096, scan_in_order=True)
        bar = tqdm(total=ds.count_rows(filter=where), unit="row", disable=not progress, desc="verify")
        for b in scanner.to_batches():
            cols = [b.column(c).to_numpy(zero_copy_only=False) for c in ("run", "sample_id", "layer", "site")]
            pos = b.column("pos").to_numpy()
            h = arrow_to_numpy(b.column("h"))
            change = np.zeros(len(b), bool)
            change[0] = True
            for c in cols:
                change[1:] |= c[1:] != c[:-1]
            starts = np.flatnonzero(change).tolist() + [len(b)]
            for a, z in zip(starts[:-1], starts[1:]):
                k = (cols[0][a], cols[1][a], int(cols[2][a]), cols[3][a])
                if k != state["key"]:
                    close()
                    if k in seen:
                        problems.append(f"{name(k)}: rows are not contiguous (block appears twice)")
                    seen.add(k)
                    state.update(key=k, hasher=hashlib.sha256(), start=int(pos[a]), next=int(pos[a]))
                p, want = pos[a:z], np.arange(state["next"], state["next"] + (z - a))
                if not np.array_equal(p, want):
                    i = int(np.flatnonzero(p != want)[0])
                    problems.append(f"{name(k)}: positions out of order or missing at pos {int(want[i])} (found {int(p[i])})")
                state["next"] += z - a
                state["hasher"].update(np.ascontiguousarray(h[a:z]).tobytes())
            bar.update(len(b))
        close()
        bar.close()
    problems += [f"{name(k)}: recorded in blocks but has no rows" for k in expected.keys() - seen]
    for k, (start, end, _) in expected.items():
        n = n_tokens.get(k[:2])
        if n is not None and (start, end) != (0, n):
            problems.append(f"{name(k)}: span {start}-{end} does not cover the sample's {n} tokens")
    return len(expected), problems
