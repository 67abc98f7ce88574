"""Exact resume: a run killed at any instant (groups committed out of order by several actors, a group
half committed) and resumed stores activations byte-identical to an uninterrupted run, because groups
and their padded forward batches are fixed slices of the full sample order, not of what is pending."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import pyarrow.compute as pc
import pytest

from tests.conftest import REPO, TEXTS, write_corpus
from tourray.lake import tables as lk
from tourray.capture import CaptureConfig, run_capture
from tourray.capture.plan import all_groups, plan_capture
from tourray.lake.repair import SAMPLE_TABLES, unreferenced_files
from tourray.lake.verify import verify_lake

pytestmark = pytest.mark.slow

# 8 texts of different lengths: batches of 3 pad, so a different batching would change activations
MORE = dict(TEXTS, **{"train/sydney__ferry.txt": "Manly ferries have crossed the harbour since 1855.\n",
                      "train/xian__muslim-quarter.txt": "The Muslim Quarter's Great Mosque dates from 742, and "
                      "its courtyards mix Chinese roofs with Arabic inscriptions carved in stone.\n"})
OPTS = dict(actors=2, batch_size=3, group_size=3, store_dtype="float32", stats=[])


def _cfg(model, samples, lake):
    return CaptureConfig(model=str(model), samples=str(samples), lake=str(lake), run="r", **OPTS)


def _acts(lake: Path) -> dict:
    """(sample, layer, site, pos) -> raw bytes of h, plus the tokens' surprisal bytes and the
    block_sums rows (sums of values read back from the same bytes: equal, not close)."""
    t = lance.dataset(str(lake / "activations.lance")).to_table()
    t = t.sort_by([("sample_id", "ascending"), ("layer", "ascending"), ("site", "ascending"), ("pos", "ascending")])
    tok = lance.dataset(str(lake / "tokens.lance")).to_table(columns=["sample_id", "pos", "surprisal"])
    tok = tok.sort_by([("sample_id", "ascending"), ("pos", "ascending")])
    return dict(keys=t.select(["sample_id", "layer", "site", "pos"]).to_pylist(),
                h=pc.list_flatten(t.column("h")).to_numpy().tobytes(),
                surprisal=tok.column("surprisal").to_numpy(zero_copy_only=False).tobytes(),
                samples=sorted(lance.dataset(str(lake / "samples.lance")).to_table(columns=["sample_id"])
                               .column(0).to_pylist()),
                block_sums=sorted(tuple(r.values()) for r in lance.dataset(str(lake / "block_sums.lance")).to_table(
                    columns=["sample_id", "layer", "site", "text_tokens", "cos_sum", "angle_sum"]).to_pylist()))


@pytest.fixture(scope="module")
def reference(qwen3_model, tmp_path_factory, ray_session):
    samples = write_corpus(tmp_path_factory.mktemp("samples8"), MORE)
    lake = tmp_path_factory.mktemp("ref") / "lake"
    s = run_capture(_cfg(qwen3_model, samples, lake), progress=False)
    assert s["captured"] == 8 and s["groups"] == 3
    return samples, lake, _acts(lake)


def test_groups_are_fixed_slices_of_the_full_order(qwen3_model, reference):
    samples, lake, _ = reference
    plan = plan_capture(_cfg(qwen3_model, samples, lake))
    got = [[s.sample_id for s in g] for g in all_groups(plan)]
    assert [len(g) for g in got] == [3, 3, 2] and sum(got, []) == [s.sample_id for s in plan.samples]


def test_resume_after_out_of_order_and_partial_commits_is_exact(qwen3_model, reference, tmp_path):
    """Group 0 was never committed, group 1 is complete (committed first by the faster actor), and
    group 2 got its tokens/activations but not all its `samples` rows: resume redoes 0 and 2 whole."""
    samples, ref_lake, ref = reference
    lake = tmp_path / "lake"
    shutil.copytree(ref_lake, lake)
    plan = plan_capture(_cfg(qwen3_model, samples, lake))
    g0, _, g2 = [[s.sample_id for s in g] for g in all_groups(plan)]
    L = lk.Lake(str(lake))
    ids0 = ", ".join(lk.sql_quote(s) for s in g0)
    for table in (*SAMPLE_TABLES, "samples"):
        if L.exists(table):
            L.delete(table, f"sample_id IN ({ids0})")
    L.delete("samples", f"sample_id = {lk.sql_quote(g2[0])}")  # a partially committed group
    s = run_capture(_cfg(qwen3_model, samples, lake), progress=False)
    assert s["already_done"] == 3 and s["captured"] == 5 and s["groups"] == 2
    assert _acts(lake) == ref


def test_resume_after_sigkill_is_exact(qwen3_model, reference, tmp_path):
    """A real `tourray capture` (2 actors) killed with SIGKILL once a group is committed, then resumed."""
    samples, _, ref = reference
    lake = tmp_path / "lake"
    cmd = [sys.executable, "-m", "tourray.cli", "capture", "--model", str(qwen3_model), "--samples", str(samples),
           "--lake", str(lake), "--run", "r", "--actors", "2", "--batch-size", "3", "--group-size", "3",
           "--store-dtype", "float32", "--no-progress"]
    env = dict(os.environ, RAY_ADDRESS="", TOURRAY_LEASE_TTL_S="600")  # not expiry: a dead pid frees it
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, killed = time.time() + 150, False
    try:
        while time.time() < deadline and p.poll() is None:
            try:
                n = lance.dataset(str(lake / "samples.lance")).count_rows()
            except (ValueError, OSError, RuntimeError):
                n = 0
            if n >= 1:
                os.killpg(p.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert killed, "the capture finished or stalled before a group was committed"
    done = lance.dataset(str(lake / "samples.lance")).count_rows()
    assert 0 < done < 8
    # the killed driver ran on this host and its process is gone: its unexpired lease no longer holds
    s = run_capture(_cfg(qwen3_model, samples, lake), progress=False)
    assert s["already_done"] == done and s["captured"] == 8 - done
    assert _acts(lake) == ref


KILLER = Path(__file__).with_name("_kill_capture.py")
FRAGMENT_TABLES = ("blocks", "tokens", "activations", "token_layers", "samples")


def _ids(lake: Path, table: str) -> set[str]:
    return set(lk.Lake(str(lake)).read(table, ["sample_id"]).column(0).to_pylist())


def _debris(lake: Path) -> dict[str, list[str]]:
    """Table -> its data files that no version references (never-committed fragments)."""
    L = lk.Lake(str(lake))
    return {t: f for t in L.tables() if (f := unreferenced_files(L, t, 0))}


def _kill_marked(marker: str, timeout_s: float = 60) -> None:
    """SIGKILL every process whose environment holds `marker`, until none is left. Ray starts its
    daemons (and through them the actors) in new sessions, so killing the driver's process group
    leaves them to notice the dead driver on their own, and an actor mid-group could still write
    fragment files after the test looked for the kill's debris."""
    want, deadline = marker.encode() + b"\0", time.time() + timeout_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if want in Path(f"/proc/{pid}/environ").read_bytes() and int(pid) != os.getpid():
                    found.append(int(pid))
            except OSError:
                continue
        if not found:
            return
        assert time.time() < deadline, f"processes of the killed capture still alive: {found}"
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@pytest.mark.parametrize("instant", ["tables", "half_group", "between_groups", "uncommitted", "out_of_order", "merge"])
def test_resume_after_sigkill_at_each_instant_is_exact(instant, qwen3_model, reference, tmp_path, monkeypatch):
    """A real driver process (2 actors, batches of 3, groups of 3, its own Ray) SIGKILLed at `instant`
    (see _kill_capture.py: tables made, no group; a group half committed; between groups; a group's
    files written, none committed; a later group committed before the first; inside the inline
    statistics' merge, every group committed); the lake is checked to be in that state, then a normal
    run resumes it (in this process with the local executor: the same driver, plan, repair and commits;
    resumes through the actor pool are test_resume_after_sigkill_is_exact and tests/jobs/test_capture_job.py):
    byte-identical to the uninterrupted reference, `verify` clean, no never-committed file left, and
    (merge) the run's merged statistics complete."""
    samples, _, ref = reference
    lake = tmp_path / "lake"
    # inline statistics do not change the stored vectors: the reference (captured without) still holds
    opts = dict(OPTS, stats=["moments"]) if instant == "merge" else OPTS
    args = dict(model=str(qwen3_model), samples=str(samples), lake=str(lake), run="r", **opts)
    cfg = CaptureConfig(**args)
    marker = f"TOURRAY_KILL_TEST={tmp_path}"  # inherited by its Ray daemons and workers (see _kill_marked)
    # the killed driver's lease: long enough that a loaded machine's stall never loses it (a lost lease
    # stops the driver before the instant); once killed, its dead pid frees it on this host
    env = dict(os.environ, RAY_ADDRESS="", TOURRAY_LEASE_TTL_S="60", TOURRAY_KILL_TEST=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as out:
        p = subprocess.Popen([sys.executable, str(KILLER), instant, json.dumps(args)], env=env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)  # its own group: Ray dies with it
        try:
            p.wait(timeout=240)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        _kill_marked(marker)  # Ray's daemons run in sessions of their own: no straggler may write later
    assert p.returncode == -signal.SIGKILL, f"not killed (rc {p.returncode}):\n{log_path.read_text()[-3000:]}"

    # -- the lake is in the state the instant claims
    groups = [{s.sample_id for s in g} for g in all_groups(plan_capture(cfg))]
    L = lk.Lake(str(lake))
    assert L.read("runs", ["run"]).column(0).to_pylist() == ["r"]
    assert {r["holder"].split(":")[1] for r in L.read("leases").to_pylist()} == {str(p.pid)}  # the dead one's
    done, started, debris = _ids(lake, "samples"), _ids(lake, "tokens"), _debris(lake)
    complete = [i for i, g in enumerate(groups) if g <= done]
    assert done == set().union(*(groups[i] for i in complete))  # `samples` only ever has whole groups
    if instant == "tables":
        assert not done and not started and L.dataset("activations").count_rows() == 0
    elif instant == "half_group":  # blocks + tokens of one group, nothing after
        assert not done and any(started == g for g in groups) and _ids(lake, "blocks") == started
        assert L.dataset("activations").count_rows() == 0
    elif instant == "between_groups":  # exactly one complete group and nothing of any other
        assert len(complete) == 1 and started == done == _ids(lake, "activations")
    elif instant == "uncommitted":  # a group's files on disk, nothing committed
        assert not done and not started and L.dataset("activations").count_rows() == 0
        assert set(FRAGMENT_TABLES) <= set(debris), debris
    elif instant == "out_of_order":  # a later group complete, the first one half committed
        assert len(complete) == 1 and complete != [0], complete  # not a prefix of the fixed order
        assert started == done | groups[0] and _ids(lake, "activations") == done
    elif instant == "merge":  # every group committed, the merge cut short: no layer rows of the run
        assert len(complete) == len(groups) and started == done
        assert L.exists("layer_stats") and not L.read("layer_stats", filter="run = 'r'").num_rows
        assert L.read("moments", ["kind"], filter="run = 'r' AND kind = 'layer'").num_rows == 4
    # never-committed files are removed once older than a lease's lifetime (here 3 s)
    monkeypatch.setenv("TOURRAY_LEASE_TTL_S", "3")
    monkeypatch.setattr(lk, "LEASE_TTL_S", 3.0)
    if debris := _debris(lake):  # listed again: a dying actor's last write counts too
        newest = max(os.path.getmtime(f) for fs in debris.values() for f in fs)
        time.sleep(max(0.0, newest + 3.5 - time.time()))

    s = run_capture(cfg, progress=False, executor="local")
    assert s["already_done"] == len(done) and s["captured"] == 8 - len(done)
    assert s["groups"] == len(groups) - len(complete)
    assert _acts(lake) == ref
    report = verify_lake(str(lake))
    assert report.problems == [] and report.samples == 8 and not any("incomplete" in n for n in report.notes)
    assert _debris(lake) == {}
    if instant == "merge":  # merged once more on resume, although nothing was pending: embed + 3 blocks
        assert s["inline_stats"]["layers"] == 4
        assert sorted(L.read("layer_stats", ["layer"], filter="run = 'r'").column(0).to_pylist()) == [-1, 0, 1, 2]
