"""`tourray.lake.runs`: dropping a run leaves none of its rows in any per-run table."""

from __future__ import annotations

from tourray.capture import CaptureConfig, run_capture
from tourray.lake.repair import SAMPLE_TABLES
from tourray.lake.runs import drop_run
from tourray.lake.tables import Lake
from tourray.lake.verify import verify


def test_a_dropped_run_captured_again_verifies(qwen3_model, corpus_dir, tmp_path):
    """drop_run (QA's stale eval runs) once missed `logits`: a run captured again with --logits then
    held every distribution twice. Every per-sample table is emptied of the run; another run stays."""
    lake = Lake(str(tmp_path / "lake"))

    def capture(run):
        cfg = CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=lake.root, run=run, layers="embed,0",
                            logits="8", include=["train/sydney__o*", "eval/*"], group_size=2, batch_size=2)
        return run_capture(cfg, progress=False, executor="local")["captured"]

    n = capture("r")
    assert n > 0 and capture("keep") == n
    drop_run(lake, "r")
    for table in ("samples", *SAMPLE_TABLES, "runs", "run_texts"):
        assert lake.dataset(table).count_rows(filter="run = 'r'") == 0, table
        assert lake.dataset(table).count_rows(filter="run = 'keep'") > 0, table
    assert capture("r") == n
    assert verify(lake) == (2 * n * 2, [])  # both runs: n samples x (embed, block 0), nothing twice
