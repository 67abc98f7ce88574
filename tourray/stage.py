"""The one abstraction for a pipeline step.

A stage is a small callable class that Ray Data's `map_batches` drives: heavy state (a model, a
lake handle) is built once per actor in `__init__`; `__call__` takes and returns a `pyarrow.Table`.
The base checks the declared input columns on the first batch and keeps counters that the driver
aggregates into the run summary. Stages never call `ray.init` and never know where they run.
"""

from __future__ import annotations

import abc
import time
from collections import Counter

import pyarrow as pa

from tourray.errors import UserError
from tourray.runtime import keep_freed_memory


class Stage(abc.ABC):
    """Base class: subclasses set `inputs` and implement `process(batch) -> pa.Table`."""

    #: Columns every input batch must have.
    inputs: tuple[str, ...] = ()

    def __init__(self) -> None:
        keep_freed_memory()  # batched tensor work: reuse freed memory instead of faulting it in again
        self.stats: Counter[str] = Counter()
        self._checked = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self._checked:
            missing = [c for c in self.inputs if c not in batch.column_names]
            if missing:
                raise UserError(
                    f"{type(self).__name__}: input batch lacks column(s) {missing}; "
                    f"has {batch.column_names}"
                )
            self._checked = True
        t0 = time.perf_counter()
        out = self.process(batch)
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["batches"] += 1
        return out

    @abc.abstractmethod
    def process(self, batch: pa.Table) -> pa.Table:
        """Turn one input batch into one output table."""
