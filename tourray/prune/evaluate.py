"""How a compressed variant is judged, shared by `prune sweep` and `tourray qa`: the eval texts
captured tokens-only with the original as the KL reference, then `compare_runs.sql` against the
original's run over the same texts and the verdict's criteria."""

from __future__ import annotations

from pydantic import Field, PositiveInt, field_validator

from tourray.lake import tables as lk
from tourray.config import BaseConfig, StorageOptions, comma_list, storage_options_field
from tourray.prune.verdict import Criteria


class EvalSettings(BaseConfig):
    """The eval side of a sweep or QA config (fields are flags of both)."""

    lake: str = Field("lake", description="Lake holding the evidence run; baseline and variant runs are written here too.")
    storage_options: StorageOptions = storage_options_field()
    eval_samples: str = Field("samples/eval", description="Texts every variant is judged on (folder of category subfolders).")
    eval_include: list[str] | None = Field(None, description="Only eval texts matching these globs (relative to --eval-samples): a named subset.")
    system_prompt: str | None = Field(None, description="System prompt file of the eval captures (use the evidence run's).")
    batch_size: PositiveInt = Field(8, description="Eval capture batch size.")
    max_length: int = Field(1024, gt=1, description="Eval capture truncation.")
    criteria: Criteria = Field(default_factory=Criteria, description="Verdict criteria.")

    @field_validator("eval_include", mode="before")
    @classmethod
    def _split_include(cls, v):
        return comma_list(v)

    def capture_config(self, model: str, run: str, reference: str | None):
        """Tokens only (no vectors), KL against `reference` (the original) per token."""
        from tourray.capture import CaptureConfig

        return CaptureConfig(model=model, samples=self.eval_samples, include=self.eval_include, lake=self.lake,
                             storage_options=self.storage_options, run=run, layers="none",
                             system_prompt=self.system_prompt, batch_size=self.batch_size,
                             group_size=max(self.batch_size, 16), max_length=self.max_length, reference=reference)

    def open_lake(self) -> lk.Lake:
        return lk.Lake(self.lake, self.storage_options)

    def n_eval(self) -> int:
        from tourray.corpus import texts as corpus

        return len(corpus.load_samples(self.eval_samples, include=self.eval_include)[0])


def is_complete(lake: lk.Lake, run: str, n_samples: int) -> bool:
    if not lake.exists("samples"):
        return False
    return lake.read("samples", ["sample_id"], filter=f"run = {lk.sql_quote(run)}").num_rows == n_samples


def capture_eval(cfg: EvalSettings, model: str, run: str, reference: str | None, progress: bool = False) -> dict:
    """Capture `model` on the eval texts as `run` (in this process: it may itself be a Ray task)."""
    from tourray.capture import run_capture

    return run_capture(cfg.capture_config(model, run, reference), progress=progress, executor="local")


def judge(cfg: EvalSettings, base_run: str, run: str) -> dict:
    """compare_runs.sql of `run` against `base_run`, and the verdict."""
    from tourray.prune.verdict import compare, verdict

    table = compare(cfg.open_lake(), base_run, run)
    return dict(comparison=table.to_pylist(), verdict=verdict(table, criteria=cfg.criteria))
