"""`optimize`: a lake of many small groups compacts to few fragments and one version per table,
and every reader (SQL, verify, statistics, a resumed capture) sees exactly what it saw before."""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import time

import pytest

from conftest import lake_snapshot
from tourray.capture import CaptureConfig, run_capture
from tourray.errors import UserError
from tourray.lake.tables import RUN_ZONES, Lake
from tourray.lake.optimize import add_parser, optimize, parse_age
from tourray.lake.sql import connect, query_file, run_query
from tourray.lake.verify import verify_lake


def config(qwen3_model, corpus_dir, lake):
    return CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="r",
                         layers="embed,0", group_size=1, batch_size=1)


@pytest.fixture(scope="module")
def captured(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    lake = tmp_path_factory.mktemp("optimize") / "lake"
    assert run_capture(config(qwen3_model, corpus_dir, lake), progress=False, executor="local")["groups"] == 6  # one group per sample
    return lake


@pytest.fixture
def lake(captured, tmp_path):
    return Lake(str(shutil.copytree(captured, tmp_path / "lake")))


def readings(lake: Lake) -> dict:
    """Everything a reader can see, in a comparable form."""
    from tourray.stats.stream import Selection, layer_stream, resolve

    con = connect(lake)
    out = {t: con.sql(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
           for t in ("samples", "tokens", "blocks", "token_layers", "runs")}
    out["h"] = con.sql("SELECT sample_id, layer, pos, h FROM activations ORDER BY ALL").fetchall()
    out["ppl"] = run_query(con, query_file("perplexity_by_category").read_text(), {"run": "r"}).fetchall()
    out["sim"] = run_query(con, query_file("layer_similarity").read_text(), {"run": "r"}).fetchall()
    mask = resolve(lake, "r", Selection(weight="entropy"))
    out["stream"] = [(c.sample_id.to_pylist(), c.pos.tolist(), c.weights.tolist(), c.h[0].tolist())
                     for c in layer_stream(lake, "r", "resid_post", [-1, 0], mask, batch_rows=32, prefetch=0)]
    r = verify_lake(lake)
    out["verify"] = (r.blocks, r.samples, r.token_rows, r.problems)
    return out


def test_optimize_compacts_and_keeps_every_reading(lake, qwen3_model, corpus_dir):
    before = readings(lake)
    assert before["verify"][3] == [] and before["verify"][0] == 12
    frags = {t: len(lake.dataset(t).get_fragments()) for t in lake.tables()}
    old = {t: lake.dataset(t).version for t in lake.tables()}
    assert frags["activations"] >= 6 and frags["tokens"] >= 6 and frags["samples"] >= 6
    # a reader that opened an old snapshot keeps it while it is younger than --older-than
    results = {r.table: r for r in optimize(lake, older_than=dt.timedelta(hours=1))}
    assert all(r.fragments_after == 1 for r in results.values() if r.table != "leases"), results
    assert lake.dataset("tokens", version=1).count_rows() == 0  # version 1 (the empty table) still there
    assert readings(lake) == before
    results = {r.table: r for r in optimize(lake, older_than=dt.timedelta(0))}
    for t in (t for t in lake.tables() if t != "leases"):  # bookkeeping, its rows deleted on release
        ds = lake.dataset(t)
        assert len(ds.get_fragments()) == 1 < frags[t] or frags[t] == 1, t
        assert [v["version"] for v in ds.versions()] == [ds.version] and ds.version >= old[t]
        assert results[t].versions_after == 1 and results[t].versions_before > 1
        with pytest.raises((ValueError, OSError)):
            lake.dataset(t, version=1)
    assert results["activations"].bytes_removed > 0
    for t in (t for t in lake.tables() if t != "leases"):  # the compacted fragments are back under the zone map
        assert lake.dataset(t).stats.index_stats(RUN_ZONES)["num_unindexed_fragments"] == 0, t
    assert readings(lake) == before
    # a resumed capture finds every sample complete and adds nothing (it only records itself in runs)
    assert run_capture(config(qwen3_model, corpus_dir, lake.root), progress=False, executor="local")["captured"] == 0
    after = readings(lake)
    assert {k: v for k, v in after.items() if k != "runs"} == {k: v for k, v in before.items() if k != "runs"}


def test_optimize_refuses_a_held_lake(lake):
    """The capture's own lease (tourray.lake.tables.RunLease) holds the lake; an expired one does not."""
    from tourray.lake.tables import RunLease

    with RunLease(lake, "r", ttl_s=60):
        snap = lake_snapshot(lake.root)
        with pytest.raises(UserError, match="held by a running capture .1 live lease"):
            optimize(lake, older_than=dt.timedelta(0))
        assert lake_snapshot(lake.root) == snap
    stale = RunLease(lake, "r2", ttl_s=0.5).acquire()  # a driver that died holding it: expires, no longer holds
    stale._stop.set()  # its heartbeat stops, as when the process is killed
    stale._thread.join()
    time.sleep(1.5)
    assert {r.table: r.fragments_after for r in optimize(lake, older_than=dt.timedelta(0))}["activations"] == 1


def test_cli_optimize(lake, capsys, tmp_path):
    top = argparse.ArgumentParser()
    sub = top.add_subparsers()

    def command(name, fn, help):
        p = sub.add_parser(name, help=help)
        p.set_defaults(fn=fn)
        return p

    add_parser(command)
    args = top.parse_args(["optimize", "--lake", lake.root, "--older-than", "0s"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert f"optimized {lake.root}:" in out and "activations" in out
    assert len(lake.dataset("activations").versions()) == 1
    with pytest.raises(UserError, match="--older-than 'soon'"):
        parse_age("soon")
    args = top.parse_args(["optimize", "--lake", str(tmp_path / "nothing")])
    with pytest.raises(UserError, match="no tourray tables"):
        args.fn(args)
