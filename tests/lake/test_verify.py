"""`verify`: a fresh capture checks clean; every kind of tampering is named by its block or sample."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from conftest import REPO
from tourray.capture import CaptureConfig, run_capture
from tourray.lake.tables import Lake, vectors_to_arrow
from tourray.errors import UserError
from tourray.lake.verify import verify, verify_lake


@pytest.fixture(scope="module")
def captured(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    lake = tmp_path_factory.mktemp("verify") / "lake"
    cfg = CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="r",
                        layers="embed,0", group_size=2, batch_size=2)
    run_capture(cfg, progress=False, executor="local")
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
    assert verify(lake, run="r") == (12, [])
    with pytest.raises(UserError, match="no run 'other'"):
        verify(lake, run="other")
    report = verify_lake(lake)
    assert report.samples == 6 and report.token_rows == lake.dataset("tokens").count_rows()
    assert report.notes == []  # tokens checksummed too: nothing skipped


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


def append_orphan(lake, sid="00orphan00sample"):
    """Rows of a sample with no samples row (what a capture killed before its last commit leaves),
    copied from a real sample and given a new id, in tokens, activations, token_layers and blocks."""
    src = a_sample(lake)
    for table in ("tokens", "activations", "token_layers", "blocks"):
        t = lake.read(table, filter=f"sample_id = '{src}'")
        t = t.set_column(t.schema.get_field_index("sample_id"), "sample_id", pa.array([sid] * t.num_rows))
        if table == "blocks":  # and a wrong checksum: verify must not even look at it
            t = t.set_column(t.schema.get_field_index("sha256"), "sha256", pa.array(["00"] * t.num_rows))
        lake.append(table, t, lake.dataset(table).schema)
    return sid


def test_orphan_rows_are_ignored(lake):
    before = verify_lake(lake)
    append_orphan(lake)
    report = verify_lake(lake)
    assert report.problems == [] and report.blocks == before.blocks == 12
    assert report.token_rows == before.token_rows
    assert any("ignored rows of 1 incomplete sample" in n for n in report.notes)


def test_missing_block_record_and_duplicates_are_named(lake):
    sid = a_sample(lake)
    blk = lake.read("blocks", filter=f"sample_id = '{sid}' AND layer = 0")
    lake.dataset("blocks").delete(f"sample_id = '{sid}' AND layer = 0")
    _, problems = verify(lake)
    k = f"run r sample {sid} layer 0 site resid_post"
    assert sorted(problems) == sorted([f"{k}: expected by the run but not recorded in blocks",
                                       f"{k}: rows with no record in blocks"])
    lake.append("blocks", blk, lake.dataset("blocks").schema)
    lake.append("blocks", blk, lake.dataset("blocks").schema)
    assert verify(lake)[1] == [f"{k}: recorded more than once in blocks"]


def test_duplicated_block_and_tokens_are_named(lake):
    sid = a_sample(lake)
    n = lake.read("samples", filter=f"sample_id = '{sid}'").column("n_tokens")[0].as_py()
    for table in ("activations", "token_layers", "tokens"):
        t = lake.read(table, filter=f"sample_id = '{sid}'" + (" AND layer = 0" if table != "tokens" else ""))
        lake.append(table, t.sort_by("pos"), lake.dataset(table).schema)
    _, problems = verify(lake)
    assert sorted(problems) == sorted([
        f"run r sample {sid} layer 0 site resid_post: rows are not contiguous (block appears twice)",
        f"run r sample {sid} layer 0 site resid_post token_layers: rows are not contiguous (block appears twice)",
        f"run r sample {sid} tokens: rows are not contiguous or duplicated (another run of its rows, pos 0-{n - 1})"]), \
        problems


def test_duplicated_tokens_row_is_named(lake):
    sid = a_sample(lake)
    lake.append("tokens", lake.read("tokens", filter=f"sample_id = '{sid}' AND pos = 2"), lake.dataset("tokens").schema)
    assert verify(lake)[1] == [f"run r sample {sid} tokens: rows are not contiguous or duplicated "
                               "(another run of its rows, pos 2-2)"]


def source_of(lake, sid):
    return lake.read("samples", filter=f"sample_id = '{sid}'").column("source")[0].as_py()


def test_changed_token_value_is_a_checksum_mismatch(lake):
    """One surprisal changed in place (every row of the sample rewritten, in order, so only the
    checksum can tell): named by sample, source and the file now holding its rows."""
    sid = a_sample(lake)
    lake.dataset("tokens").update({"surprisal": "surprisal + 0.001 * CAST(pos = 3 AS FLOAT)"},  # no CASE in Lance
                                  where=f"sample_id = '{sid}'")
    file = lake.dataset("tokens").get_fragments()[-1].data_files()[0].path  # update wrote the sample anew
    assert verify(lake)[1] == [f"run r sample {sid} ({source_of(lake, sid)}) tokens: rows differ from "
                               f"samples.tokens_sha256 (in data/{file})"]


def test_flipped_byte_in_a_token_value_names_sample_and_file(lake):
    """A bit flipped inside a stored float32 surprisal (Lance stores them plain: found by its bytes)
    decodes fine and keeps every key and position: only the checksum catches it."""
    frag = max(lake.dataset("tokens").get_fragments(), key=lambda f: f.count_rows())
    victim = Path(lake.root) / "tokens.lance" / "data" / frag.data_files()[0].path
    t = frag.to_table(columns=["sample_id", "pos", "surprisal"])
    row = t.column("pos").to_pylist().index(5)  # pos 5..8 of the fragment's first sample: all non-null
    needle = t.column("surprisal").to_numpy()[row : row + 4].astype("<f4").tobytes()
    raw = bytearray(victim.read_bytes())
    at = raw.find(needle)
    assert at >= 0 and raw.find(needle, at + 1) < 0, "the values are no longer stored plain"
    raw[at + 5] ^= 0x01  # low mantissa bit of pos 6: a small, finite change
    victim.write_bytes(bytes(raw))
    sid = t.column("sample_id")[row].as_py()
    assert lake.read("tokens", filter=f"sample_id = '{sid}' AND pos = 6").column("surprisal")[0].as_py() != \
        t.column("surprisal")[row + 1].as_py()
    assert verify(lake)[1] == [f"run r sample {sid} ({source_of(lake, sid)}) tokens: rows differ from "
                               f"samples.tokens_sha256 (in data/{victim.name})"]


def test_missing_token_layers_rows_are_named(lake):
    sid = a_sample(lake)
    n = lake.read("samples", filter=f"sample_id = '{sid}'").column("n_tokens")[0].as_py()
    tl = lake.dataset("token_layers")
    tl.delete(f"sample_id = '{sid}' AND layer = -1 AND pos = 3")
    k = f"run r sample {sid} layer -1 site resid_post token_layers"
    assert sorted(verify(lake)[1]) == sorted([f"{k}: positions out of order or missing at pos 3 (found 4)",
                                              f"{k}: span 0-{n - 1} differs from expected 0-{n}"])
    tl.delete(f"sample_id = '{sid}'")
    assert sorted(verify(lake)[1]) == sorted(
        f"run r sample {sid} layer {layer} site resid_post token_layers: expected by the run but has no rows"
        for layer in (-1, 0))


def test_block_sums_are_checked_against_token_layers(lake):
    """block_sums (the rollup layer_similarity reads) must agree with its token_layers rows: a changed
    sum, a changed count, a missing or duplicated row are each named; a sample with no rows at all
    (captured before the table) is a note, and `tourray optimize` writes its rows back."""
    from tourray.lake.optimize import optimize, write_block_sums

    sid = a_sample(lake)
    k = f"run r sample {sid} layer 0 site resid_post block_sums"
    bs = lake.dataset("block_sums")
    assert bs.count_rows() == 12 and bs.count_rows(filter="layer = -1 AND text_tokens = 0") == 6
    row = lake.read("block_sums", filter=f"sample_id = '{sid}' AND layer = 0").to_pylist()[0]
    bs.update({"cos_sum": str(row["cos_sum"] + 1e-6 * row["text_tokens"])}, where=f"sample_id = '{sid}' AND layer = 0")
    [problem] = verify(lake)[1]
    assert problem.startswith(f"{k}: sums differ from token_layers' rows"), problem
    bs.update({"cos_sum": repr(row["cos_sum"]), "text_tokens": str(row["text_tokens"] + 1)},
              where=f"sample_id = '{sid}' AND layer = 0")
    assert verify(lake)[1] == [f"{k}: {row['text_tokens'] + 1} text tokens, token_layers has {row['text_tokens']}"]
    bs.delete(f"sample_id = '{sid}' AND layer = 0")
    assert verify(lake)[1] == [f"{k}: no row (the sample has rows for other blocks)"]
    again = pa.Table.from_pylist([row], schema=bs.schema)
    lake.append("block_sums", pa.concat_tables([again, again]), bs.schema)
    assert verify(lake)[1] == [f"{k}: recorded more than once"]
    lake.dataset("block_sums").delete(f"sample_id = '{sid}'")
    report = verify_lake(lake)
    assert report.problems == [] and any(n.startswith("1 complete sample(s) have no block_sums rows") for n in report.notes)
    with lake.lease("drop", run="r"), lake.lease("optimize") as lease:  # a run held by a writer is left alone
        assert write_block_sums(lake, lease) == 0
    optimize(lake)
    assert lake.dataset("block_sums").count_rows() == 12
    assert verify_lake(lake).notes == [] and verify(lake)[1] == []


def test_old_samples_schema_is_noted_not_failed(lake):
    """A lake from before samples.tokens_sha256 (schema v2): tokens checked by position, with a note."""
    ds = lake.dataset("samples")
    ds.drop_columns(["tokens_sha256"])
    ds = lake.dataset("samples")
    ds.replace_schema_metadata({**{k.decode(): v.decode() for k, v in ds.schema.metadata.items()},
                                "tourray.schema_version": "2"})
    report = verify_lake(lake)
    assert report.problems == [] and report.samples == 6
    assert any(n.startswith("tokens not checksummed (samples schema v2") for n in report.notes), report.notes


def test_missing_tokens_are_named(lake):
    sid = a_sample(lake)
    n = lake.read("samples", filter=f"sample_id = '{sid}'").column("n_tokens")[0].as_py()
    lake.dataset("tokens").delete(f"sample_id = '{sid}' AND pos = 2")
    _, problems = verify(lake)
    assert sorted(problems) == sorted([
        f"run r sample {sid} tokens: positions out of order or missing at pos 2 (found 3)",
        f"run r sample {sid} tokens: {n - 1} rows, samples says n_tokens {n}"]), problems


def data_files(lake, table):
    return sorted((Path(lake.root) / f"{table}.lance" / "data").glob("*.lance"), key=lambda p: p.stat().st_size)


# a flipped byte in any file's structure makes it unreadable; one in the activations payload fails its
# block's sha256 (in tokens' values: test_flipped_byte_in_a_token_value_names_sample_and_file)
@pytest.mark.parametrize("table,where", [("activations", "middle"), ("activations", "footer"), ("tokens", "footer")])
def test_flipped_byte_is_caught(lake, table, where):
    victim = data_files(lake, table)[-1]  # the biggest file of the table
    raw = bytearray(victim.read_bytes())
    at = len(raw) // 2 if where == "middle" else len(raw) - 20  # -20: inside Lance's footer
    raw[at] ^= 0xFF
    victim.write_bytes(bytes(raw))
    _, problems = verify(lake)
    assert problems, "a flipped byte went unnoticed"
    if where == "footer":
        assert any(f"data/{victim.name}" in p and "unreadable" in p for p in problems), problems


@pytest.mark.parametrize("table", ["activations", "token_layers", "tokens"])
def test_deleted_data_file_is_named(lake, table):
    victim = data_files(lake, table)[0]
    victim.unlink()
    _, problems = verify(lake)
    assert any(f"table {table} " in p and f"data/{victim.name}" in p and "unreadable" in p for p in problems), problems


def test_deleted_data_file_with_run_is_named_by_the_cli(lake):
    """With --run, verify sized its progress bar with a filtered count that reads every file: a deleted
    one ended in a raw OSError traceback before the per-fragment scan could name it."""
    victim = data_files(lake, "activations")[0]
    victim.unlink()
    _, problems = verify(lake, run="r")
    assert any("table activations " in p and f"data/{victim.name}" in p and "unreadable" in p for p in problems), problems
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "tourray.cli", "verify", "--lake", lake.root, "--run", "r", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    assert f"data/{victim.name}" in p.stdout and "Traceback" not in p.stderr, (p.stdout[-2000:], p.stderr[-3000:])


def stream_sums(lake, sel):
    from tourray.stats.stream import Selection, layer_stream, resolve

    mask = resolve(lake, "r", Selection(**sel))
    rows, total = 0, np.zeros(2)
    for c in layer_stream(lake, "r", "resid_post", [-1, 0], mask, batch_rows=16, prefetch=0):
        w = np.ones(len(c)) if c.weights is None else c.weights
        rows += len(c)
        total += [float(w @ c.h[-1].sum(1)), float(w @ c.h[0].sum(1))]
    return rows, total


@pytest.mark.parametrize("sel", [{}, {"weight": "entropy"}, {"where": "surprisal > 1"}])
def test_statistics_ignore_orphan_rows(lake, sel):
    before = stream_sums(lake, sel)
    append_orphan(lake)
    # and leftovers in one layer only, which would also break the layers' row-for-row alignment
    t = lake.read("activations", filter=f"sample_id = '{a_sample(lake)}' AND layer = 0")
    t = t.set_column(t.schema.get_field_index("sample_id"), "sample_id", pa.array(["00one00layer0000"] * t.num_rows))
    lake.append("activations", t, lake.dataset("activations").schema)
    after = stream_sums(lake, sel)
    assert after[0] == before[0] > 0 and np.array_equal(after[1], before[1])


def test_blocks_split_across_fragments_verify(lake):
    """Blocks and samples' tokens cut across fragment (and so Ray task) boundaries, as a rewrite
    into big files can do: their checksums are re-read across the fragments."""
    for table in ("activations", "tokens"):
        ds = lake.dataset(table)
        t = ds.to_table()
        lance.write_dataset(t, ds.uri, mode="overwrite", max_rows_per_file=37, max_rows_per_group=37)
        assert len(lake.dataset(table).get_fragments()) == -(-t.num_rows // 37)
    assert verify(lake) == (12, [])
    sid = a_sample(lake)
    lake.dataset("blocks").update({"sha256": "'00'"}, where=f"sample_id = '{sid}' AND layer = 0")
    lake.dataset("samples").update({"tokens_sha256": "'00'"}, where=f"sample_id = '{sid}'")
    problems = verify(lake)[1]
    assert problems[0] == f"run r sample {sid} layer 0 site resid_post: sha256 differs from the recorded checksum"
    assert len(problems) == 2 and problems[1].startswith(
        f"run r sample {sid} ({source_of(lake, sid)}) tokens: rows differ from samples.tokens_sha256 (in data/")
    assert problems[1].count("data/") > 1, problems  # its rows span files: hashed across them


def test_both_sites_with_the_embedding_verify_clean(qwen3_model, corpus_dir, tmp_path, ray_session):
    """The embedding has resid_post only (no mid-block site): verify must not expect its resid_mid."""
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir / "train"), lake=str(tmp_path / "l"),
                              run="b", layers="embed,0", sites="resid_post,resid_mid", group_size=4),
                progress=False, executor="local")
    r = verify_lake(Lake(str(tmp_path / "l")), "b")
    assert r.problems == [] and r.blocks == r.samples * 3  # embed post + block 0 post and mid
