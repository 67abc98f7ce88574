"""What a run is: the model's identity (revision, tokenizer hash, depth, width), the exact texts
and prompt it saw, the code that ran, and each capture's summary. Stored as the run's row in the
`runs` table; a capture into an existing run must match it field for field.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tourray import corpus, lake as lk
from tourray.errors import UserError

if TYPE_CHECKING:
    from tourray.capture import CaptureConfig


@dataclass
class ModelInfo:
    num_layers: int
    hidden_size: int
    model_revision: str
    tokenizer_sha256: str
    model_type: str = ""  # the decoder's family (gemma3 -> gemma3_text): what resid_mid means depends on it


def require_folder(flag: str, name: str) -> None:
    """A name that is clearly a path (not a hub id) must be an existing folder."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not Path(name).expanduser().is_dir():
            raise UserError(f"{flag}: no such checkpoint folder {name!r}")


def load_tokenizer(cfg: CaptureConfig):
    from transformers import AutoTokenizer

    from tourray.models import resolve_gguf

    name, gguf = (cfg.tokenizer, None) if cfg.tokenizer else resolve_gguf(cfg.model, getattr(cfg, "gguf_file", None))
    require_folder("--tokenizer" if cfg.tokenizer else "--model", name)
    kw = {"gguf_file": gguf} if gguf else {"revision": cfg.revision if not cfg.tokenizer else None}
    try:
        return AutoTokenizer.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer/--model: cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None


def inspect_model(cfg: CaptureConfig, tokenizer) -> ModelInfo:
    """Read depth, width and revision from the config and files, without loading weights."""
    from transformers import AutoConfig

    from tourray.capture.hf import text_model_type
    from tourray.models import resolve_gguf

    path, gguf = resolve_gguf(cfg.model, getattr(cfg, "gguf_file", None))
    require_folder("--model", path)
    try:
        mc = AutoConfig.from_pretrained(path, revision=cfg.revision, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as e:
        raise UserError(
            f"--model: {cfg.model!r} is not a checkpoint folder, and no hub model of that name could be "
            f"loaded ({str(e).splitlines()[0]})"
        ) from None
    tc = mc.get_text_config()
    return ModelInfo(tc.num_hidden_layers, tc.hidden_size, model_revision(cfg.model, cfg.revision, gguf_file=gguf and path + "/" + gguf),
                     tokenizer_sha256(tokenizer), text_model_type(mc))


#: Bytes of each safetensors file's tensor data hashed by `model_revision` (in 64 evenly spaced
#: blocks): with the headers (names, dtypes, shapes, offsets) and sizes this tells checkpoints apart
#: (any retraining or pruning rewrites far more than the gaps between samples) at ~1 ms per file
#: instead of reading every weight byte (64 GB for Qwen3-32B).
SAMPLED_BYTES, SAMPLED_BLOCKS = 4 << 20, 64


def _safetensors_digest(f: Path, h) -> None:
    import struct

    size = f.stat().st_size
    with f.open("rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0] if size >= 8 else size
        if n > size - 8:  # not a safetensors file (a stray, a truncated copy): small or broken, hash it whole
            fh.seek(0)
            h.update(size.to_bytes(8, "little") + fh.read())
            return
        h.update(size.to_bytes(8, "little") + fh.read(n))
        start, span = 8 + n, size - 8 - n
        block = max(1, SAMPLED_BYTES // SAMPLED_BLOCKS)
        for i in range(SAMPLED_BLOCKS):
            fh.seek(start + (span - block) * i // max(SAMPLED_BLOCKS - 1, 1) if span > block else start)
            h.update(fh.read(block))


def model_revision(model: str, revision: str | None, full: bool = False, gguf_file: str | None = None) -> str:
    """Hub commit for hub models; `gguf-sha256:<hex>` for a folder `tourray model import-gguf` wrote
    (its files as the import left them); else, for a local folder, `st-sha256:` over config/index
    files, each safetensors file's header, size and sampled tensor bytes (see SAMPLED_BYTES; so a
    re-written checkpoint with the same weights keeps its revision and a start reads ~MBs, not the
    weights). `full=True` gives the older `sha256:` of every byte (to compare lakes made before)."""
    if gguf_file:  # a GGUF captured directly: the file is the checkpoint
        from tourray.models import file_sha256

        return "gguf-sha256:" + file_sha256(Path(gguf_file))
    path = Path(model)
    if path.is_dir():
        from tourray.models import folder_files, read_provenance

        rec = read_provenance(path)
        if rec is not None and rec.get("files") == folder_files(path):
            return "gguf-sha256:" + rec["gguf_sha256"]
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            # tourray_*.json record where the weights came from (and when), not what they compute
            if f.suffix in (".json", ".safetensors", ".bin") and not f.name.startswith(("tokenizer", "tourray_")):
                h.update(f.name.encode())
                if f.suffix == ".safetensors" and not full:
                    _safetensors_digest(f, h)
                    continue
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 24), b""):
                        h.update(chunk)
        return ("sha256:" if full else "st-sha256:") + h.hexdigest()
    from transformers.utils import cached_file

    cfg_path = Path(cached_file(model, "config.json", revision=revision))
    return cfg_path.parent.name  # .../snapshots/<commit>/config.json


def tokenizer_sha256(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)).encode())
    h.update((getattr(tok, "chat_template", None) or "").encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def run_row(cfg: CaptureConfig, info: ModelInfo, layers: list[int], samples, system_prompt: str) -> dict:
    import tourray

    prompt = dict(chat_template=cfg.chat_template, text_role=cfg.text_role, user_prompt=cfg.user_prompt,
                  max_length=cfg.max_length)
    manifest = dict(
        config=cfg.model_dump(mode="json"),
        prompt=prompt,
        runtime=runtime_identity(cfg),
        samples_root=str(Path(cfg.samples).resolve()),
        n_texts=len(samples),  # the texts themselves: the run_texts table (see text_rows)
        texts_sha256=snapshot_hash({s.source: s.sha256 for s in samples}),
        versions=capture_versions(),
    )
    if cfg.reference:
        manifest["reference_revision"] = model_revision(cfg.reference, cfg.reference_revision)
    return dict(
        run=cfg.run, model=cfg.model, model_revision=info.model_revision,
        tokenizer=cfg.tokenizer or cfg.model, tokenizer_sha256=info.tokenizer_sha256,
        engine=cfg.engine.value, model_dtype=cfg.resolved_model_dtype,
        store_dtype=cfg.store_dtype.value, num_layers=info.num_layers, hidden_size=info.hidden_size,
        layers=layers, sites=[s.value for s in cfg.sites],
        system_prompt_sha256=corpus.sha256_bytes(system_prompt.encode()),
        tourray_version=tourray.__version__, tourray_commit=git_commit(),
        created_at=dt.datetime.now(dt.timezone.utc), manifest=json.dumps(manifest),
    )


def runtime_identity(cfg: CaptureConfig) -> dict:
    """What else changes the numbers a run stores: the device kind and the attention kernel (eager,
    sdpa and flash attention differ in the last bits; so do CPU and GPU matmuls)."""
    return dict(device="cuda" if cfg.gpus_per_actor > 0 else "cpu",
                attn_implementation=cfg.hf.attn_implementation if cfg.engine.value == "hf" else None)


def text_rows(run: str, samples) -> list[dict]:
    """The run's text snapshot as `run_texts` rows."""
    return [dict(run=run, sample_id=s.sample_id, source=s.source, sha256=s.sha256, category=s.category) for s in samples]


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
    for k, default in (("store", "all"), ("stats", []), ("reference", None), ("group_size", 32), ("batch_size", 8)):
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


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (two git subprocesses), once per process: statistics rows ask per group."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


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
