"""Run records: what each run is (its row in `runs`, its texts in `run_texts`, its manifest with every
capture's summary and versions), what a resume may not change, and `tourray runs`, which shows them.
A capture into an existing run must match its record field for field (`run_changes`)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from tourray.config import compact_layers
from tourray.corpus import texts as corpus
from tourray.errors import UserError
from tourray.lake import tables as lk
from tourray.lake.repair import SAMPLE_TABLES
from tourray.lake.tables import Lake, sql_quote
from tourray.runtime import git_commit


def stored_texts(lake: lk.Lake, run_row_: dict) -> dict[str, tuple[str, str | None]]:
    """source -> (sha256, category) of a stored run: its `run_texts` rows, or (lakes from before that
    table) the JSON snapshot in its manifest, which has no categories."""
    rows = lake.read("run_texts", ["source", "sha256", "category"], filter=f"run = {lk.sql_quote(run_row_['run'])}")
    if rows.num_rows:
        return {r["source"]: (r["sha256"], r["category"]) for r in rows.to_pylist()}
    return {k: (v, None) for k, v in json.loads(run_row_["manifest"]).get("samples", {}).items()}


def snapshot_hash(samples: dict[str, str]) -> str:
    """One hash for a run's whole text snapshot (source -> sha256)."""
    return corpus.sha256_bytes(json.dumps(samples, sort_keys=True).encode())


#: Fields of a run that must not change when a capture resumes it.
IDENTITY = ("model", "model_revision", "tokenizer", "tokenizer_sha256", "engine", "model_dtype", "store_dtype",
            "num_layers", "hidden_size", "layers", "sites", "system_prompt_sha256")

#: Libraries whose version changes the numbers (kernels, defaults): a resume under other versions is
#: refused unless the user allows it (--allow-version-change), and each capture records its own.
VERSIONED = ("torch", "transformers", "vllm", "tourray")


def run_changes(old: dict, new: dict, old_texts: dict, new_texts: dict, allow_version_change: bool = False) -> list[str]:
    """Human-readable differences between a stored run and the one asked for (texts: `stored_texts`)."""
    out = [f"{k}: {old[k]!r} in the lake, {new[k]!r} now" for k in IDENTITY
           if old[k] != new[k] and not (k in ("model", "tokenizer") and _same_folder(old[k], new[k]))]
    om, nm = json.loads(old["manifest"]), json.loads(new["manifest"])
    # what is stored and accumulated must not change mid-run; nor the batching: groups are fixed slices
    # of the sample order and padding inside a forward batch changes activations (~1e-6)
    for k, default in (("store", "all"), ("stats", []), ("reference", None), ("reference_run", None), ("logits", None), ("group_size", 32), ("batch_size", 8)):
        a, b = om["config"].get(k, default), nm["config"].get(k, default)
        if a != b:
            out.append(f"{k}: {a!r} in the lake, {b!r} now")
    if om.get("reference_revision") != nm.get("reference_revision"):
        out.append(f"reference model revision: {om.get('reference_revision')} in the lake, {nm.get('reference_revision')} now")
    if om["prompt"] != nm["prompt"]:
        out.append(f"prompt format: {om['prompt']} in the lake, {nm['prompt']} now")
    for k, b in nm.get("runtime", {}).items():  # lakes from before: not recorded, not compared
        if (a := om.get("runtime", {}).get(k, b)) != b:
            out.append(f"{k}: {a!r} in the lake, {b!r} now")
    if not allow_version_change:
        before, now = _versions(old, om), _versions(new, nm)
        out += [f"{k} version: {before.get(k)} in the lake, {now.get(k)} now (--allow-version-change to resume anyway)"
                for k in VERSIONED if before.get(k) != now.get(k)]
    a, b = old_texts, new_texts
    categories_known = all(v[1] is not None for v in a.values())
    for label, names in (("added", sorted(b.keys() - a.keys())), ("removed", sorted(a.keys() - b.keys())),
                         ("changed", sorted(k for k in a.keys() & b.keys() if a[k][0] != b[k][0])),
                         ("recategorised", sorted(k for k in a.keys() & b.keys() if categories_known
                                                  and a[k][0] == b[k][0] and a[k][1] != b[k][1]))):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            out.append(f"texts {label}: {len(names)} ({', '.join(names[:5])}{more})")
    return out


def _versions(row: dict, manifest: dict) -> dict:
    """The versions a capture of the run last ran under (a resume records its own, see record_summary)."""
    last = next((c["versions"] for c in reversed(manifest.get("captures", [])) if "versions" in c), None)
    return last or dict(manifest.get("versions", {}), tourray=row.get("tourray_version"))


def _same_folder(a: str, b: str) -> bool:
    """One local checkpoint named two ways (relative and absolute); its revision is compared apart."""
    pa_, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa_.is_dir() and pb.is_dir() and pa_.resolve() == pb.resolve()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "vllm", "ray", "pylance", "pyarrow", "duckdb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def capture_versions() -> dict[str, str]:
    """This process's library versions and tourray's: what each capture of a run records."""
    import tourray

    return dict(library_versions(), tourray=tourray.__version__)


def read_manifest(lake: lk.Lake, run: str) -> dict:
    return json.loads(lake.read("runs", ["manifest"], filter=f"run = {lk.sql_quote(run)}").column(0)[0].as_py())


def update_manifest(lake: lk.Lake, run: str, **fields) -> None:
    """Set top-level `fields` of the run's manifest (one commit of the `runs` row)."""
    manifest = dict(read_manifest(lake, run), **fields)
    lake.dataset("runs").update({"manifest": lk.sql_quote(json.dumps(manifest))}, where=f"run = {lk.sql_quote(run)}")


def record_summary(lake: lk.Lake, run: str, summary: dict, **fields) -> None:
    """Append this invocation's summary, with the versions it ran under, to the run's manifest."""
    captures = read_manifest(lake, run).get("captures", []) + [
        dict(summary, finished_at=dt.datetime.now(dt.timezone.utc).isoformat(), versions=capture_versions(),
             tourray_commit=git_commit())]
    update_manifest(lake, run, captures=captures, **fields)


def drop_run(lake: lk.Lake, run: str) -> None:
    """Delete every row of `run` (a derived run to be captured again from scratch), under its lease.
    `samples` goes first, so an interrupted drop leaves an incomplete run (which a capture repairs),
    never a complete-looking one; the `runs` row goes last."""
    q = sql_quote(run)
    with lake.lease("drop", run=run) as lease:  # exclusive: no capture of the run meanwhile
        for table in ("samples", *SAMPLE_TABLES, "layer_stats", "pair_stats", "moments", "run_texts", "runs"):
            if lake.exists(table):
                lease.check()  # the fence: a lease taken over must not commit
                lake.delete(table, f"run = {q}")


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
