"""How a compressed variant is judged, shared by `prune sweep` and `tourray qa`: the eval texts
captured tokens-only with the original as the KL reference, then `compare_runs.sql` against the
original's run over the same texts and the verdict's criteria."""

from __future__ import annotations

import json

from pydantic import Field, PositiveInt

from tourray.capture.config import HFEngineConfig
from tourray.lake import tables as lk
from tourray.config import CommaList, BaseConfig, StorageOptions, storage_options_field
from tourray.prune.verdict import Criteria


class EvalSettings(BaseConfig):
    """The eval side of a sweep or QA config (fields are flags of both)."""

    lake: str = Field("lake", description="Lake holding the evidence run; baseline and variant runs are written here too.")
    storage_options: StorageOptions = storage_options_field()
    eval_samples: str = Field("samples/eval", description="Texts every variant is judged on (folder of category subfolders).")
    eval_include: CommaList[str] | None = Field(None, description="Only eval texts matching these globs (relative to --eval-samples): a named subset.")
    system_prompt: str | None = Field(None, description="System prompt file of the eval captures (use the evidence run's).")
    batch_size: PositiveInt = Field(8, description="Eval capture batch size.")
    max_length: int = Field(1024, gt=1, description="Eval capture truncation.")
    criteria: Criteria = Field(default_factory=Criteria, description="Verdict criteria.")
    hf: HFEngineConfig = Field(default_factory=HFEngineConfig, description="transformers engine settings of the eval captures.")
    kl_top_k: int = Field(1024, ge=0, description="The original's eval run stores its K most likely next tokens per text token (--logits K), and each variant's KL to the original is computed from them (--reference-run) instead of running the original beside every variant: about half the eval time, the same verdicts (they read surprisal only). That KL is over the K ids + the rest of the mass: exact when K >= the vocabulary, otherwise a lower bound (docs/pruning.md gives its measured error). 0 = run the original beside each variant (the exact KL).")


    def capture_config(self, model: str, run: str, reference: str | None, base_run: str | None = None):
        """Tokens only (no vectors). The original's own run (`reference` None) also stores its top-K
        distribution; a variant's run (`reference` = the original) gets KL per token from that stored
        distribution of `base_run` when there is one, else by running the original beside it."""
        from tourray.capture import CaptureConfig

        ref = self._base_logits(model, run) if reference is None else self._kl_reference(reference, base_run)
        return CaptureConfig(model=model, samples=self.eval_samples, include=self.eval_include, lake=self.lake,
                             storage_options=self.storage_options, run=run, layers="none",
                             system_prompt=self.system_prompt, batch_size=self.batch_size,
                             group_size=max(self.batch_size, 16), max_length=self.max_length, hf=self.hf, **ref)

    def _base_logits(self, model: str, run: str) -> dict:
        """--logits of the original's eval run: as an existing run was captured (a resume may not
        change it), else min(kl_top_k, vocabulary)."""
        if (row := self._run_row(run)) is not None:
            return dict(logits=json.loads(row["manifest"])["config"].get("logits"))
        if not self.kl_top_k:
            return {}
        from tourray.capture.plan import vocab_size

        vocab = vocab_size(model)
        return dict(logits=str(min(self.kl_top_k, vocab) if vocab else self.kl_top_k))

    def _kl_reference(self, original: str, base_run: str | None) -> dict:
        row = None if base_run is None or not self.kl_top_k else self._run_row(base_run)
        spec = None if row is None else json.loads(row["manifest"])["config"].get("logits")
        return dict(reference_run=base_run) if spec and not spec.startswith("sample:") else dict(reference=original)

    def _run_row(self, run: str) -> dict | None:
        lake = self.open_lake()
        rows = lake.read("runs", ["manifest"], filter=f"run = {lk.sql_quote(run)}").to_pylist() if lake.exists("runs") else []
        return rows[0] if rows else None

    def open_lake(self) -> lk.Lake:
        return lk.Lake(self.lake, self.storage_options)

    def n_eval(self) -> int:
        from tourray.corpus import texts as corpus

        return len(corpus.load_samples(self.eval_samples, include=self.eval_include)[0])


def kl_note(config: dict) -> str:
    """What a report's mean KL is, from the job's config."""
    k = config.get("kl_top_k", 0)
    if not k:
        return "KL(original || variant) per text token over the whole vocabulary (the original run beside each variant)."
    return (f"KL(original || variant) per text token over the original's stored top-{k} next tokens plus the "
            "rest of their mass, read from the lake: a lower bound of the full-vocabulary KL, equal to it when "
            f"{k} >= the vocabulary (`kl_top_k: 0` runs the original beside each variant for the exact value).")


def is_complete(lake: lk.Lake, run: str, n_samples: int) -> bool:
    if not lake.exists("samples"):
        return False
    return lake.read("samples", ["sample_id"], filter=f"run = {lk.sql_quote(run)}").num_rows == n_samples


def capture_eval(cfg: EvalSettings, model: str, run: str, reference: str | None, progress: bool = False,
                 base_run: str | None = None) -> dict:
    """Capture `model` on the eval texts as `run` (in this process: it may itself be a Ray task)."""
    from tourray.capture import run_capture

    return run_capture(cfg.capture_config(model, run, reference, base_run), progress=progress, executor="local")


def judge(cfg: EvalSettings, base_run: str, run: str) -> dict:
    """compare_runs.sql of `run` against `base_run`, and the verdict."""
    from tourray.prune.verdict import compare, verdict

    table = compare(cfg.open_lake(), base_run, run)
    return dict(comparison=table.to_pylist(), verdict=verdict(table, criteria=cfg.criteria))
