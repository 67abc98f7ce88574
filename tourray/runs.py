"""`tourray runs`: what is in a lake, and exactly what produced each run (its manifest)."""

from __future__ import annotations

import json

from tourray.config import compact_layers
from tourray.errors import UserError
from tourray.lake import Lake, sql_quote
from tourray.manifest import snapshot_hash


def _lake(root) -> Lake:
    lake = root if isinstance(root, Lake) else Lake(root)
    if not lake.exists("runs"):
        raise UserError(f"--lake: no runs table under {lake.root}")
    return lake


def list_runs(root) -> str:
    """One line per run: model, dtype, layers, and how many samples/tokens are committed."""
    lake = _lake(root)
    counts = {}
    if lake.exists("samples"):
        for r in lake.read("samples", ["run", "n_tokens"]).group_by("run").aggregate(
                [("n_tokens", "count"), ("n_tokens", "sum")]).to_pylist():
            counts[r["run"]] = (r["n_tokens_count"], r["n_tokens_sum"])
    rows = [("run", "model", "engine", "store", "layers", "sites", "samples", "tokens", "created (UTC)", "commit")]
    for r in sorted(lake.read("runs").to_pylist(), key=lambda r: r["created_at"]):
        want = n_texts(json.loads(r["manifest"]))
        n, t = counts.get(r["run"], (0, 0))
        rows.append((r["run"], r["model"], r["engine"], r["store_dtype"], compact_layers(r["layers"]), ",".join(r["sites"]),
                     f"{n}/{want}", f"{t or 0:,}", r["created_at"].strftime("%Y-%m-%d %H:%M"), (r["tourray_commit"] or "-")[:12]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def describe_run(root, run: str) -> str:
    """The manifest of one run: identity, prompt, the text snapshot, and each capture's summary."""
    lake = _lake(root)
    rows = lake.read("runs", filter=f"run = {sql_quote(run)}").to_pylist()
    if not rows:
        raise UserError(f"--run: no run {run!r} in {lake.root}")
    r = rows[0]
    m = json.loads(r.pop("manifest"))
    def show(k, v):
        return compact_layers(v) if k == "layers" else ",".join(v) if isinstance(v, list) else v

    out = [f"{k:<22}{show(k, v)}" for k, v in r.items()]
    out.append(f"{'prompt':<22}{json.dumps(m['prompt'])}")
    sha = m.get("texts_sha256") or snapshot_hash(m["samples"])
    out.append(f"{'samples':<22}{n_texts(m)} texts under {m['samples_root']} (snapshot sha256 {sha[:16]})")
    out.append(f"{'libraries':<22}{', '.join(f'{k} {v}' for k, v in m['versions'].items())}")
    for c in m.get("captures", []):
        out.append(f"{'capture':<22}{c['finished_at'][:19]}: {c['captured']} samples, {c['tokens']:,} tokens in "
                   f"{c['seconds']} s ({c['already_done']} already done)")
    return "\n".join(out)


def n_texts(manifest: dict) -> int:
    """How many texts the run was asked to capture (lakes from before the run_texts table kept them
    in the manifest, as `samples`)."""
    return manifest["n_texts"] if "n_texts" in manifest else len(manifest["samples"])
