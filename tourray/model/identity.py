"""A model's identity, read without loading its weights: the revision (hub commit, GGUF sha256 or a
sampled digest of a local folder), the tokenizer's hash, depth and width, and where its blocks sit.
Runs, checkpoints and evaluations all name the model they used this way."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tourray.errors import UserError


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


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    from tourray.model.gguf import resolve_gguf

    name, gguf = (cfg.tokenizer, None) if cfg.tokenizer else resolve_gguf(cfg.model, getattr(cfg, "gguf_file", None))
    require_folder("--tokenizer" if cfg.tokenizer else "--model", name)
    kw = {"gguf_file": gguf} if gguf else {"revision": cfg.revision if not cfg.tokenizer else None}
    try:
        return AutoTokenizer.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer/--model: cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None


def inspect_model(cfg, tokenizer) -> ModelInfo:
    """Read depth, width and revision from the config and files, without loading weights."""
    from transformers import AutoConfig

    from tourray.model.gguf import resolve_gguf

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
        from tourray.model.gguf import file_sha256

        return "gguf-sha256:" + file_sha256(Path(gguf_file))
    path = Path(model)
    if path.is_dir():
        from tourray.model.gguf import folder_files, read_provenance

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


def find_blocks(model, num_layers: int):
    """The decoder blocks of any transformers causal LM: the outermost ModuleList of that length."""
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers:
            return name, mod
    raise UserError(f"cannot find a list of {num_layers} decoder blocks in {type(model).__name__}")


def text_model_type(config) -> str:
    """The decoder's model_type (a multimodal wrapper such as gemma3 names its text model gemma3_text)."""
    return config.get_text_config().model_type
