"""`HealConfig`, `SoupConfig` and `CompressConfig`: every field is also a flag of `tourray heal` / `soup` /
`compress`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from tourray.config import CommaList, BaseConfig, StorageOptions, StoreDtype, storage_options_field
from tourray.prune.evaluate import EvalSettings
from tourray.prune.plan import METHODS, Method

#: Config fields that may change when a heal resumes from its checkpoints without
#: --allow-config-change (how it runs, not what it computes).
RESUMABLE = ("allow_config_change", "threads", "keep_checkpoints", "max_failures", "storage_options")


class HealSettings(BaseConfig):
    """How a heal trains (the `heal:` section of a job; `HealConfig` adds what it trains and where)."""

    max_steps: PositiveInt = Field(200, description="Optimiser steps (each: --batch-size sequences per worker).")
    batch_size: PositiveInt = Field(4, description="Sequences per step and worker.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW (after warm-up; cosine decay to --min-lr-ratio of it).")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear warm-up from 0 to --learning-rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Learning rate at the last step, as a fraction of the peak (cosine decay).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    alpha: float = Field(0.9, description="Loss = alpha * KD + (1 - alpha) * CE on the text tokens; 1 = distillation only, 0 = plain fine-tuning.")
    temperature: float = Field(1.0, gt=0, description="Distillation temperature T (KD is scaled by T^2). With --logits K the teacher's K + rest partition is re-tempered (the rest bucket as one outcome: exact at T = 1); sample:N runs need T = 1.")
    lora_rank: int = Field(0, ge=0, description="0: full fine-tuning; r > 0: LoRA adapters of rank r on every linear layer of the blocks (peft), merged back into the output checkpoint.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling alpha; default 2 x --lora-rank.")
    workers: PositiveInt = Field(1, description="Ray Train workers (data-parallel DDP replicas); each holds one copy of the student.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (0: CPU; then gloo DDP).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per worker; default: cores / workers.")
    seed: int = Field(0, description="Seed of the data order (a new shuffle per pass over the texts) and of LoRA's initialisation; the held-out split does not depend on it.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the teacher run's texts held out (by a hash of the sample id) for the validation KL and early stopping; never trained on.")
    eval_every: PositiveInt = Field(20, description="Validate and checkpoint every this many steps (and at the last).")
    patience: int = Field(3, ge=0, description="Stop after this many validations without a lower validation KL (0: never stop early); the output holds the weights of the best validation.")
    gradient_checkpointing: bool = Field(False, description="Recompute each block's activations in backward (transformers' gradient checkpointing): far less memory for long texts or big students, about a third more compute.")
    chunk_positions: PositiveInt = Field(256, description="Positions per loss chunk: the student's float32 logits are [chunk, vocab] at a time (recomputed in backward), never [batch, length, vocab].")
    max_failures: int = Field(2, ge=0, description="Ray Train FailureConfig: restarts of the worker group (from the last checkpoint) before the heal fails.")
    eval_samples: str | None = Field("samples/eval", description="Eval texts that must never be trained on: a teacher run holding any of them (same sha256) is refused. Missing default folder: not checked (a warning).")
    allow_config_change: bool = Field(False, description="Resume a heal whose config changed since its first start (refused by default: the result would be neither run).")
    keep_checkpoints: bool = Field(False, description="Keep the Ray Train checkpoints (under OUT/.heal/) after a successful heal; by default they are removed.")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError("must be in [0, 1] (1 = distillation only, 0 = cross-entropy only)")
        return v

    @model_validator(mode="after")
    def _lora_alpha(self):
        if self.lora_alpha is None and self.lora_rank > 0:
            self.__dict__["lora_alpha"] = 2.0 * self.lora_rank
        return self



class HealConfig(HealSettings):
    """Distil a student toward a teacher run's stored distribution. Every field is also a flag."""

    student: str = Field(description="Checkpoint folder of the model to heal (e.g. a pruned variant from `tourray prune apply` or `prune width`).")
    teacher_run: str = Field(description="[LAKE:]RUN: the capture run whose stored next-token distribution is the target (captured with `tourray capture --logits K` or `--logits sample:N`); LAKE defaults to --lake.")
    out: str = Field(description="Folder for the healed checkpoint (a standard transformers folder + tourray_heal.json). Re-running with the same --out resumes from its last checkpoint.")
    lake: str = Field("lake", description="Lake of the teacher run (when --teacher-run names none); the per-step metrics go to its table heal_log.")
    storage_options: StorageOptions = storage_options_field()
    run: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="Name of this heal in heal_log (and its lease); default: heal-<name of --out>.")

    def teacher(self) -> tuple[str, str]:
        """(lake, run) of --teacher-run: 'RUN' or 'LAKE:RUN' (a URI lake keeps its scheme)."""
        lake, sep, run = self.teacher_run.rpartition(":")
        if not sep or lake.endswith(("s3", "gs", "az", "file", "memory")) and run.startswith("//"):
            return self.lake, self.teacher_run
        return lake, run

    @property
    def run_name(self) -> str:
        return self.run or f"heal-{Path(self.out).resolve().name}"

    def identity(self) -> dict:
        """What a resume must not change (see RESUMABLE)."""
        return self.model_dump(mode="json", exclude=set(RESUMABLE))


class SoupConfig(BaseConfig):
    """Average checkpoints of identical shapes. Every field is also a flag."""

    models: CommaList[str] = Field(description="Checkpoint folders to average (same architecture and tensor shapes), comma-separated; greedy soups try them in this order unless --teacher-run ranks them.")
    out: str = Field(description="Folder for the souped checkpoint (+ tourray_soup.json).")
    greedy: bool = Field(False, description="Greedy soup (Wortsman et al. 2022): start from the best member by held-out KL, add a member only if the KL of the running average improves. Needs --teacher-run.")
    teacher_run: str | None = Field(None, description="[LAKE:]RUN captured with --logits: the held-out KL is measured on its held-out slice (the same hash split as `tourray heal`).")
    lake: str = Field("lake", description="Lake of the teacher run when --teacher-run names none.")
    storage_options: StorageOptions = storage_options_field()
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out share of the teacher run's texts (must match the heals' --val-fraction to judge on texts they never saw).")
    batch_size: PositiveInt = Field(4, description="Sequences per forward when measuring the held-out KL.")
    gradient_checkpointing: bool = Field(False, description="Recompute each block's activations in backward (transformers' gradient checkpointing): far less memory for long texts or big students, about a third more compute.")
    chunk_positions: PositiveInt = Field(256, description="Positions per float32 logits chunk when measuring the held-out KL.")


    @model_validator(mode="after")
    def _check(self):
        if len(self.models) < 2:
            raise ValueError("a soup needs at least two --models")
        if self.greedy and not self.teacher_run:
            raise ValueError("--greedy ranks members by held-out KL: give --teacher-run [LAKE:]RUN")
        return self

    def teacher(self) -> tuple[str, str]:
        return HealConfig.teacher(self)  # type: ignore[arg-type]


class CompressStep(BaseConfig):
    """What one round of `tourray compress` removes from the model it starts from (scored on a fresh
    capture of that model): width ({keep_neurons: 0.85}), depth ({method: block-influence, remove: 1,
    patch: lstsq}) or both, sized by `target` ({remove: 1, patch: lstsq, target: 0.8})."""

    keep_neurons: float = Field(1.0, gt=0, le=1, description="Width: fraction of the current model's FFN neurons kept per block.")
    keep_heads: float = Field(1.0, gt=0, le=1, description="Width: fraction of query heads kept per key/value group.")
    score: Literal["magnitude", "variance", "activation-norm"] = Field("activation-norm", description="Width: how FFN neurons and heads are scored (activation-norm and variance read the round's capture).")
    method: Method = Field("block-influence", description="Depth: the plan method that picks the blocks to remove (" + ", ".join(METHODS) + ").")
    remove: int = Field(0, ge=0, description="Depth: blocks removed this round.")
    patch: Literal["none", "lstsq"] = Field("none", description="Depth: a linear patch per removed span, fitted on the round's capture.")
    target: float | None = Field(None, gt=0, lt=1, description="Combined: after removing `remove` blocks, narrow the kept blocks' FFNs so that the round keeps this fraction of the current model's parameters.")

    @model_validator(mode="after")
    def _check(self):
        width = self.keep_neurons < 1 or self.keep_heads < 1
        if self.target is not None and not self.remove:
            raise ValueError("target (combined) needs remove >= 1 (the blocks removed before the FFNs are narrowed)")
        if self.target is not None and self.keep_neurons < 1:
            raise ValueError("give keep_neurons or target, not both (target sizes the FFNs)")
        if self.target is not None and self.score != "activation-norm":
            raise ValueError("combined steps score neurons by activation-norm (as `tourray qa` does); drop score")
        if self.remove and width and self.target is None:
            raise ValueError("a step that removes blocks and narrows the FFNs is a combined step: give target instead of keep_neurons/keep_heads")
        if not width and not self.remove:
            raise ValueError("the step removes nothing: give keep_neurons/keep_heads < 1, or remove >= 1 blocks")
        return self

    def family(self) -> str:
        return "combined" if self.target is not None else "depth" if self.remove else "width"

    def label(self) -> str:
        if self.family() == "width":
            return (f"width n{self.keep_neurons:g} h{self.keep_heads:g}"
                    + ("" if self.score == "activation-norm" else f" {self.score}"))
        depth = f"{self.method} -{self.remove}" + ("" if self.patch == "none" else f" +{self.patch}")
        return depth if self.target is None else f"{depth}, to {self.target:g}" + \
            ("" if self.keep_heads >= 1 else f" h{self.keep_heads:g}")


#: CompressConfig fields that may change between runs of one --name: when to stop, how rounds are
#: judged (every round is judged again from the lake) and where the report goes, not what a round makes.
COMPRESS_RESUMABLE = ("target", "max_rounds", "criteria", "reports", "storage_options")


class CompressConfig(EvalSettings):
    """`tourray compress`: the iterative recipe to a parameter target. Each round captures the current
    model on the evidence texts, prunes it (the round's step), heals it toward the teacher run and
    judges it against the original on the eval texts. Every field is also a flag."""

    name: str = Field("compress", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="Name of this compression: report reports/compress_<name>.md, checkpoints under <workdir>/<name>/, lake runs compress-<name>.*")
    model: str = Field(description="The original checkpoint folder (safetensors): round 1 starts from it; every round is judged against it.")
    teacher_run: str = Field(description="Run of --lake captured from the original with --logits on the training texts (never the eval texts): what every round heals toward.")
    target: float = Field(0.7, gt=0, le=1, description="Stop when the result keeps at most this fraction of the original's parameters.")
    steps: list[CompressStep] = Field(description="What each round removes, in order; the last step repeats until the target. A YAML list; as a flag, YAML text: --steps '[{keep_neurons: 0.85}]' or '{remove: 1, patch: lstsq}'.")
    max_rounds: PositiveInt = Field(10, description="Stop after this many rounds even short of the target.")
    samples: str = Field("samples", description="Folder of the evidence texts each round's capture runs on (what plans, patches and unit scores read).")
    include: CommaList[str] | None = Field(None, description="Only evidence texts matching these globs (relative to --samples); comma-separated.")
    store_dtype: StoreDtype = Field(StoreDtype.float16, description="dtype of the vectors each round's evidence capture stores (depth steps).")
    group_size: PositiveInt = Field(16, description="Evidence capture: samples per atomic commit.")
    system_prompt: str | None = Field(None, description="System prompt file of every capture (evidence and eval; the teacher run's).")
    batch_size: PositiveInt = Field(8, description="Samples per forward pass of the evidence and eval captures.")
    max_length: int = Field(1024, gt=1, description="Evidence and eval captures truncate texts to this many tokens.")
    first_run: str | None = Field(None, description="An existing evidence run of the original (e.g. `smol`, with resid_post/resid_mid and --stats units as the step needs) for round 1; default: captured like every round.")
    base_run: str | None = Field(None, description="An existing capture of the original on the same eval texts to judge against; default: compress-<name>.base, captured once.")
    heal: HealSettings = Field(default_factory=HealSettings, description="How every round is healed (tourray heal's settings).")
    workdir: str = Field(".cache/compress", description="Where each round's pruned and healed checkpoints are written (kept: a re-run resumes from them).")
    reports: str = Field("reports", description="Folder of the report (compress_<name>.md, .json, a plot).")

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v):
        if isinstance(v, str):  # a flag: YAML text
            import yaml

            try:
                v = yaml.safe_load(v)
            except yaml.YAMLError as e:
                raise ValueError(f"not YAML ({str(e).splitlines()[0]})") from None
        if isinstance(v, dict):
            v = [v]
        if v is None or v == []:
            raise ValueError("no step: give at least one, e.g. [{keep_neurons: 0.85}] or [{remove: 1, patch: lstsq}]")
        return v


    @property
    def prefix(self) -> str:
        return f"compress-{self.name}"

    def step(self, round_: int) -> CompressStep:
        """The step of round `round_` (1-based): the last one repeats."""
        return self.steps[min(round_, len(self.steps)) - 1]

    def identity(self) -> dict:
        """What the rounds already made depend on (see COMPRESS_RESUMABLE)."""
        return self.model_dump(mode="json", exclude=set(COMPRESS_RESUMABLE))
