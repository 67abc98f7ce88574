"""A real two-node Ray cluster on this machine (a head and a second node, each with 2 CPUs and its own
custom resource), a capture submitted with `ray job submit --working-dir .` into an s3:// lake served
by moto: its actors run on both nodes, the lake verifies and holds exactly the rows of the same capture
run in one process. A local-folder lake on that cluster is refused by `check_lake_placement` unless it
is declared shared, and a relative lake path in a submitted job is refused.

Each node runs `ray start --block` in its own session (process group), so the test stops exactly
this cluster (never `ray stop`, which would stop every Ray on the machine) even when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, TEXTS, free_port, last_json, moto_s3, write_corpus

pytest.importorskip("moto.server")

BUCKET = "tourray-cluster"


def _stop(procs: list[subprocess.Popen], grace_s: float = 5) -> None:
    """SIGTERM each node's session, then SIGKILL what is left of it after `grace_s`. Every daemon and
    worker of a `ray start --block` node is in its session; a graceful stop of an idle head took 34 s,
    and the lake was checked before this, so nothing here needs more than the grace."""
    for p in reversed(procs):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # the session's daemons, even where `ray start` itself has gone
        p.wait(timeout=30)


def _ports(n: int) -> list[str]:
    return [str(free_port()) for _ in range(n)]


@pytest.fixture
def s3_endpoint():
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.mark.slow  # ~2.5 min on 2 cores; still part of `make test`
def test_capture_job_on_two_nodes_into_s3(qwen3_model, s3_endpoint, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               AWS_ENDPOINT_URL=s3_endpoint, AWS_ENDPOINT=s3_endpoint, AWS_ALLOW_HTTP="true",
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1")
    samples = write_corpus(tmp_path / "samples", {f"train/stop-{i:02d}.txt": f"Stop {i}. {t}"
                                                  for i, t in enumerate(list(TEXTS.values()) * 10)})
    gcs, dash, agent, agent_grpc, client_port, metrics, nm, om = _ports(8)
    ray = str(bin_dir / "ray")
    # 2 CPUs a node and 1.5 an actor: one actor fits a node, so two live actors must be on two nodes
    common = ["--block", "--num-cpus", "2", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    ray_tmp = tempfile.mkdtemp(prefix="trc-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    log_head, log_b = open(tmp_path / "head.log", "w"), open(tmp_path / "node_b.log", "w")
    try:
        procs.append(subprocess.Popen(
            [ray, "start", "--head", *common, "--port", gcs, "--resources", json.dumps({"node_head": 1}),
             "--temp-dir", ray_tmp, "--dashboard-host", "127.0.0.1", "--dashboard-port", dash,
             "--dashboard-agent-listen-port", agent, "--dashboard-agent-grpc-port", agent_grpc,
             "--ray-client-server-port", client_port, "--metrics-export-port", metrics,
             "--node-ip-address", "127.0.0.1"],
            env=env, start_new_session=True, stdout=log_head, stderr=subprocess.STDOUT))
        b_agent, b_grpc, b_metrics, b_nm, b_om = _ports(5)
        time.sleep(5)
        assert procs[0].poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        procs.append(subprocess.Popen(
            [ray, "start", "--address", f"127.0.0.1:{gcs}", *common, "--resources", json.dumps({"node_b": 1}),
             "--dashboard-agent-listen-port", b_agent, "--dashboard-agent-grpc-port", b_grpc,
             "--metrics-export-port", b_metrics, "--node-manager-port", b_nm, "--object-manager-port", b_om,
             "--node-ip-address", "127.0.0.1"],
            env=env, start_new_session=True, stdout=log_b, stderr=subprocess.STDOUT))

        # wait until both nodes are alive, then check the placement guard against this real cluster
        probe = f"""
import json, time, ray
from tourray.errors import UserError
from tourray.runtime import check_lake_placement, node_cpus
ray.init(address="127.0.0.1:{gcs}", logging_level="ERROR")
for _ in range(120):
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) == 2:
        break
    time.sleep(1)
out = dict(nodes=len(alive), resources=sorted(k for n in alive for k in n["Resources"] if k.startswith("node_")),
           cpus=[ray.cluster_resources()["CPU"], node_cpus(ray)])  # a statistics task is sized to one node
try:
    check_lake_placement({str(tmp_path / 'local-lake')!r}, shared=False)
    out["local"] = "allowed"
except UserError as e:
    out["local"] = str(e)
check_lake_placement({str(tmp_path / 'local-lake')!r}, shared=True)
check_lake_placement("s3://{BUCKET}/lake", shared=False)
print(json.dumps(out))
"""
        for _ in range(10):  # a loaded machine's head may still refuse a driver ("Failed to register worker")
            p = subprocess.run([sys.executable, "-c", probe], env=dict(env, PYTHONPATH=str(REPO)), capture_output=True,
                               text=True, timeout=300)
            if p.returncode == 0 or "Failed to register worker" not in p.stderr:
                break
            time.sleep(3)
        assert p.returncode == 0, p.stderr[-4000:] + (tmp_path / "node_b.log").read_text()[-2000:]
        probe_out = last_json(p.stdout)
        assert probe_out["nodes"] == 2 and probe_out["resources"] == ["node_b", "node_head"], probe_out
        assert probe_out["cpus"] == [4, 2], probe_out  # 2 a node: tourray.stats asks no task for all 4
        assert "local folder" in probe_out["local"] and "2 nodes" in probe_out["local"], probe_out

        lake = f"s3://{BUCKET}/lake"
        # `--working-dir .` uploads the folder (100 MiB at most): submit from a staged copy of what the
        # job needs, not the checkout with its virtual environments
        stage = tmp_path / "workdir"
        for name in ("jobs", "tourray"):  # the lake's schemas and queries are inside the package
            shutil.copytree(REPO / name, stage / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "configs"))

        def submit(lake: str) -> list[str]:
            return [ray, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".", "--",
                    sys.executable, "jobs/capture.py", "--model", str(qwen3_model), "--samples", str(samples),
                    "--lake", lake, "--run", "two-nodes", "--group-size", "1", "--batch-size", "1",
                    "--layers", "embed,1", "--actors", "2", "--cpus-per-actor", "1.5", "--threads", "1",
                    "--no-progress"]

        deadline = time.time() + 420
        while True:  # the head's job agent may take a while to accept jobs
            job = subprocess.run(submit(lake), env=env, cwd=stage, capture_output=True, text=True, timeout=480)
            if job.returncode == 0 or "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
                break
            time.sleep(3)
        logs = job.stdout + job.stderr
        assert job.returncode == 0, logs[-6000:]
        n = len(list(samples.rglob("*.txt")))
        assert f"captured {n} samples" in logs, logs[-4000:]

        # which nodes ran the capture actors: the state API keeps dead actors with their node ids
        state = f"""
import json
from ray.util.state import list_actors, list_nodes
api = "http://127.0.0.1:{dash}"  # name this cluster: other Rays may run on this machine
nodes = {{n.node_id: sorted(k for k in n.resources_total if k.startswith("node_")) for n in list_nodes(address=api)}}
actors = [a for a in list_actors(address=api, limit=1000, detail=True) if "CaptureStage" in a.class_name]
print(json.dumps(dict(actors=len(actors), nodes=sorted({{r for a in actors for r in nodes.get(a.node_id, [])}}),
                      detail=[(a.state, nodes.get(a.node_id)) for a in actors])))
"""
        p = subprocess.run([sys.executable, "-c", state], env=dict(env, PYTHONPATH=str(REPO)), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-4000:]
        placed = last_json(p.stdout)
        assert placed["actors"] >= 2 and placed["nodes"] == ["node_b", "node_head"], (placed, logs[-3000:])

        # a relative lake inside a job would vanish with the job's working-dir copy: refused
        bad = subprocess.run(submit("lake"), env=env, cwd=stage, capture_output=True, text=True, timeout=480)
        assert bad.returncode != 0 and "is relative" in bad.stdout + bad.stderr, (bad.stdout + bad.stderr)[-4000:]

        # the lake on the object store is complete and consistent, and holds exactly the rows of the same
        # capture run in one process (the local executor, 1 torch thread as each actor had)
        check = f"""
import json, sys
sys.path[:0] = [{str(REPO / "tests")!r}, {str(REPO / "tests" / "jobs")!r}]
from test_capture_job import rows
from tourray.capture import CaptureConfig, run_capture
from tourray.lake.sql import connect
from tourray.lake.verify import verify
checked, problems = verify({lake!r}, "two-nodes")
n = connect({lake!r}).execute("SELECT count(DISTINCT sample_id) FROM samples WHERE run = 'two-nodes'").fetchone()[0]
ref = {str(tmp_path / "ref-lake")!r}
run_capture(CaptureConfig(model={str(qwen3_model)!r}, samples={str(samples)!r}, lake=ref, run="two-nodes", group_size=1,
                          batch_size=1, layers="embed,1", threads=1), progress=False, executor="local")
want, got = rows(ref), rows({lake!r})
print(json.dumps(dict(checked=checked, problems=problems, samples=n, counts=got["counts"], want=want["counts"],
                      differ=sorted(k for k in want if got[k] != want[k]))))
"""
        p = subprocess.run([sys.executable, "-c", check], env=dict(env, PYTHONPATH=str(REPO)), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-4000:]
        got = last_json(p.stdout)
        assert got["problems"] == [] and got["checked"] > 0 and got["samples"] == n, got
        assert got["differ"] == [] and got["counts"]["samples"] == n, got  # tables (and row counts) that differ
    finally:
        _stop(procs)
        log_head.close()
        log_b.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
