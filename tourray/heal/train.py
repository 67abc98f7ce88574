"""`tourray heal`: the driver (checks, lease, Ray Train `TorchTrainer`, heal_log, output) and the
per-worker loop it hands to Ray Train.

    driver: check everything ──► OUT/.heal/config.json ──► lease("heal", run) ──► TorchTrainer.fit()
              ▲ per-step metrics (a Ray queue, fed by a UserCallback in Ray Train's controller):
              │ progress bar; heal_log rows committed each time a checkpoint is persisted
    worker: student (+ LoRA) ─ DDP ─ AdamW, warm-up + cosine, clipping; batches from
            get_dataset_shard("train"); every --eval-every steps: held-out KL (each worker: all of it),
            early stopping, ray.train.report(metrics, checkpoint); a restart resumes from
            get_checkpoint() and skips the batches it had consumed (open-source Ray restarts the
            dataset from its start)
    driver: the final checkpoint's model (best validation, LoRA merged) ──► OUT + tourray_heal.json

Exactness: on CPU with one worker a killed heal re-run with the same --out ends with the same
weights as an uninterrupted one (tests/heal/test_train.py); with several workers Ray's
streaming split deals rows dynamically, so a resume trains on the same number of rows, not
necessarily the same ones.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import queue as queue_mod
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from tourray.errors import UserError
from tourray.heal import data
from tourray.heal.config import HealConfig
from tourray.lake import tables as lk

log = logging.getLogger("tourray")

#: The Ray Train run's name under OUT/.heal (its checkpoints: OUT/.heal/ray/checkpoint_*).
RAY_NAME = "ray"


# -- checks -------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the driver resolved before writing anything."""

    cfg: HealConfig
    teacher: data.TeacherRun
    train: list[str]
    val: list[str]
    out: Path
    resume: bool
    student_revision: str


def _read_config(student: str):
    from transformers import AutoConfig

    p = Path(student).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        raise UserError(f"--student {student}: not a checkpoint folder (no config.json); give the folder that "
                        "`tourray prune apply` / `prune width` / `model import-gguf` wrote")
    try:
        return AutoConfig.from_pretrained(str(p)).get_text_config()
    except (OSError, ValueError) as e:
        raise UserError(f"--student {student}: not a readable checkpoint ({str(e).splitlines()[0]})") from None


def check(cfg: HealConfig) -> Prepared:
    """Every refusal of `tourray heal`, before anything is written."""
    from transformers import AutoTokenizer

    from tourray.corpus import texts as corpus
    from tourray.model.identity import model_revision, tokenizer_sha256

    if cfg.lora_rank > 0:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise UserError(f"--lora-rank {cfg.lora_rank}: LoRA needs peft, which is not installed; pip install 'tourray[heal]'")
    sc = _read_config(cfg.student)
    # absolute: Ray Train's workers run in another working directory (a relative folder would be
    # taken for a hub id there)
    cfg = cfg.model_copy(update={"student": str(Path(cfg.student).expanduser().resolve())})
    if not any(Path(cfg.student).glob("*.safetensors")) and not any(Path(cfg.student).glob("*.bin")):
        raise UserError(f"--student {cfg.student}: a config but no weights (*.safetensors)")
    lake_root, run = cfg.teacher()
    lake = lk.Lake(lake_root, cfg.storage_options)
    teacher = data.open_teacher(lake, run)
    try:
        tok = AutoTokenizer.from_pretrained(cfg.student)
    except (OSError, ValueError) as e:
        raise UserError(f"--student {cfg.student}: no tokenizer in the folder ({str(e).splitlines()[0]})") from None
    if tokenizer_sha256(tok) != teacher.row["tokenizer_sha256"]:
        raise UserError(f"--student {cfg.student}: its tokenizer differs from the teacher run's ({teacher.row['tokenizer']}); "
                        "distillation over stored token ids needs the same tokenizer")
    tv = _teacher_vocab(teacher.row)
    if tv is not None and tv != sc.vocab_size:
        raise UserError(f"--student {cfg.student}: its vocabulary has {sc.vocab_size} logits, the teacher's "
                        f"({teacher.row['model']}) {tv}; the stored ids index the teacher's vocabulary")
    if teacher.spec[0] == "sample" and cfg.temperature != 1:
        raise UserError(f"--temperature {cfg.temperature:g}: the teacher run stores sampled support "
                        f"(--logits sample:{teacher.spec[1]}), an unbiased target only at temperature 1; use --temperature 1")
    if cfg.eval_samples:
        ev = Path(cfg.eval_samples)
        if ev.exists():
            evals = {s.sha256: s.source for s in corpus.load_samples(ev, skip_invalid=True)[0]}
            bad = [s["source"] for s in teacher.samples if s["sha256"] in evals]
            if bad:
                raise UserError(f"--teacher-run {run}: {len(bad)} of its texts are eval texts of {cfg.eval_samples} (same "
                                f"sha256: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); the eval sets are never "
                                "trained on: heal on a run of the training texts")
        elif cfg.eval_samples != HealConfig.model_fields["eval_samples"].default:
            raise UserError(f"--eval-samples {cfg.eval_samples}: no such folder")
        else:
            log.warning("eval texts %s not found: the teacher run is not checked against them", cfg.eval_samples)
    train, val = data.split(teacher.samples, cfg.val_fraction)
    out = Path(cfg.out).expanduser().resolve()
    resume = False
    if out.exists() and any(out.iterdir()):
        saved = out / ".heal" / "config.json"
        finished = (out / "tourray_heal.json").is_file()
        if saved.is_file():
            old = json.loads(saved.read_text())
            new = cfg.identity()
            default = {k: f.default for k, f in HealConfig.model_fields.items()}  # fields newer than the first start
            changed = sorted(k for k in set(old) | set(new) if old.get(k, default.get(k)) != new.get(k, default.get(k)))
            if changed and (finished or not cfg.allow_config_change):
                what = "holds a finished heal" if finished else "holds a heal in progress"
                raise UserError(f"--out {cfg.out}: {what} with another config ({', '.join(changed[:6])} changed); use a "
                                "new --out" + ("" if finished else ", or --allow-config-change to resume it anyway"))
            resume = True
        elif finished:
            resume = True  # (a heal whose .heal/ was removed by hand): run_heal reports it
        else:
            raise UserError(f"--out {cfg.out}: exists and is not a heal's folder; use a new or empty folder")
    return Prepared(cfg, teacher, train, val, out, resume, model_revision(cfg.student, None))


def _teacher_vocab(row: dict) -> int | None:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(row["model"], revision=None).get_text_config().vocab_size
    except Exception:  # noqa: BLE001 - the teacher may be a hub model offline or gone: the tokenizer check stands
        return None


# -- the worker loop ------------------------------------------------------------------------------
def lr_lambda(cfg: HealConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def load_student(cfg: HealConfig, device: str = "cpu"):
    """The student in float32 (+ LoRA adapters on every linear layer of its blocks, seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).to(device)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and ".layers." in n})
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets, bias="none"))
    model.train()
    return model


def _trainable_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _all_reduce(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function: the whole training of one replica."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint

    cfg = HealConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = str(ray.train.torch.get_device()) if cfg.gpus_per_worker > 0 else "cpu"  # this worker's GPU
    if device == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers))
    model = load_student(cfg, device)
    from tourray.heal.losses import HealObjective

    objective = HealObjective(model, cfg.alpha, cfg.temperature, cfg.chunk_positions)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    st = dict(step=0, tokens=0, best_val=None, best_step=0, since_best=0, done=False, val0=None)
    best = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            meta = json.loads(Path(d, "meta.json").read_text())
            if meta.get("done"):  # the run had finished: hand its final checkpoint over again
                with tempfile.TemporaryDirectory(prefix="heal-final-") as final:
                    shutil.copytree(d, final, dirs_exist_ok=True)
                    ray.train.report(dict(meta["metrics"], final=True),
                                     checkpoint=Checkpoint.from_directory(final) if rank == 0 else None)
                return
            state = torch.load(Path(d, "state.pt"), weights_only=False)
            model.load_state_dict(state["model"], strict=False)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            best = torch.load(Path(d, "best.pt")) if Path(d, "best.pt").is_file() else _trainable_state(model)
            st = meta["state"]
    ddp = ray.train.torch.prepare_model(objective, move_to_device=False) if world > 1 else objective

    def validate() -> tuple[float, float]:
        model.eval()
        kl = agree = n = 0.0
        for b in ray.train.get_dataset_shard("val").iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow"):
            k, a, m = objective.evaluate(data.collate(b.to_pylist(), device))
            kl, agree, n = kl + k, agree + a, n + m
        model.train()  # every worker reads the whole held-out set (not split): one value, one early-stop decision
        return kl / max(n, 1), agree / max(n, 1)

    def report(metrics: dict, checkpoint: bool = False, final: bool = False) -> None:
        """ray.train.report, with rank 0's checkpoint (training state, best weights, or the final model)
        written to a temporary folder: Ray Train copies it to the run's storage during the call and leaves
        the folder behind, so it is removed here (each one is a whole model)."""
        if rank != 0 or not checkpoint:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="heal-ckpt-") as tmp:
            ray.train.report(metrics, checkpoint=write(Path(tmp), metrics, final))

    def write(d: Path, metrics: dict, final: bool):
        if final:
            if best is not None and st["best_step"] != st["step"]:
                model.load_state_dict(best, strict=False)
            out = model.merge_and_unload() if cfg.lora_rank > 0 else model
            out.save_pretrained(d / "model", safe_serialization=True)
        else:
            torch.save(dict(model=_trainable_state(model), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                            rng=torch.get_rng_state()), d / "state.pt")
            if best is not None and st["best_step"] != st["step"]:
                torch.save(best, d / "best.pt")
        (d / "meta.json").write_text(json.dumps(dict(state=st, metrics=metrics, done=final)))
        return Checkpoint.from_directory(str(d))

    if st["step"] == 0 and st["val0"] is None:  # the student as it came: the "before" of the report
        v, a = validate()
        st.update(val0=v, best_val=v, best_step=0)
        best = _trainable_state(model)
        report(dict(step=0, val_kl=v, val_top1=a, tokens=0))
    skip = st["step"]  # batches this worker consumed before the restart (its shard restarts from the top)
    train_it = ray.train.get_dataset_shard("train").iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow",
                                                                prefetch_batches=2)
    t0 = time.perf_counter()  # a step's time includes waiting for its batch: what tokens/s should show
    for i, b in enumerate(train_it):
        if i < skip:
            t0 = time.perf_counter()
            continue
        if st["step"] >= cfg.max_steps or st["done"]:
            break
        batch = data.collate(b.to_pylist(), device)
        loss, kd, ce = ddp(batch)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_s, kd_s, ce_s, n_tok = _all_reduce([float(loss) * batch.n_tokens, float(kd) * batch.n_tokens,
                                                 float(ce) * batch.n_tokens, float(batch.n_tokens)])
        st["step"] += 1
        st["tokens"] += int(n_tok)
        metrics = dict(step=st["step"], loss=loss_s / n_tok, kd=kd_s / n_tok, ce=ce_s / n_tok, learning_rate=lr, grad_norm=gnorm,
                       tokens=st["tokens"], tokens_per_s=n_tok / max(time.perf_counter() - t0, 1e-9))
        ckpt = False
        last = st["step"] >= cfg.max_steps
        if st["step"] % cfg.eval_every == 0 or last:
            v, a = validate()
            metrics.update(val_kl=v, val_top1=a)
            if v < st["best_val"]:
                st.update(best_val=v, best_step=st["step"], since_best=0)
                best = _trainable_state(model)
            else:
                st["since_best"] += 1
            if cfg.patience and st["since_best"] >= cfg.patience:
                st["done"] = True  # early stop: the output is the best validation's weights
            ckpt = True
        report(metrics, checkpoint=ckpt)
        t0 = time.perf_counter()
        if last or st["done"]:
            break
    st["done"] = True
    final = dict(step=st["step"], tokens=st["tokens"], best_step=st["best_step"], best_val=st["best_val"], val0=st["val0"],
                 stopped_early=st["step"] < cfg.max_steps)
    report(dict(final, final=True), checkpoint=True, final=True)


# -- the driver ---------------------------------------------------------------------------------
def _metrics_callback(q):
    from ray.train.v2.api.callback import UserCallback

    class Forward(UserCallback):
        """Runs in Ray Train's controller: hands each report (rank 0's metrics, whether a checkpoint
        was persisted) to the driver's queue."""

        def __init__(self, q):
            self.q = q

        def after_report(self, run_context, metrics, checkpoint):
            self.q.put((dict(metrics[0]), checkpoint is not None))

    return Forward(q)


class HealLog:
    """heal_log rows, buffered and committed under the heal's lease each time a checkpoint persists:
    so the table never holds a step a resume will redo."""

    def __init__(self, lake: lk.Lake, lease, run: str, teacher_run: str):
        self.lake, self.lease, self.run, self.teacher_run = lake, lease, run, teacher_run
        self.schema = lk.schema("heal_log")
        lake.ensure("heal_log", self.schema)
        q = f"run = {lk.sql_quote(run)}"
        self.q = q
        steps = lake.read("heal_log", ["step"], filter=q).column(0).to_pylist()
        self.logged = max(steps, default=-1)
        self.buf: dict[int, dict] = {}

    def add(self, m: dict) -> None:
        step = int(m["step"])
        for s in [s for s in self.buf if s >= step]:  # a restart sends steps again: the newest wins
            del self.buf[s]
        nan = float("nan")
        self.buf[step] = dict(run=self.run, teacher_run=self.teacher_run, step=step, loss=m.get("loss", nan),
                              kd=m.get("kd", nan), ce=m.get("ce", nan), learning_rate=m.get("learning_rate", nan),
                              grad_norm=m.get("grad_norm", nan), tokens=int(m.get("tokens", 0)),
                              tokens_per_s=m.get("tokens_per_s", nan), val_kl=m.get("val_kl"), val_top1=m.get("val_top1"),
                              created_at=dt.datetime.now(dt.timezone.utc))

    def commit(self) -> None:
        if not self.buf:
            return
        rows = [self.buf[s] for s in sorted(self.buf)]
        self.lease.check()  # the fence, before the commits
        if self.logged >= rows[0]["step"]:
            self.lake.delete("heal_log", f"{self.q} AND step >= {rows[0]['step']}")
        self.lake.append("heal_log", pa.Table.from_pylist(rows, schema=self.schema), self.schema)
        self.logged = rows[-1]["step"]
        self.buf.clear()


# Ray Train 2.x hands each worker's report to its controller through a queue of one, emptied when the
# controller polls (every 2 s by default): a step shorter than that waited for the poll, so a small
# model healed at one step per 2 s. The driver's value is passed on to the controller and its workers.
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"


def _trainer_class(state_api: bool):
    """TorchTrainer with the result poll above (unless the user set it), less Ray's PlacementGroupCleaner
    on a Ray without the state API (`tourray.runtime.has_state_api`). The cleaner asks the state API
    whether the controller lives; without an API server each question blocks ~40 s and every heal ended
    with a 12 s stall ("Failed to stop PlacementGroupCleaner gracefully"). Its job, freeing the placement
    group of a controller that died, is then done when the driver's job ends. With a dashboard it stays."""
    from ray.train.torch import TorchTrainer

    os.environ.setdefault(POLL_ENV, POLL_S)

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # a Ray without the cleaner
        return TorchTrainer
    if state_api or not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def trainer(p: Prepared, q, state_api: bool = True):
    """The TorchTrainer of a heal: datasets, scaling, failure and checkpoint settings."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    cfg = p.cfg
    rows = cfg.max_steps * cfg.batch_size * cfg.workers
    ds = {"train": data.dataset(data.schedule(p.train, rows, cfg.seed), p.teacher),
          "val": data.dataset([dict(idx=i, sample_id=s, epoch=0) for i, s in enumerate(p.val)], p.teacher)}
    with warnings.catch_warnings():  # Ray 2.60 warns about a field its own defaults set (exclude_resources)
        warnings.simplefilter("ignore")
        opts = DataConfig.default_ingest_options()
    opts.preserve_order = True  # the seeded order is the order trained on (exact resume, 1 worker)
    res = {"CPU": cfg.cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})
    return _trainer_class(state_api)(
        train_loop, train_loop_config={"cfg": cfg.model_dump(mode="json")}, datasets=ds,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=opts),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0, resources_per_worker=res),
        run_config=RunConfig(name=RAY_NAME, storage_path=str(p.out / ".heal"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=[_metrics_callback(q)]),
    )


def run_heal(cfg: HealConfig, progress: bool = True, address: str | None = None) -> dict:
    """Check, then train (or resume) and write the healed checkpoint to --out."""
    t0 = time.perf_counter()
    p = check(cfg)
    cfg = p.cfg
    if (p.out / "tourray_heal.json").is_file():
        rec = json.loads((p.out / "tourray_heal.json").read_text())
        log.info("%s is already healed (%d steps); nothing to do", p.out, rec.get("steps", 0))
        return dict(rec, already_done=True, out=str(p.out))
    from tourray.runtime import init_ray

    init_ray(address)
    (p.out / ".heal").mkdir(parents=True, exist_ok=True)
    if not (p.out / ".heal" / "config.json").is_file() or cfg.allow_config_change:
        (p.out / ".heal" / "config.json").write_text(json.dumps(cfg.identity(), indent=1))
    with p.teacher.lake.lease("heal", run=cfg.run_name) as lease:
        return _train(p, lease, t0, progress)


def _train(p: Prepared, lease, t0: float, progress: bool) -> dict:
    from ray.util.queue import Queue
    from tqdm import tqdm

    from tourray.runtime import has_state_api

    cfg = p.cfg
    hl = HealLog(p.teacher.lake, lease, cfg.run_name, p.teacher.run)
    q = Queue()
    res: dict = {}

    def fit():
        try:
            res["result"] = trainer(p, q, state_api=has_state_api()).fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            res["error"] = e

    th = threading.Thread(target=fit, name="heal-fit", daemon=True)
    th.start()
    bar = tqdm(total=cfg.max_steps, unit="step", disable=not progress, dynamic_ncols=True, desc=f"heal {cfg.run_name}")
    final, first = None, None
    try:
        while th.is_alive() or not q.empty():
            try:
                m, persisted = q.get(timeout=0.5)
            except queue_mod.Empty:
                continue
            if m.get("final"):
                final = m
                continue
            first = m if first is None else first
            hl.add(m)
            bar.n = int(m["step"])
            post = [f"loss {m['loss']:.3f}" if "loss" in m else "", f"val KL {m['val_kl']:.4f}" if "val_kl" in m else "",
                    f"{m['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in m else ""]
            bar.set_postfix_str(", ".join(x for x in post if x))
            bar.refresh()
            if persisted:
                hl.commit()
    finally:
        bar.close()
    th.join()
    if "error" in res:
        raise _user_error(res["error"], cfg) from None
    result = res["result"]
    hl.commit()
    if result.checkpoint is None or final is None:
        raise UserError("heal finished without a final checkpoint (see the Ray Train log above)")
    return _write_output(p, result.checkpoint, final, t0)


def _user_error(e: BaseException, cfg: HealConfig) -> UserError:
    from tourray.runtime import user_error_in

    failures = getattr(e, "worker_failures", None) or {}
    for inner in list(failures.values()) + [e]:
        if err := user_error_in(inner):
            return err
    first = next(iter(failures.values()), e)
    line = (str(first).strip().splitlines() or [type(first).__name__])
    return UserError(f"heal failed ({cfg.max_failures} restart(s) allowed): {type(first).__name__}: {line[-1][:300]}; "
                     f"re-run the same command to resume from the last checkpoint")


def _write_output(p: Prepared, checkpoint, final: dict, t0: float) -> dict:
    """The final checkpoint's model + the student's tokenizer into OUT, then tourray_heal.json last."""
    import tourray
    from transformers import AutoTokenizer

    from tourray.lake.runs import library_versions

    cfg = p.cfg
    with checkpoint.as_directory() as d:
        for f in Path(d, "model").iterdir():
            shutil.copy2(f, p.out / f.name)
    AutoTokenizer.from_pretrained(cfg.student).save_pretrained(p.out)
    for extra in ("generation_config.json",):
        if (Path(cfg.student) / extra).is_file() and not (p.out / extra).is_file():
            shutil.copy2(Path(cfg.student) / extra, p.out / extra)
    student_prov = {f.name: json.loads(f.read_text()) for f in sorted(Path(cfg.student).glob("tourray_*.json"))}
    rec = dict(
        student=str(Path(cfg.student).resolve()), student_revision=p.student_revision, student_provenance=student_prov,
        teacher=dict(lake=p.teacher.lake.root, run=p.teacher.run, model=p.teacher.row["model"],
                     model_revision=p.teacher.row["model_revision"], logits=f"{p.teacher.spec[0]}:{p.teacher.spec[1]}"),
        lake_versions=p.teacher.versions, heal_run=cfg.run_name, config=cfg.model_dump(mode="json"),
        train_texts=len(p.train), held_out_texts=len(p.val), steps=final["step"], tokens=final["tokens"],
        best_step=final["best_step"], val_kl_before=final["val0"], val_kl_best=final["best_val"],
        stopped_early=final["stopped_early"], lora_merged=cfg.lora_rank > 0, seconds=round(time.perf_counter() - t0, 1),
        tourray_version=tourray.__version__, versions=library_versions(),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
    )
    try:
        from importlib.metadata import version

        rec["versions"]["peft"] = version("peft")
    except Exception:  # noqa: BLE001 - peft is optional (LoRA only)
        pass
    (p.out / "tourray_heal.json").write_text(json.dumps(rec, indent=1))
    if not cfg.keep_checkpoints:
        shutil.rmtree(p.out / ".heal" / RAY_NAME, ignore_errors=True)
    return dict(rec, already_done=False, out=str(p.out))
