"""A capture driver that SIGKILLs itself at a chosen instant (used by test_resume.py).

    python _kill_capture.py INSTANT CONFIG_JSON

Runs `run_capture(CaptureConfig(**CONFIG_JSON))` with its own embedded Ray, after patching (in this
process only; tourray itself is untouched) what the driver calls so that, at INSTANT, the whole
process group (this driver, its Ray and the actors) gets SIGKILL:

- tables:         right after `prepare_lake` made the tables and the run row; no group yet
- half_group:     at the first group's `activations` commit: `blocks` and `tokens` are committed,
                  the rest of the group (its `samples` rows) never will be
- between_groups: right after the first group's `samples` commit
- uncommitted:    at the first group's first commit: its fragments are written, none committed
- out_of_order:   results are reordered so that a group other than the first of the fixed order is
                  committed whole, then the first group is killed half committed (after `tokens`)
- merge:          inside the inline statistics' merge (`finalize`, run with --stats moments): every
                  group is committed and the merged `moments` rows are, the `layer_stats` rows never will be
"""

from __future__ import annotations

import json
import os
import signal
import sys

from tourray.lake import tables as lk
from tourray.capture import CaptureConfig, driver
from tourray.capture.plan import all_groups, plan_capture


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)  # the test starts this script in its own session


def main(instant: str, cfg: CaptureConfig) -> None:
    real_commit, real_append, samples_commits = lk.Lake.commit, lk.Lake.append, [0]

    def append(self, table, data, expected):
        if instant == "merge" and table == "layer_stats" and self.root == lake_root:
            die()
        return real_append(self, table, data, expected)

    def commit(self, table, fragments):
        if table in ("samples", "activations", "blocks") and fragments and self.root == lake_root:
            if instant == "uncommitted" and table == "blocks":
                die()
            if instant == "half_group" and table == "activations":
                die()
            if instant == "out_of_order" and table == "activations" and samples_commits[0] == 1:
                die()
        out = real_commit(self, table, fragments)
        if table == "samples" and fragments:
            samples_commits[0] += 1
            if instant == "between_groups":
                die()
        return out

    if instant == "tables":
        real_prepare = driver.prepare_lake

        def prepare_lake(*a, **kw):
            real_prepare(*a, **kw)
            die()

        driver.prepare_lake = prepare_lake
    elif instant == "out_of_order":
        first = {s.sample_id for s in all_groups(plan_capture(cfg))[0]}
        real_build = driver.build_capture

        class Reordered:
            """The pipeline's results, the first fixed group held back until another one is out."""

            def __init__(self, ds):
                self.ds = ds

            def iter_batches(self, **kw):
                held = other = None
                for b in self.ds.iter_batches(**kw):
                    for i in range(b.num_rows):
                        row = b.slice(i, 1)
                        if set(json.loads(row.column("sample_ids")[0].as_py())) & first:
                            held = row
                        elif other is None:
                            other = row
                        if held is not None and other is not None:
                            yield other  # committed whole ...
                            yield held   # ... then this one is killed after its `tokens`
                            raise RuntimeError("out_of_order: the kill did not happen")
                raise RuntimeError("out_of_order: the pipeline ended before two groups were out")

        driver.build_capture = lambda plan, done: Reordered(real_build(plan, done))
    elif instant not in ("half_group", "between_groups", "uncommitted", "merge"):
        raise SystemExit(f"unknown instant {instant!r}")
    lake_root = lk.Lake(cfg.lake).root
    lk.Lake.commit = commit
    lk.Lake.append = append
    driver.run_capture(cfg, progress=False)
    raise SystemExit(f"{instant}: the capture finished without being killed")


if __name__ == "__main__":
    main(sys.argv[1], CaptureConfig(**json.loads(sys.argv[2])))
