"""The capture job end to end: killed and resumed, crashed between commits. Each compares the lake with
an uninterrupted capture (`ray job submit` to a real cluster: tests/jobs/test_cluster.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pytest

from conftest import REPO, TEXTS, write_corpus
from tourray.capture import CaptureConfig, run_capture
from tourray.lake.tables import Lake
from tourray.lake.verify import verify

pytestmark = pytest.mark.slow

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled",
           RAY_USAGE_STATS_ENABLED="0")


N = 20  # groups of one sample: the kill lands after 3 commits, the crash in the 5th group


def many_texts(n: int) -> dict[str, str]:
    base = list(TEXTS.values())
    return {f"train/stop-{i:03d}.txt": f"Stop {i}. " + base[i % len(base)] for i in range(n)}


def rows(lake: Path) -> dict[str, set]:
    """Everything a capture wrote, as comparable sets (vectors as bytes)."""
    lk = Lake(str(lake))
    out = {}
    for table, key in (("samples", ["sample_id", "n_tokens", "sha256"]), ("tokens", ["sample_id", "pos", "token_id", "surprisal"]),
                       ("blocks", ["sample_id", "layer", "site", "sha256"]),
                       ("block_sums", ["sample_id", "layer", "site", "text_tokens", "cos_sum", "angle_sum"])):
        t = lk.read(table, key).to_pydict()
        out[table] = list(zip(*t.values()))
    a = lk.read("activations", ["sample_id", "pos", "layer"])
    h = lk.dataset("activations").to_table(columns=["h"]).column("h").combine_chunks()
    vec = np.asarray(h.values).reshape(len(h), -1)
    out["activations"] = [(s, p, l, v.tobytes()) for s, p, l, v in zip(*a.to_pydict().values(), vec)]
    counts = {k: len(v) for k, v in out.items()}
    return {k: sorted(v) for k, v in out.items()} | {"counts": counts}


def capture_args(model, samples, lake, run="r"):
    return ["--model", str(model), "--samples", str(samples), "--lake", str(lake), "--run", run,
            "--group-size", "1", "--batch-size", "1", "--layers", "embed,1", "--no-progress"]


@pytest.fixture(scope="module")
def reference(qwen3_model, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("ref")
    samples = write_corpus(root / "samples", many_texts(N))
    cfg = CaptureConfig(model=str(qwen3_model), samples=str(samples), lake=str(root / "lake"), run="r",
                        group_size=1, batch_size=1, layers="embed,1")
    run_capture(cfg, progress=False)
    return samples, rows(root / "lake")


def test_kill_and_resume_gives_the_uninterrupted_rows(qwen3_model, reference, tmp_path):
    samples, want = reference
    lake = tmp_path / "lake"
    cmd = [sys.executable, str(REPO / "jobs/capture.py"), *capture_args(qwen3_model, samples, lake)]
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed, deadline = 0, time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            committed = lance.dataset(str(lake / "samples.lance")).count_rows()
        except Exception:  # noqa: BLE001 - not created yet
            committed = 0
        if committed >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its embedded Ray and the capture actor
    proc.wait()
    assert 0 < committed < N, f"the kill must land mid-run (committed {committed}/{N})"
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert rows(lake) == want
    assert verify(str(lake))[1] == []


def test_crash_between_table_commits_is_rolled_back(qwen3_model, reference, tmp_path, monkeypatch, ray_session):
    samples, want = reference
    lake = tmp_path / "lake"
    cfg = CaptureConfig(model=str(qwen3_model), samples=str(samples), lake=str(lake), run="r",
                        group_size=1, batch_size=1, layers="embed,1")
    real, calls = Lake.commit, []

    def crashing_commit(self, table, fragments):
        calls.append(table)
        if calls.count("activations") == 5:  # 5th group: blocks, tokens, activations committed, samples not
            raise RuntimeError("simulated crash between commits")
        return real(self, table, fragments)

    monkeypatch.setattr(Lake, "commit", crashing_commit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_capture(cfg, progress=False)
    monkeypatch.setattr(Lake, "commit", real)
    half = rows(lake)["counts"]
    assert half["samples"] == 4 and half["blocks"] == 5 * 2  # group 5's blocks/tokens/activations are orphans
    run_capture(cfg, progress=False)
    assert rows(lake) == want
