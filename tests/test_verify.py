"""`verify`: a fresh capture checks clean; every kind of tampering is named by its block."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import lance
import numpy as np
import pytest

from conftest import REPO
from tourray.capture import CaptureConfig, run_capture
from tourray.lake import Lake, vectors_to_arrow
from tourray.verify import verify


@pytest.fixture(scope="module")
def captured(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    lake = tmp_path_factory.mktemp("verify") / "lake"
    cfg = CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="r",
                        layers="embed,0", group_size=2, batch_size=2)
    run_capture(cfg, progress=False)
    return lake


@pytest.fixture
def lake(captured, tmp_path):
    """A private copy of the captured lake, free to tamper with."""
    return Lake(str(shutil.copytree(captured, tmp_path / "lake")))


def a_sample(lake):
    return lake.read("samples").sort_by("source").column("sample_id")[0].as_py()


def test_fresh_capture_verifies(lake):
    checked, problems = verify(lake)
    assert problems == []
    assert checked == lake.dataset("blocks").count_rows() == 6 * 2  # 6 samples x (embed, block 0)
    assert verify(lake, run="r") == (12, []) and verify(lake, run="other") == (0, [])


def test_changed_checksum_names_the_block(lake):
    sid = a_sample(lake)
    lake.dataset("blocks").update({"sha256": "'00'"}, where=f"sample_id = '{sid}' AND layer = 0")
    _, problems = verify(lake)
    assert problems == [f"run r sample {sid} layer 0 site resid_post: sha256 differs from the recorded checksum"]


def test_changed_vectors_name_the_block(lake):
    sid = a_sample(lake)
    where = f"sample_id = '{sid}' AND layer = -1"
    ds = lake.dataset("activations")
    rows = ds.to_table(filter=where).sort_by("pos")
    h = np.array(rows.column("h").to_pylist(), np.float16)
    h[2, 5] += 1
    rows = rows.set_column(rows.schema.get_field_index("h"), "h", vectors_to_arrow(h, "float16"))
    ds.delete(where)
    lance.write_dataset(rows, ds.uri, mode="append")  # the block moves, whole, to the end
    _, problems = verify(lake)
    assert problems == [f"run r sample {sid} layer -1 site resid_post: sha256 differs from the recorded checksum"]


def test_deleted_row_names_sample_layer_and_position(lake):
    sid = a_sample(lake)
    n = lake.read("samples", filter=f"sample_id = '{sid}'").column("n_tokens")[0].as_py()
    lake.dataset("activations").delete(f"sample_id = '{sid}' AND layer = 0 AND pos = 3")
    _, problems = verify(lake)
    assert problems and all(f"sample {sid} layer 0 " in p for p in problems), problems
    assert f"run r sample {sid} layer 0 site resid_post: span 0-{n - 1} differs from recorded 0-{n}" in problems
    # the positions problem points at the gap, not at the start of the block
    assert any("positions" in p and "pos 3" in p for p in problems), problems


def test_deleted_block_is_named(lake):
    sid = a_sample(lake)
    lake.dataset("activations").delete(f"sample_id = '{sid}' AND layer = -1")
    _, problems = verify(lake)
    assert problems == [f"run r sample {sid} layer -1 site resid_post: recorded in blocks but has no rows"]


def test_cli_verify_exits_1_and_prints_the_problem(lake):
    sid = a_sample(lake)
    lake.dataset("blocks").update({"sha256": "'00'"}, where=f"sample_id = '{sid}' AND layer = 0")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "tourray.cli", "verify", "--lake", lake.root, "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 1, p.stderr
    assert f"run r sample {sid} layer 0 site resid_post: sha256 differs" in p.stdout
    assert "1 problem(s)" in p.stdout and "Traceback" not in p.stderr
    shutil.rmtree(lake.root)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 2 and "error: --lake: no tourray tables" in p.stderr and "Traceback" not in p.stderr
