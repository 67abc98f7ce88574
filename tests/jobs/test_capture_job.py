"""The capture job end to end: killed and resumed, crashed between commits, submitted to a real
Ray head through the Jobs API. Each compares the lake with an uninterrupted capture."""

from __future__ import annotations

import os
import signal
import socket
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
    samples = write_corpus(root / "samples", many_texts(40))
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
    assert 0 < committed < 40, f"the kill must land mid-run (committed {committed}/40)"
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_and_wait(client, args, timeout=400):
    """Submit `python jobs/capture.py ARGS` (retrying while the head's job agent starts) and wait."""
    from ray.job_submission import JobStatus

    entry = " ".join([sys.executable, "jobs/capture.py", *map(str, args)])
    deadline = time.time() + timeout
    while True:
        try:
            job = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(REPO), "excludes": ["lake/", "reports/"]})
            break
        except RuntimeError as e:  # "No available agent to submit job" while the head warms up
            assert time.time() < deadline, f"could not submit: {e}"
            time.sleep(2)
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish"
        time.sleep(1)
    return job


def test_ray_job_submit_to_a_local_head(qwen3_model, reference, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    samples, want = reference
    lake = tmp_path / "lake"
    gcs, dash, agent, agent_grpc, client_port, metrics = (_free_port() for _ in range(6))
    bin_dir = Path(sys.executable).parent
    env = dict(ENV, PATH=f"{bin_dir}:{ENV['PATH']}")
    # --block keeps the head in this process group, so the test stops exactly this cluster
    # (`ray stop` would also kill the embedded Ray of this test session).
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats",
                             # free ports: the job agent's default (52365) may belong to another Ray here
                             "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
                             "--ray-client-server-port", str(client_port), "--metrics-export-port", str(metrics)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = None
        for _ in range(120):  # the dashboard takes a while to come up
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
                break
            except Exception:  # noqa: BLE001
                time.sleep(1)
        assert client is not None, "Ray head did not come up"
        job = submit_and_wait(client, capture_args(qwen3_model, samples, lake))
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
        assert "captured 40 samples" in logs
        assert rows(lake) == want
        # a relative lake inside a job would vanish with the job's working-dir copy: refused
        bad = submit_and_wait(client, capture_args(qwen3_model, samples, "lake"))
        assert client.get_job_status(bad) == JobStatus.FAILED
        assert "is relative" in client.get_job_logs(bad)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
