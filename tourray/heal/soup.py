"""`tourray soup`: average checkpoints of identical shapes (Wortsman et al. 2022, "model soups").

- uniform: the mean of every member's tensors;
- greedy: members ranked by held-out KL to a teacher run (the same hash split as `tourray heal`),
  start from the best, add the next only if the running average's held-out KL improves.

Every member must have the same tensor names and shapes; otherwise the soup is refused naming the
first tensor that differs. Tensors are averaged in float64 and stored in the first member's dtype.
The output is a standard checkpoint (the first member's config and tokenizer) + tourray_soup.json.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
from pathlib import Path

from tourray.errors import UserError
from tourray.heal import data
from tourray.heal.config import SoupConfig
from tourray.lake import tables as lk

log = logging.getLogger("tourray")


def _weights(folder: str) -> dict:
    """name -> tensor of a checkpoint folder's safetensors files (loaded lazily per file)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"--models {folder}: not a checkpoint folder (no *.safetensors)")
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _shapes(folder: str) -> dict[str, tuple]:
    """name -> shape from the safetensors headers only (no weights read)."""
    import struct

    out = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not Path(folder).is_dir() or not files:
        raise UserError(f"--models {folder}: not a checkpoint folder (no *.safetensors)")
    for f in files:
        with f.open("rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            head = json.loads(fh.read(n))
        out.update({k: tuple(v["shape"]) for k, v in head.items() if k != "__metadata__"})
    return out


def check_shapes(models: list[str]) -> None:
    """Refuse members whose tensors differ in name or shape, naming the first such tensor."""
    ref = _shapes(models[0])
    for m in models[1:]:
        got = _shapes(m)
        for name in sorted(ref.keys() | got.keys()):
            if name not in got:
                raise UserError(f"--models: {m} has no tensor {name} (in {models[0]}); soups need identical shapes")
            if name not in ref:
                raise UserError(f"--models: {m} has a tensor {name} that {models[0]} lacks; soups need identical shapes")
            if ref[name] != got[name]:
                raise UserError(f"--models: tensor {name} is {list(got[name])} in {m} but {list(ref[name])} in {models[0]}; "
                                "soups need identical shapes (e.g. one pruned student healed with several seeds)")


def average(models: list[str]) -> dict:
    """The float64 mean of the members' tensors, cast back to the first member's dtypes."""
    acc, dtypes = None, {}
    for m in models:
        w = _weights(m)
        if acc is None:
            dtypes = {k: v.dtype for k, v in w.items()}
            acc = {k: v.double() for k, v in w.items()}
        else:
            for k, v in w.items():
                acc[k] += v.double()
    return {k: (v / len(models)).to(dtypes[k]) for k, v in acc.items()}


class HeldOut:
    """The held-out KL of a model to a teacher run: the same hash split as `tourray heal`."""

    def __init__(self, cfg: SoupConfig):
        lake_root, run = cfg.teacher()
        self.teacher = data.open_teacher(lk.Lake(lake_root, cfg.storage_options), run)
        _, self.val = data.split(self.teacher.samples, cfg.val_fraction)
        items = [dict(idx=i, sample_id=s) for i, s in enumerate(self.val)]
        self.rows = []
        for a in range(0, len(items), data.READ_BATCH):
            import pyarrow as pa

            chunk = pa.Table.from_pylist(items[a : a + data.READ_BATCH])
            self.rows += data.read_samples(chunk, self.teacher.lake.root, self.teacher.lake.storage_options,
                                           self.teacher.run, self.teacher.versions).to_pylist()
        self.cfg = cfg

    def kl(self, model) -> float:
        """Mean KL(teacher || model) per held-out text token over the stored partition."""
        from tourray.heal.losses import HealObjective

        obj = HealObjective(model.eval(), 1.0, 1.0, self.cfg.chunk_positions)
        kl = n = 0.0
        for a in range(0, len(self.rows), self.cfg.batch_size):
            k, _, m = obj.evaluate(data.collate(self.rows[a : a + self.cfg.batch_size]))
            kl, n = kl + k, n + m
        return kl / max(n, 1)


def _model_with(folder: str, state: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model


def run_soup(cfg: SoupConfig) -> dict:
    """Check shapes (and the teacher run), then write the uniform or greedy soup to --out."""
    t0 = time.perf_counter()
    models = [str(Path(m)) for m in cfg.models]
    check_shapes(models)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {cfg.out}: exists and is not empty; use a new folder")
    judge = HeldOut(cfg) if cfg.teacher_run else None
    scores, members, trace = {}, models, []
    if judge is not None:
        for m in models:
            scores[m] = judge.kl(_model_with(m, _weights(m)))
            log.info("soup: %s held-out KL %.5f", m, scores[m])
    if cfg.greedy:
        ranked = sorted(models, key=lambda m: scores[m])
        members, best = [ranked[0]], scores[ranked[0]]
        trace.append(dict(added=ranked[0], kl=best))
        for m in ranked[1:]:
            kl = judge.kl(_model_with(ranked[0], average(members + [m])))
            keep = kl < best
            trace.append(dict(tried=m, kl=kl, kept=keep))
            if keep:
                members, best = members + [m], kl
    state = average(members)
    tmp = out.with_name(out.name + ".tmp-soup")
    shutil.rmtree(tmp, ignore_errors=True)
    model = _model_with(members[0], state)
    soup_kl = judge.kl(model) if judge is not None else None
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    for f in Path(members[0]).iterdir():  # config, tokenizer, generation config: the first member's
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and not f.name.startswith("tourray_") \
                and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    rec = dict(method="greedy" if cfg.greedy else "uniform", candidates=models, members=members,
               held_out_kl=scores or None, soup_held_out_kl=soup_kl, greedy_trace=trace or None,
               teacher_run=cfg.teacher_run, val_fraction=cfg.val_fraction,
               seconds=round(time.perf_counter() - t0, 1), created_at=dt.datetime.now(dt.timezone.utc).isoformat())
    (tmp / "tourray_soup.json").write_text(json.dumps(rec, indent=1))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return dict(rec, out=str(out))
