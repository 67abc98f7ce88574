"""Every writer under a lease (issue 24), with real processes for each interleaving:

1. `tourray repair` and a resuming capture's repair step while an optimize compaction has written
   its files but not committed them: the files survive, the table reads whole afterwards.
2. A capture that takes its lease after optimize's check: `--delete-unverified` leaves its
   fragments, which it then commits; the table reads whole.
3. A holder in another PID namespace on this hostname (faked identity, and a real `unshare -Urpf`):
   its pid means nothing here, so its lease holds until it expires.
4. The fence: a holder that stalled past its lease, taken over or not, is refused at its commit, and
   its late heartbeat does not revive the lease.

The lakes are one small table; no model runs."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from tests.conftest import REPO
from tourray.errors import UserError
from tourray.lake import tables as lk
from tourray.lake.repair import delete_incomplete, remove_unreferenced, unreferenced_files

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))


def rows(table: str, sample: str, n: int = 4) -> pa.Table:
    """`n` rows of `table` for `sample`, whatever its declared columns are."""
    sch = lk.schema(table)
    fill = {pa.types.is_string: lambda i: "x", pa.types.is_integer: lambda i: i, pa.types.is_floating: lambda i: 0.5}

    def value(f, i):
        if f.name == "run":
            return "r"
        if f.name == "sample_id":
            return sample
        if f.nullable:
            return None
        return next(fn(i) for test, fn in fill.items() if test(f.type))

    return pa.Table.from_pylist([{f.name: value(f, i) for f in sch} for i in range(n)], schema=sch)


def make_lake(root: Path, samples=("a", "b", "c")) -> lk.Lake:
    """A lake whose `tokens` has one committed fragment per sample (so optimize compacts it) and an
    empty `runs` (so `tourray repair` accepts it)."""
    L = lk.Lake(str(root))
    L.ensure("runs", lk.schema("runs"))
    sch = lk.schema("tokens")
    L.ensure("tokens", sch)
    for s in samples:
        L.append("tokens", rows("tokens", s), sch)
    return L


def whole(L: lk.Lake, table: str = "tokens") -> list[str]:
    """Every row of `table` read back (fails when a data file is missing), as sorted sample ids."""
    return sorted(lance.dataset(L.uri(table)).to_table(columns=["sample_id"]).column(0).to_pylist())


def py(code: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=dict(ENV, **env), cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"helper exited ({proc.returncode}) early:\n{proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"helper never reached {path.name}"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 90) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


# an optimize whose compaction of `tokens` stops after writing its files, before committing them
PAUSED_OPTIMIZE = """
    import datetime as dt, sys, time
    from pathlib import Path
    from tourray.lake import optimize as op
    lake, flags = sys.argv[1], Path(sys.argv[2])
    commit = op.commit_compaction
    def paused(lake_, table, *a):
        if table == "tokens" and not (flags / "paused").exists():
            (flags / "paused").touch()
            while not (flags / "go").exists():
                time.sleep(0.05)
        return commit(lake_, table, *a)
    op.commit_compaction = paused
    res = op.optimize(lake, older_than=dt.timedelta(0), delete_unverified=bool(int(sys.argv[3])))
    print({r.table: r.fragments_after for r in res})
"""


def paused_optimize(L: lk.Lake, flags: Path, delete_unverified: bool) -> subprocess.Popen:
    flags.mkdir()
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PAUSED_OPTIMIZE), L.root, str(flags),
                          str(int(delete_unverified))], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(flags / "paused", p)
    return p


def test_repair_during_a_compaction_leaves_its_files(tmp_path):
    L = make_lake(tmp_path / "lake")
    sch = lk.schema("tokens")
    L.write_fragments("tokens", rows("tokens", "dead"), sch)  # a writer killed long ago: real debris
    (old,) = unreferenced_files(L, "tokens", 0)
    os.utime(old, (time.time() - 600, time.time() - 600))
    p = paused_optimize(L, tmp_path / "flags", delete_unverified=False)
    try:
        compacted = set(unreferenced_files(L, "tokens", 0)) - {old}
        assert len(compacted) == 1  # the compaction's merged fragment, written, not committed
        # `tourray repair --min-age 0`, in its own process
        r = subprocess.run([sys.executable, "-m", "tourray.cli", "repair", "--lake", L.root, "--min-age", "0"],
                           env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
        left_by_repair = set(unreferenced_files(L, "tokens", 0))
        # a resuming capture's repair step (prepare_lake: its run's rows, then files), past the TTL
        with lk.RunLease(L, "r") as cap:
            orphans = delete_incomplete(L, "r", complete={"a", "b", "c"}, committed={"a", "b", "c"})
            removed_by_resume = remove_unreferenced(L, {cap.holder}, min_age_s=0)
    finally:
        (tmp_path / "flags" / "go").touch()
        out = finish(p)  # the compaction commits; versions older than 0 s are dropped
    assert whole(L) == sorted(["a", "b", "c"] * 4)  # every file the lake references is there
    assert r.returncode == 0 and "1 never-committed file(s) removed" in r.stdout, r.stdout + r.stderr[-2000:]
    assert left_by_repair == compacted  # the debris went, the compaction's file stayed
    assert orphans == [] and removed_by_resume == {}
    assert "'tokens': 1" in out  # compacted into one fragment
    assert [v["version"] for v in L.dataset("tokens").versions()] == [L.dataset("tokens").version]
    assert unreferenced_files(L, "tokens", 0) == []


def test_capture_after_optimize_check_keeps_its_fragments(tmp_path):
    L = make_lake(tmp_path / "lake")
    p = paused_optimize(L, tmp_path / "flags", delete_unverified=True)
    try:
        # optimize has checked the leases and is compacting; a capture starts now and writes a group
        cap = lk.RunLease(L, "r2").acquire()
        sch = lk.schema("tokens")
        frags = L.write_fragments("tokens", rows("tokens", "new"), sch)
    finally:
        (tmp_path / "flags" / "go").touch()
        out = finish(p)  # compaction commits, old versions and unverified files go
    try:
        assert "'tokens': 1" in out
        cap.check()  # the fence, as before every group's commit
        L.commit("tokens", frags)
    finally:
        cap.release()
    assert whole(L) == sorted(["a", "b", "c", "new"] * 4)


def _holder_code(lake: str, ttl: float, fake_ns: bool) -> str:
    """A process that takes run r's lease and exits without releasing it (a SIGKILL, its pid gone)."""
    fake = "lk._HOST = (lk.host_identity()[0], 1)  # another PID namespace of this boot" if fake_ns else ""
    return f"""
        import os
        from tourray.lake import tables as lk
        {fake}
        lk.RunLease(lk.Lake({lake!r}), "r", ttl_s={ttl}).acquire()
        os._exit(0)
    """


@pytest.mark.parametrize("fake_ns", [False, True], ids=["same-namespace", "other-namespace"])
def test_dead_pid_frees_a_lease_only_in_this_pid_namespace(tmp_path, fake_ns):
    L = lk.Lake(str(tmp_path / "lake"))
    finish(py(_holder_code(L.root, 600, fake_ns)))
    (row,) = L.read("leases").to_pylist()
    assert row["host"] == os.uname().nodename and row["boot_id"] == lk.host_identity()[0]
    if not fake_ns:  # this namespace: its pid is gone, so it no longer holds
        with lk.RunLease(L, "r"):
            pass
        return
    assert row["pid_ns"] == 1 != lk.host_identity()[1]
    with pytest.raises(UserError, match="being captured by another driver"):
        lk.RunLease(L, "r").acquire()  # same hostname, pid not visible here: it holds until it expires
    shutil.rmtree(tmp_path / "lake")
    finish(py(_holder_code(L.root, 1.5, fake_ns)))
    time.sleep(2)
    with lk.RunLease(L, "r") as lease:  # expired: taken over
        assert [r["holder"] for r in L.read("leases").to_pylist()] == [lease.holder]


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-Urpf", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="no unshare -Urpf (user and PID namespaces) here")
def test_driver_in_another_pid_namespace_is_refused(tmp_path):
    """Two drivers on one hostname, the second in a new PID namespace (as in a container with host
    networking): it cannot see the first's pid, and must not take the live lease."""
    L = lk.Lake(str(tmp_path / "lake"))
    code = f"""
        import os
        from tourray.errors import UserError
        from tourray.lake import tables as lk
        try:
            with lk.RunLease(lk.Lake({L.root!r}), "r"):
                print("won", os.getpid())
        except UserError as e:
            print("refused", os.getpid(), e)
    """
    with lk.RunLease(L, "r") as outer:
        r = subprocess.run(["unshare", "-Urpf", sys.executable, "-c", textwrap.dedent(code)], env=ENV, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        word, pid, *_ = r.stdout.split()
        assert int(pid) < 10 and word == "refused" and outer.holder in r.stdout, r.stdout  # pid 1 or so in there
        outer.check()  # still ours
    assert L.read("leases").num_rows == 0


# a driver that takes run r's lease (2 s), writes a group's fragments, and commits when told to
STALLING_DRIVER = """
    import sys
    from tourray.lake import tables as lk
    L = lk.Lake(sys.argv[1])
    with lk.RunLease(L, "r", ttl_s=2) as lease:
        sch = lk.schema("tokens")
        frags = L.write_fragments("tokens", lk_rows, sch)
        print("ready", flush=True)
        sys.stdin.readline()
        try:
            lease.check()  # the fence, right before the commit (the capture driver's line)
        except lk.LeaseLost as e:
            print("refused:", e, flush=True)
        else:
            L.commit("tokens", frags)
            print("committed", flush=True)
"""


def stalling_driver(L: lk.Lake) -> subprocess.Popen:
    sch = lk.schema("tokens")
    L.ensure("tokens", sch)
    data = rows("tokens", "stalled")
    code = textwrap.dedent(STALLING_DRIVER).replace(
        "lk_rows", f"__import__('pyarrow').Table.from_pylist({data.to_pylist()!r}, schema=lk.schema('tokens'))")
    p = subprocess.Popen([sys.executable, "-c", code, L.root], env=ENV, cwd=REPO, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
    return p


def stall(p: subprocess.Popen, seconds: float) -> None:
    """Freeze the whole process (heartbeat thread included) past its lease's lifetime."""
    os.kill(p.pid, signal.SIGSTOP)
    time.sleep(seconds)


def test_stalled_holder_taken_over_is_refused_at_commit(tmp_path):
    L = lk.Lake(str(tmp_path / "lake"))
    p = stalling_driver(L)
    try:
        stall(p, 2.5)
        new = lk.RunLease(L, "r", ttl_s=30).acquire()  # its lease expired: taken over
        p.stdin.write("go\n")
        p.stdin.flush()  # the stalled one goes on straight to its commit as it wakes
    finally:
        os.kill(p.pid, signal.SIGCONT)
    try:
        out = finish(p)
        assert "refused:" in out and "committed" not in out, out
        new.check()  # the new holder's lease is intact
        assert [r["holder"] for r in L.read("leases").to_pylist()] == [new.holder]
    finally:
        new.release()
    assert whole(L) == []


def test_late_heartbeat_does_not_revive_an_expired_lease(tmp_path):
    """The split brain: a holder stalls past its expiry, another judges it stale; the late beat must
    not refresh the row (the other would then delete nothing and both would hold the run)."""
    L = lk.Lake(str(tmp_path / "lake"))
    p = stalling_driver(L)
    try:
        stall(p, 2.5)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    time.sleep(1.5)  # its heartbeat thread (every 0.5 s) has woken and tried
    (row,) = L.read("leases").to_pylist()
    assert row["expires"] < dt.datetime.now(dt.timezone.utc)  # still stale: anyone may take the run
    p.stdin.write("go\n")
    p.stdin.flush()
    out = finish(p)
    assert "refused:" in out and "committed" not in out, out
    assert whole(L) == []
    with lk.RunLease(L, "r", ttl_s=30) as lease:
        lease.check()


def test_lake_wide_leases_are_shared_and_bound_removals(tmp_path):
    """`Lake.lease` for any writer: lake-wide ones are shared, and an unreferenced file younger than
    the oldest live lease (less the clock allowance for other holders) is never removed."""
    L = make_lake(tmp_path / "lake", samples=("a",))
    sch = lk.schema("tokens")
    with L.lease("heal") as heal, L.lease("optimize") as opt:
        assert {r["kind"] for r in lk.live_leases(L)} == {"heal", "optimize"}
        before = lk.removable_before(L, {opt.holder})
        assert before == heal.started - dt.timedelta(seconds=lk.CLOCK_SKEW_S)
        L.write_fragments("tokens", rows("tokens", "inflight"), sch)
        assert remove_unreferenced(L, {opt.holder}, min_age_s=0) == {}
        with L.lease("heal", run="h") as h:
            with pytest.raises(UserError, match="being written by another heal"):
                L.lease("capture", run="h").acquire()
            h.check()
    assert lk.live_leases(L) == []
    assert remove_unreferenced(L, min_age_s=0) == {"tokens": 1}  # no lease: debris
    with pytest.raises(ValueError, match="lease kind"):
        L.lease("Not a kind")


def test_leases_table_of_an_older_tourray_is_upgraded(tmp_path):
    L = lk.Lake(str(tmp_path / "lake"))
    v1 = pa.schema([pa.field("run", pa.string(), False), pa.field("holder", pa.string(), False),
                    pa.field("state", pa.string(), False)]
                   + [pa.field(n, pa.timestamp("us", tz="UTC"), False) for n in ("heartbeat", "expires")])
    now = dt.datetime.now(dt.timezone.utc)
    live = dict(run="r", holder="old:1:x", state="held", heartbeat=now, expires=now + dt.timedelta(seconds=60))
    lance.write_dataset(pa.Table.from_pylist([live], schema=v1), L.uri("leases"))
    with pytest.raises(UserError, match="older tourray holds run 'r'"):
        lk.RunLease(L, "r").acquire()
    lance.write_dataset(pa.Table.from_pylist([dict(live, expires=now)], schema=v1), L.uri("leases"), mode="overwrite")
    with lk.RunLease(L, "r") as lease:
        assert L.dataset("leases").schema.names == lk.schema("leases").names
        assert [r["holder"] for r in L.read("leases").to_pylist()] == [lease.holder]
