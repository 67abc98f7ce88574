"""Reading a samples folder: texts, stable ids, categories, and the `index.tsv` ledger.

A samples root is a folder of UTF-8 `.txt` files (any depth) or one `.txt` file. A sample's
category comes from `<root>/index.tsv` when it lists the file, else from its first sub-folder.
Bad files (empty, whitespace only, not UTF-8) are all named at once; nothing is captured unless
`skip_invalid` asks to leave them out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from tourray.errors import UserError

log = logging.getLogger("tourray")

INDEX_FILE = "index.tsv"
INDEX_COLUMNS = ("path", "split", "category", "city", "language", "sha256")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class Sample:
    sample_id: str
    source: str
    category: str
    text: str
    sha256: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_id(source: str, sha256: str) -> str:
    """Stable id from the relative path and the content hash: same file, same id, on any machine."""
    return sha256_bytes(f"{source}\0{sha256}".encode())[:16]


def _text_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.txt") if p.is_file())


def read_index(root: Path) -> dict[str, dict[str, str]]:
    """`index.tsv` rows keyed by path; {} when the root has none."""
    path = root / INDEX_FILE
    if not root.is_dir() or not path.exists():
        return {}
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t"))
    if rows and set(INDEX_COLUMNS) - set(rows[0]):
        raise UserError(f"{path}: header must be {chr(9).join(INDEX_COLUMNS)}")
    return {r["path"]: r for r in rows}


def load_samples(root: str | Path, skip_invalid: bool = False,
                 include: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Read every text under `root` (only those whose path relative to `root` matches one of the
    `include` globs, when given). Returns (samples, skipped) where skipped names each bad file
    with its reason; raises UserError listing them all unless `skip_invalid`."""
    from fnmatch import fnmatch

    root = Path(root)
    if not root.exists():
        raise UserError(f"--samples: {root} does not exist")
    files = _text_files(root)
    if not files:
        raise UserError(f"--samples: no .txt files under {root}")
    base = root if root.is_dir() else root.parent
    if include:
        files = [f for f in files if any(fnmatch(f.relative_to(base).as_posix(), g) for g in include)]
        if not files:
            raise UserError(f"--include {','.join(include)}: matches none of the texts under {root} "
                            "(globs are matched against paths relative to --samples, e.g. 'train/rome__*')")
    index = read_index(root)
    samples, bad = [], []
    for path in files:
        source = path.relative_to(base).as_posix()
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(f"{path}: not UTF-8 (byte {e.start})")
            continue
        if not text.strip():
            bad.append(f"{path}: {'empty' if not text else 'whitespace only'}")
            continue
        digest = sha256_bytes(data)
        parts = Path(source).parts
        category = index[source]["category"] if source in index else (parts[0] if len(parts) > 1 else "default")
        samples.append(Sample(sample_id(source, digest), source, category, text, digest))
    if bad and not skip_invalid:
        raise UserError(
            f"{len(bad)} invalid sample file(s); fix them or pass --skip-invalid:\n  " + "\n  ".join(bad)
        )
    for b in bad:
        log.warning("skipped %s", b)
    return samples, bad


def to_table(samples: list[Sample]) -> pa.Table:
    return pa.Table.from_pylist([asdict(s) for s in samples])


def read_user_file(path: str | Path, flag: str) -> str:
    """A text file a flag names, or one UserError naming the flag and what is wrong with the file."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{flag}: {p} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{flag}: {p} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise UserError(f"{flag}: {p} is not UTF-8") from None


def read_system_prompt(path: str | Path | None) -> str:
    return "" if path is None else read_user_file(path, "--system-prompt").strip()


# -- the corpus ledger -----------------------------------------------------------------------
def language(text: str) -> str:
    """'zh' when a third or more of the non-space characters are CJK, else 'en'."""
    chars = [c for c in text if not c.isspace()]
    return "zh" if chars and len(_CJK.findall(text)) / len(chars) > 0.3 else "en"


def index_rows(root: str | Path) -> list[dict[str, str]]:
    """Rows of `index.tsv` as they should be for the files under `root`.

    Layout: `train/<city>__<stop>.txt` and `eval/<set>/<city>__<stop>.txt`; the category of a
    training text is `train`, of an evaluation text its set.
    """
    root = Path(root)
    rows = []
    for path in _text_files(root):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        split = parts[0]
        category = parts[1] if split == "eval" and len(parts) > 2 else split
        data = path.read_bytes()
        rows.append(dict(
            path=rel, split=split, category=category, city=path.stem.split("__")[0],
            language=language(data.decode("utf-8", "replace")), sha256=sha256_bytes(data),
        ))
    return rows


def write_index(root: str | Path) -> Path:
    out = Path(root) / INDEX_FILE
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS, delimiter="\t", lineterminator="\n")
    w.writeheader()
    w.writerows(index_rows(root))
    out.write_text(buf.getvalue(), encoding="utf-8")
    return out


def check_index(root: str | Path) -> list[str]:
    """Differences between `index.tsv` and the files: each names a path."""
    want = {r["path"]: r for r in index_rows(root)}
    have = read_index(Path(root))
    problems = [f"{p}: not in {INDEX_FILE}" for p in want if p not in have]
    problems += [f"{p}: listed in {INDEX_FILE} but missing" for p in have if p not in want]
    for p in want.keys() & have.keys():
        for col in INDEX_COLUMNS:
            if want[p][col] != have[p][col]:
                problems.append(f"{p}: {col} is {have[p][col]!r} in {INDEX_FILE}, {want[p][col]!r} on disk")
    return sorted(problems)
