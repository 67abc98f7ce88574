"""Several writers on one lake: one driver per run (a lease in the lake), different runs side by side."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import lance

from tests.conftest import REPO, lake_snapshot
from tourray.lake import tables as lk

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _py(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lease_race_has_one_winner(tmp_path):
    """Four processes ask for one run's lease at the same instant: exactly one gets it."""
    lake = tmp_path / "lake"
    code = f"""
        import time
        from tourray.lake.tables import Lake, RunLease
        from tourray.errors import UserError
        time.sleep(max(0.0, {time.time() + 4} - time.time()))  # start together
        try:
            l = RunLease(Lake({str(lake)!r}), "r").acquire()
        except UserError:
            print("refused"); raise SystemExit(0)
        print("won"); time.sleep(3); l.release()
    """
    procs = [_py(code) for _ in range(4)]
    outs = [p.communicate(timeout=90) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sorted(o[0].strip() for o in outs) == ["refused"] * 3 + ["won"]
    assert lk.Lake(str(lake)).read("leases").num_rows == 0  # released


def test_second_driver_of_a_run_is_refused(qwen3_model, corpus_dir, tmp_path):
    lake = tmp_path / "lake"
    holder = lk.RunLease(lk.Lake(str(lake)), "r").acquire()  # a live driver of run r
    try:
        others = lambda: {k: v for k, v in lake_snapshot(lake).items() if k != "leases.lance"}  # noqa: E731
        before = others()
        p = subprocess.run([sys.executable, "-m", "tourray.cli", "capture", "--model", str(qwen3_model), "--samples",
                            str(corpus_dir), "--lake", str(lake), "--run", "r", "--no-progress"],
                           env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr[-2000:]
        err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
        assert len(err) == 1 and "being captured by another driver" in err[0] and holder.holder in err[0]
        assert others() == before and lk.Lake(str(lake)).read("leases").num_rows == 1  # nothing written
    finally:
        holder.release()


def test_stale_lease_is_taken_over(tmp_path):
    """A crashed driver (no more heartbeats) does not lock its run beyond the lease's lifetime."""
    L = lk.Lake(str(tmp_path / "lake"))
    dead = lk.RunLease(L, "r", ttl_s=1).acquire()
    dead._stop.set(), dead._thread.join()  # crash: heartbeats stop, the row stays
    time.sleep(1.2)
    new = lk.RunLease(L, "r", ttl_s=30).acquire()
    assert [r["holder"] for r in L.read("leases").to_pylist()] == [new.holder]
    new.release()


def test_two_runs_into_one_lake_at_once(qwen3_model, corpus_dir, tmp_path):
    lake = tmp_path / "lake"
    procs = []
    for run in ("a", "b"):
        procs.append(_py(f"""
            from tourray.capture import CaptureConfig, run_capture
            s = run_capture(CaptureConfig(model={str(qwen3_model)!r}, samples={str(corpus_dir)!r}, lake={str(lake)!r},
                                          run={run!r}, batch_size=2, group_size=2, threads=1), progress=False,
                            executor="local")
            print(s["captured"])
        """))
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    assert [o[0].split()[-1] for o in outs] == ["6", "6"]
    L = lk.Lake(str(lake))
    assert sorted(L.read("runs", ["run"]).column(0).to_pylist()) == ["a", "b"]
    for run in ("a", "b"):
        q = f"run = {lk.sql_quote(run)}"
        assert L.read("samples", ["sample_id"], filter=q).num_rows == 6
        n_tok = L.read("tokens", ["pos"], filter=q).num_rows
        assert n_tok > 0 and L.read("activations", ["pos"], filter=q).num_rows % n_tok == 0
    assert lance.dataset(str(lake / "activations.lance")).count_rows() == 2 * L.read(
        "activations", ["pos"], filter="run = 'a'").num_rows


def test_repair_removes_orphan_rows_and_uncommitted_files(qwen3_model, corpus_dir, tmp_path):
    from pathlib import Path

    from tourray.capture import CaptureConfig, run_capture
    from tourray.lake.repair import run_repair

    lake = tmp_path / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="r",
                              batch_size=2, group_size=3, threads=1), progress=False, executor="local")
    L = lk.Lake(str(lake))
    victim = L.read("samples", ["sample_id"]).column(0)[0].as_py()
    L.delete("samples", f"sample_id = {lk.sql_quote(victim)}")  # its tokens/activations are now orphans
    stray = L.read("tokens", filter=f"sample_id = {lk.sql_quote(victim)}")
    L.write_fragments("tokens", stray, stray.schema)  # an actor's fragment whose group never committed
    data = lambda t: sorted(p.name for p in (lake / f"{t}.lance" / "data").iterdir())  # noqa: E731
    files_before, n_tok = data("tokens"), L.read("tokens").num_rows
    old_version = L.dataset("tokens").version

    busy = lk.RunLease(L, "other").acquire()  # another driver live: files may be its in-flight fragments
    try:
        s = run_repair(str(lake), min_age_s=0)
    finally:
        busy.release()
    assert s["rows"] == {"r": 1} and s["files"] == {} and data("tokens") == files_before
    assert L.read("tokens", filter=f"sample_id = {lk.sql_quote(victim)}").num_rows == 0
    assert L.read("activations", filter=f"sample_id = {lk.sql_quote(victim)}").num_rows == 0

    s = run_repair(str(lake), min_age_s=0)
    assert s["rows"] == {"r": 0} and s["files"] == {"tokens": 1}
    assert len(data("tokens")) == len(files_before) - 1
    assert L.read("tokens").num_rows == n_tok - stray.num_rows  # every committed file is still there
    assert L.dataset("tokens", version=old_version).count_rows() == n_tok  # and older versions too
    assert run_repair(str(lake), "r", min_age_s=0)["files"] == {}
    assert Path(lake / "tokens.lance").exists()


# injected into every Python process of a capture (Ray workers inherit the driver's environment)
FAIL_HOOK = """
import os
if os.environ.get("TOURRAY_TEST_FAIL"):
    import tourray.capture.actor as st
    _orig = st.CaptureStage.process
    def process(self, batch):
        if os.environ["TOURRAY_TEST_FAIL"] in batch.column("source").to_pylist():
            with open(os.environ["TOURRAY_TEST_TRIES"], "a") as f:
                f.write("x")
            if os.environ.get("TOURRAY_TEST_DIE"):
                os._exit(1)  # as the kernel's OOM killer would
            raise ValueError("this text always breaks the engine")
        return _orig(self, batch)
    st.CaptureStage.process = process
"""


def _failing_capture(model, samples, tmp_path, die: bool) -> tuple[subprocess.CompletedProcess, int]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_HOOK)
    tries = tmp_path / "tries"
    env = dict(ENV, PYTHONPATH=f"{hook}:{REPO}", TOURRAY_TEST_FAIL="train/xian__city-wall.txt",
               TOURRAY_TEST_TRIES=str(tries), RAY_ADDRESS="", **({"TOURRAY_TEST_DIE": "1"} if die else {}))
    p = subprocess.run([sys.executable, "-m", "tourray.cli", "capture", "--model", str(model), "--samples",
                        str(samples), "--lake", str(tmp_path / "lake"), "--run", "r", "--group-size", "2",
                        "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=200)
    return p, len(tries.read_text()) if tries.exists() else 0


def test_group_that_always_kills_its_actor_fails_after_bounded_tries(qwen3_model, corpus_dir, tmp_path):
    from tourray.capture.driver import MAX_TRIES

    p, tries = _failing_capture(qwen3_model, corpus_dir, tmp_path, die=True)
    assert p.returncode == 2, p.stderr[-3000:]
    err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and f"after {MAX_TRIES} tries" in err[0] and "train/xian__city-wall.txt" in err[0], err
    assert tries == MAX_TRIES, err


def test_group_that_always_raises_names_the_group(qwen3_model, corpus_dir, tmp_path, monkeypatch):
    from tourray.capture import CaptureConfig, run_capture
    from tourray.capture.actor import CaptureStage
    from tourray.errors import UserError

    orig = CaptureStage.process

    def process(self, batch):
        if "train/xian__city-wall.txt" in batch.column("source").to_pylist():
            raise ValueError("this text always breaks the engine")
        return orig(self, batch)

    monkeypatch.setattr(CaptureStage, "process", process)
    cfg = CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(tmp_path / "lake"), run="r",
                        batch_size=2, group_size=2, threads=1)
    try:
        run_capture(cfg, progress=False, executor="local")
        raise AssertionError("the capture did not fail")
    except UserError as e:
        assert "group train/" in str(e) and "xian__city-wall.txt" in str(e) and "always breaks" in str(e)
    assert lk.Lake(str(tmp_path / "lake")).read("leases").num_rows == 0  # the lease was released


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    """SIGKILL leaves the row unexpired; its pid is gone, so a resume need not wait for the expiry."""
    import subprocess

    L = lk.Lake(str(tmp_path / "lake"))
    code = ("import sys, os; from tourray.lake import tables as lk; l = lk.RunLease(lk.Lake(sys.argv[1]), 'r', ttl_s=600)"
            ".acquire(); os._exit(0)")  # exits without releasing, heartbeat thread and all
    subprocess.run([sys.executable, "-c", code, L.root], check=True, timeout=120)
    assert L.read("leases").num_rows == 1  # the dead holder's row is still there, unexpired
    with lk.RunLease(L, "r", ttl_s=600) as lease:
        assert lease.holder in {r["holder"] for r in L.read("leases").to_pylist()}
