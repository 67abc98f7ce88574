"""Typed configs: every field described, unknown keys refused, loadable from YAML.

One config class per job; the CLI builds its flags from the same fields, so a YAML file and
command-line flags are one thing (flags override the file).
"""

from __future__ import annotations

import argparse
import enum
import logging
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from tourray.errors import UserError


def comma_list(v):
    """A flag's comma-separated text as a list (YAML lists pass through): the validator of `CommaList`."""
    return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


def parse_storage_options(v):
    """Lance storage options from a flag (`key=value,key=value`) or a YAML mapping, as the str -> str
    mapping Lance wants (YAML bools become "true"/"false"). Errors never echo the text: it may hold
    credentials."""
    if not isinstance(v, str):
        return {str(k): str(x).lower() if isinstance(x, bool) else str(x) for k, x in v.items()} if isinstance(v, dict) else v
    out = {}
    for i, item in enumerate(v.split(","), 1):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"expected key=value,key=value; item {i} is not key=value")
        out[key.strip()] = value.strip()
    return out


STORAGE_OPTIONS_HELP = ("Object-store settings for a URI --lake, passed to Lance as storage_options (e.g. aws_access_key_id, "
                        "aws_secret_access_key, aws_region, aws_endpoint, allow_http); the environment (AWS_*) works too. "
                        "Flag form: key=value,key=value; YAML: a mapping. Never stored, logged or shown: it may hold "
                        "credentials.")

#: The type of a config's `storage_options` field: declare it as `storage_options: StorageOptions =
#: storage_options_field()` (excluded from dumps and repr, so never logged or stored in a manifest).
StorageOptions = Annotated[dict[str, str], BeforeValidator(parse_storage_options)]

_T = TypeVar("_T")
#: A list field whose flag is comma-separated text (`--sites resid_post,resid_mid`); YAML lists pass through.
CommaList = Annotated[list[_T], BeforeValidator(comma_list)]


def storage_options_field():
    return Field({}, exclude=True, repr=False, description=STORAGE_OPTIONS_HELP)


def add_storage_options_flag(p: argparse.ArgumentParser) -> None:
    """`--storage-options` on a command that is not config-backed (args.storage_options: a dict;
    open the lake as `Lake(args.lake, args.storage_options)`)."""

    def parse(text: str) -> dict[str, str]:
        try:
            return parse_storage_options(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--storage-options", type=parse, default={}, metavar="KEY=VALUE,...",
                   help=STORAGE_OPTIONS_HELP.replace("%", "%%"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice (YAML would "
                                                        "keep the last silently)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _merged(base: dict, over: dict) -> dict:
    """`over` wins key by key, into nested mappings too (a flag sets one field of a nested config)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class BaseConfig(BaseModel):
    """Base for all configs: extra keys are an error, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any):
        """Load a YAML file; `overrides` (e.g. from command-line flags) win over the file."""
        path = Path(path)
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.MarkedYAMLError as e:  # one line: where, then what
            mark = e.problem_mark or e.context_mark
            where = f"line {mark.line + 1}: " if mark else ""
            raise UserError(f"cannot read config {path}: {where}{e.problem or e.context}") from None
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read config {path}: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"config {path} must be a mapping of field: value")
        return cls.parse(_merged(data, overrides), source=str(path))

    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "flags"):
        """Validate `data`, turning pydantic's errors into one UserError naming each field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            lines = []
            for err in e.errors():
                field = ".".join(str(p) for p in err["loc"]) or "(config)"
                if source == "flags":
                    field = "--" + field.replace("_", "-").replace(".", "-")
                got = err.get("input")
                top = cls.model_fields.get(str(err["loc"][0])) if err["loc"] else None
                secret = top is not None and top.exclude  # excluded fields (storage_options) may hold credentials
                shown = "" if secret or isinstance(got, (dict, list)) or got is None or len(repr(got)) > 80 else f" (got {got!r})"
                lines.append(f"  {field}: {err['msg']}{shown}")
            raise UserError(f"invalid {cls.__name__} from {source}:\n" + "\n".join(lines)) from None


class StoreDtype(str, enum.Enum):
    """dtype of stored activation vectors."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class ModelDtype(str, enum.Enum):
    """dtype the model runs in; `auto` = float32 on CPU, bfloat16 on GPU."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Site(str, enum.Enum):
    """Where in a decoder block the residual stream is read."""

    resid_post = "resid_post"
    resid_mid = "resid_mid"


class Engine(str, enum.Enum):
    """Which runtime runs the model."""

    hf = "hf"
    vllm = "vllm"


EMBED_LAYER = -1


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Parse `--layers` ("all", "embed,0,5,10-20", "none") against a model's depth.

    Returns sorted unique layer indices; -1 stands for the embedding output. Raises UserError
    naming the offending item when a layer is out of range or the syntax is wrong.
    """
    spec = spec.strip().lower()
    if spec in ("none", ""):
        return []
    out: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        if item == "all":
            out.update(range(-1, num_layers))
        elif item == "blocks":
            out.update(range(num_layers))
        elif item == "embed":
            out.add(EMBED_LAYER)
        else:
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
            if not m:
                raise UserError(
                    f"--layers: cannot parse {item!r}; use e.g. 'all', 'embed,0,5,10-20' or 'none'"
                )
            a, b = int(m[1]), int(m[2] or m[1])
            if a > b or a < 0 or b >= num_layers:
                raise UserError(
                    f"--layers: {item!r} is out of range; the model has {num_layers} decoder blocks "
                    f"(0-{num_layers - 1}) plus 'embed'"
                )
            out.update(range(a, b + 1))
    return sorted(out)


def compact_layers(layers: list[int]) -> str:
    """[-1, 0, 1, 2, 5] -> 'embed,0-2,5'."""
    out, blocks = ["embed"] if -1 in layers else [], [x for x in layers if x >= 0]
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        out.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return ",".join(out) or "none"


# -- config-backed flags ---------------------------------------------------------------------
def add_config_flags(p: argparse.ArgumentParser, model, prefix: str = "") -> None:
    """One flag per field of `model` (a BaseConfig): `store_dtype` -> `--store-dtype`; a nested config's
    fields get its name as prefix (`vllm.enforce_eager` -> `--vllm-enforce-eager`)."""
    if not prefix:
        p.add_argument("--config", metavar="FILE.yaml", help="Load fields from a YAML file; flags override it.")
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseConfig):
            add_config_flags(p, field.annotation, prefix=f"{prefix}{name}.")
            continue
        flag = "--" + (prefix + name).replace("_", "-").replace(".", "-")
        name = prefix + name
        ann = typing.get_args(field.annotation) or (field.annotation,)
        default = field.default if field.default is not None else "none"
        default = getattr(default, "value", default)
        if isinstance(default, list):
            default = ",".join(getattr(x, "value", str(x)) for x in default)
        helptext = f"{field.description} (default: {default})" if not field.is_required() else f"{field.description} (required)"
        kw = dict(dest=name, default=argparse.SUPPRESS, help=helptext.replace("%", "%%"))  # argparse %-formats help
        if bool in ann:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        enums = [a for a in ann if isinstance(a, type) and issubclass(a, enum.Enum)]
        if typing.get_origin(field.annotation) is list:
            kw["help"] += f"; any of {', '.join(e.value for e in enums[0])}, comma-separated" if enums else ""
            p.add_argument(flag, metavar="A,B", **kw)
            continue
        if enums:
            kw["choices"] = [e.value for e in enums[0]]
        p.add_argument(flag, metavar=name.split(".")[-1].upper() if not enums else None, **kw)


def config_from_args(model, args: argparse.Namespace):
    given: dict = {}
    for k, v in vars(args).items():  # "vllm.enforce_eager" -> {"vllm": {"enforce_eager": ...}}
        *parents, leaf = k.split(".")
        if parents and parents[0] in model.model_fields or not parents and k in model.model_fields:
            node = given
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = v
    if getattr(args, "config", None):
        return model.from_yaml(args.config, **given)
    return model.parse(given)


def guarded(fn, *args, quiet: bool = False) -> int:
    """Run `fn(*args)` as a command: logging set up, user errors printed without a traceback."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="tourray: %(message)s")
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; committed groups are kept, re-run to resume", file=sys.stderr)
        return 130
