"""DuckDB over the lake: view types, values, filter/projection pushdown, and the shipped queries."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tourray.capture import CaptureConfig, run_capture
from tourray.lake.tables import RUN_ZONES, Lake, arrow_to_numpy
from tourray.lake.sql import LakeView, connect, query_file, run_query

DTYPES = ("float16", "bfloat16", "float32")
LAYERS = {"float16": "embed,0", "bfloat16": "embed,0", "float32": "all"}  # all = embed + 3 blocks


@pytest.fixture(scope="module")
def lakes(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    out = {}
    for dtype in DTYPES:
        lake = tmp_path_factory.mktemp(f"lake-{dtype}")
        cfg = CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), run="r",
                            store_dtype=dtype, layers=LAYERS[dtype], group_size=2, batch_size=2)
        assert run_capture(cfg, progress=False, executor="local")["captured"] == 6
        out[dtype] = lake
    return out


def test_a_capture_leaves_every_table_under_its_zone_map_of_run(lakes):
    lake = Lake(str(lakes["float16"]))
    for t in ("samples", "tokens", "activations", "token_layers", "block_sums", "blocks"):
        ds = lake.dataset(t)
        assert len(ds.get_fragments()) >= 3, t  # group size 2, 6 samples: one fragment per group at least
        stats = ds.stats.index_stats(RUN_ZONES)
        assert stats["index_type"] == "ZoneMap" and stats["num_unindexed_fragments"] == 0, (t, stats)
        assert "ScalarIndexQuery" in ds.scanner(columns=["run"], filter="run = 'r'").explain_plan(), t


def test_connections_in_one_process_stay_apart(lakes):
    """connect() hands out cursors on one in-memory DuckDB: each has its own views of its own lake."""
    a, b = connect(str(lakes["float16"])), connect(str(lakes["float32"]))
    count = "SELECT count(DISTINCT layer) FROM activations"
    assert a.sql(count).fetchall() == [(2,)] and b.sql(count).fetchall() == [(4,)]  # embed,0 / all
    b.close()
    assert a.sql(count).fetchall() == [(2,)]
    assert connect(str(lakes["float32"])).sql(count).fetchall() == [(4,)]


def types(con, view):
    return {r[0]: r[1] for r in con.execute(f"DESCRIBE {view}").fetchall()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_view_types(lakes, dtype):
    con = connect(str(lakes[dtype]))
    per_sample = ["activations", "block_sums", "blocks", "token_layers", "tokens"]
    assert sorted(r[0] for r in con.execute("SHOW TABLES").fetchall()) == sorted(
        per_sample + ["leases", "run_texts", "runs", "samples"] + [f"raw_{t}" for t in per_sample])
    a = types(con, "activations")
    assert a["h"] == "FLOAT[128]" and a["layer"] == "SMALLINT" and a["pos"] == "INTEGER"
    t = types(con, "tokens")
    assert t["surprisal"] == "FLOAT" and t["entropy"] == "FLOAT" and t["char_start"] == "INTEGER"
    assert types(con, "samples")["truncated"] == "BOOLEAN" and types(con, "samples")["text_start"] == "INTEGER"
    tl = types(con, "token_layers")
    assert tl["norm"] == "FLOAT" and tl["cos_prev"] == "FLOAT" and tl["layer"] == "SMALLINT"
    assert types(con, "runs")["created_at"] == "TIMESTAMP WITH TIME ZONE"


@pytest.mark.parametrize("dtype", DTYPES)
def test_sql_values_equal_lance_values(lakes, dtype):
    key = ["sample_id", "layer", "pos"]
    direct = Lake(str(lakes[dtype])).read("activations").sort_by([(k, "ascending") for k in key])
    want = arrow_to_numpy(direct.column("h"), np.float32)  # float32 conversion of the stored bits
    con = connect(str(lakes[dtype]))
    got_t = con.sql("SELECT sample_id, layer, pos, h FROM activations ORDER BY sample_id, layer, pos").to_arrow_table()
    assert got_t.column("layer").to_pylist() == direct.column("layer").to_pylist()
    got = np.array(got_t.column("h").to_pylist(), np.float32)
    assert got.shape == want.shape == (direct.num_rows, 128)
    assert np.array_equal(got, want)  # exact: both are the same stored value widened to float32
    n = con.execute("SELECT count(*) FROM activations").fetchone()[0]
    n_layers = 4 if dtype == "float32" else 2
    assert n == direct.num_rows == Lake(str(lakes[dtype])).dataset("tokens").count_rows() * n_layers


def test_layer_filter_is_pushed_into_lance(lakes, monkeypatch):
    calls = []
    orig = LakeView.scanner

    def spy(self, columns=None, filter=None, **kw):
        sc = orig(self, columns=columns, filter=filter, **kw)
        rec = dict(uri=self.uri, columns=columns, filter=None if filter is None else str(filter), rows=0)
        calls.append(rec)
        reader = sc.to_reader

        def counted():
            r = reader()

            def gen():
                for b in r:
                    rec["rows"] += b.num_rows
                    yield b
            return pa.RecordBatchReader.from_batches(r.schema, gen())

        sc.to_reader = counted
        return sc

    monkeypatch.setattr(LakeView, "scanner", spy)
    lake = Lake(str(lakes["float32"]))
    total = lake.dataset("activations").count_rows()
    layer0 = lake.dataset("activations").count_rows(filter="layer = 0")
    assert 0 < layer0 < total
    con = connect(lake)
    n, dim = con.execute("SELECT count(*), max(len(h)) FROM activations WHERE layer = 0").fetchone()
    assert (n, dim) == (layer0, 128)
    scans = [c for c in calls if c["uri"].endswith("activations.lance")]
    assert scans, calls
    assert all(c["filter"] is not None and "layer" in c["filter"] for c in scans), scans
    assert sum(c["rows"] for c in scans) == layer0  # Lance returned only layer 0's rows
    # run and sample_id are the join keys that keep only complete samples (narrow columns)
    assert all(c["columns"] is not None and set(c["columns"]) <= {"h", "layer", "run", "sample_id"} for c in scans), scans


def numpy_layer_similarity(lake, run: str = "r") -> dict[int, dict]:
    """Reference: for each block l with layer l-1 stored, cosines of the stored resid_post vectors
    (widened to float32, computed in float64) of layers l-1 and l at the positions whose
    tokens.segment is 'text' (independent of token_layers and of the samples text span)."""
    lk = Lake(str(lake))
    t = lk.read("activations", filter=f"run = '{run}' AND site = 'resid_post'").sort_by(
        [("sample_id", "ascending"), ("layer", "ascending"), ("pos", "ascending")])
    h = arrow_to_numpy(t.column("h"), np.float32).astype(np.float64)
    keys = list(zip(t.column("sample_id").to_pylist(), t.column("layer").to_pylist()))
    vectors, start = {}, 0
    for key, rows in itertools.groupby(keys):
        n = len(list(rows))
        vectors[key], start = h[start : start + n], start + n
    tokens = lk.read("tokens", ["sample_id", "pos", "segment"], filter=f"run = '{run}'").sort_by(
        [("sample_id", "ascending"), ("pos", "ascending")]).to_pydict()
    text = {sid: np.array([seg == "text" for _, seg in rows]) for sid, rows in itertools.groupby(
        zip(tokens["sample_id"], tokens["segment"]), key=lambda r: r[0])}
    cos: dict[int, list[np.ndarray]] = {}
    for (sid, layer), b in vectors.items():
        if (sid, layer - 1) in vectors:
            a = vectors[sid, layer - 1]
            c = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            cos.setdefault(layer, []).append(c[text[sid]])
    out = {}
    for layer, parts in sorted(cos.items()):
        c = np.concatenate(parts)
        out[layer] = dict(tokens=len(c), mean_cos=c.mean(), angular_distance=(np.arccos(np.clip(c, -1, 1)) / np.pi).mean())
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_similarity_query_equals_numpy_on_stored_vectors(lakes, dtype):
    con = connect(str(lakes[dtype]))
    rows = run_query(con, query_file("layer_similarity").read_text(), {"run": "r"}).fetchall()
    cols = ["layer", "tokens", "mean_cos", "block_influence", "angular_distance"]
    got = {r[0]: dict(zip(cols, r)) for r in rows}
    want = numpy_layer_similarity(lakes[dtype])
    assert list(got) == list(want) == ([0, 1, 2] if dtype == "float32" else [0])  # layer -1 has no input
    [(text_tokens,)] = con.sql("SELECT count(*) FROM tokens WHERE segment = 'text'").fetchall()
    for layer, w in want.items():
        g = got[layer]
        assert g["tokens"] == w["tokens"] == text_tokens
        # stated tolerance: 1e-5 absolute (token_layers holds float32 cosines of the stored vectors)
        assert g["mean_cos"] == pytest.approx(w["mean_cos"], abs=1e-5)
        assert g["angular_distance"] == pytest.approx(w["angular_distance"], abs=1e-5)
        assert g["block_influence"] == pytest.approx(1 - g["mean_cos"], abs=1e-12)  # the same float64 avg
    assert run_query(con, query_file("layer_similarity").read_text(), {"run": "other"}).fetchall() == []


# The shipped layer_similarity.sql before it read raw_token_layers (2026-12-05): the token_layers view
# (a semi join with samples) joined to samples again, and the clamp on the FLOAT column.
LAYER_SIMILARITY_BEFORE = """
SELECT t.layer,
       count(*) AS tokens,
       avg(t.cos_prev) AS mean_cos,
       1 - avg(t.cos_prev) AS block_influence,
       avg(acos(least(greatest(t.cos_prev, -1), 1)) / pi()) AS angular_distance
FROM token_layers AS t
JOIN samples AS s ON s.run = t.run AND s.sample_id = t.sample_id
WHERE t.run = $run AND s.run = $run AND t.site = 'resid_post' AND t.cos_prev IS NOT NULL
  AND t.pos >= s.text_start AND t.pos < s.text_end
GROUP BY t.layer
ORDER BY t.layer
"""


def test_layer_similarity_query_equals_its_former_form(lakes, tmp_path):
    """The faster query gives the former one's rows (summation order aside) on a lake that also holds a
    second run over the same sample ids (other cosines, one sample incomplete) and a killed capture's
    leftover rows: neither may leak into a run's figures. Run r reads the block_sums its capture wrote;
    run r2 has none (as a run captured before them): its token rows are summed, then those optimize
    writes, then some of each."""
    import shutil

    from tourray.lake.optimize import write_block_sums

    lake = Lake(str(shutil.copytree(lakes["float32"], tmp_path / "lake")))
    tl, samples = lake.read("token_layers"), lake.read("samples")
    other = tl.set_column(0, "run", pa.array(["r2"] * tl.num_rows))
    other = other.set_column(other.schema.get_field_index("cos_prev"), "cos_prev",  # nulls stay null
                             pc.multiply(other.column("cos_prev"), pa.scalar(0.5, pa.float32())))
    lake.append("token_layers", other, lake.dataset("token_layers").schema)
    s2 = samples.set_column(0, "run", pa.array(["r2"] * samples.num_rows)).slice(1)  # r2's first sample incomplete
    s2 = s2.set_column(s2.schema.get_field_index("text_end"), "text_end",  # and other text spans
                       pa.array(s2.column("text_end").to_numpy() - 1, pa.int32()))
    lake.append("samples", s2, lake.dataset("samples").schema)
    runs = lake.read("runs")  # r2 stores what r stores (optimize sums runs that store vectors)
    lake.append("runs", runs.set_column(runs.schema.get_field_index("run"), "run", pa.array(["r2"])),
                lake.dataset("runs").schema)
    orphan = tl.slice(0, 40).set_column(1, "sample_id", pa.array(["orphan"] * 40))
    lake.append("token_layers", orphan, lake.dataset("token_layers").schema)
    con = connect(lake)
    unindexed = {}  # the appends above are outside the capture's zone map of `run` until index_runs
    for run in ("r", "r2", "nope"):
        new = unindexed[run] = run_query(con, query_file("layer_similarity").read_text(), {"run": run}).fetchall()
        old = run_query(con, LAYER_SIMILARITY_BEFORE, {"run": run}).fetchall()
        assert [r[:2] for r in new] == [r[:2] for r in old]  # layers and token counts, exactly
        assert len(new) == (3 if run != "nope" else 0)
        for a, b in zip(new, old):
            assert a[2:] == pytest.approx(b[2:], rel=1e-12, abs=1e-15)
    assert lake.dataset("token_layers").stats.index_stats(RUN_ZONES)["num_unindexed_fragments"] == 2
    assert lake.index_runs(["token_layers", "samples"]) == ["token_layers", "samples"]
    assert lake.index_runs(["token_layers", "samples"]) == []  # up to date: no new version
    assert lake.dataset("token_layers").stats.index_stats(RUN_ZONES)["num_unindexed_fragments"] == 0
    con = connect(lake)
    for run in ("r", "r2", "nope"):  # zones of other runs skipped: the same rows
        got = run_query(con, query_file("layer_similarity").read_text(), {"run": run}).fetchall()
        assert [r[:2] for r in got] == [r[:2] for r in unindexed[run]]
        for a, b in zip(got, unindexed[run]):
            assert a[2:] == pytest.approx(b[2:], rel=1e-12, abs=1e-15)
    assert con.sql("SELECT count(DISTINCT tokens) FROM (" + query_file("layer_similarity").read_text().rstrip("; \n")
                   .replace("$run", "'r2'") + ")").fetchall() == [(1,)]
    with lake.lease("optimize") as lease:
        assert write_block_sums(lake, lease) == 5 * 4  # r2's complete samples x (embed + 3 blocks)
        assert write_block_sums(lake, lease) == 0
    two = ", ".join(repr(sid) for sid in s2.column("sample_id").to_pylist()[:2])
    lake.dataset("block_sums").delete(f"run = 'r2' AND sample_id IN ({two})")  # some samples summed, some read
    for backfilled in (False, True):
        con = connect(lake)
        assert con.sql("SELECT count(DISTINCT sample_id) FROM block_sums WHERE run = 'r2'").fetchall()[0][0] \
            == (5 if backfilled else 3)
        for run in ("r", "r2", "nope"):
            got = run_query(con, query_file("layer_similarity").read_text(), {"run": run}).fetchall()
            assert [r[:2] for r in got] == [r[:2] for r in unindexed[run]]
            for a, b in zip(got, unindexed[run]):
                assert a[2:] == pytest.approx(b[2:], rel=1e-12, abs=1e-15)
        with lake.lease("optimize") as lease:
            assert write_block_sums(lake, lease) == (0 if backfilled else 2 * 4)


# The shipped block_evidence.sql before block_sums (2026-12-06): every text token's row of layer l
# joined to layer l-1's, in FLOAT arithmetic where the columns are FLOAT.
BLOCK_EVIDENCE_BEFORE = """
WITH k AS (  -- next-token entropy: that of the distribution computed at pos (stored with token pos + 1)
    SELECT sample_id, pos, segment, lead(entropy) OVER (PARTITION BY sample_id ORDER BY pos) AS entropy
    FROM tokens WHERE run = $run
),
t AS (
    SELECT tl.sample_id, tl.pos, tl.layer, tl.norm, tl.cos_prev, k.entropy
    FROM token_layers AS tl
    JOIN k ON k.sample_id = tl.sample_id AND k.pos = tl.pos
    JOIN samples AS s ON s.run = tl.run AND s.sample_id = tl.sample_id
    WHERE tl.run = $run AND tl.site = 'resid_post' AND k.segment = 'text'
),
d AS (  -- block l: input = layer l-1's resid_post (the embedding for l = 0), output = layer l's
    SELECT b.layer AS block, b.cos_prev, b.entropy,
           sqrt(greatest(b.norm * b.norm + a.norm * a.norm - 2 * a.norm * b.norm * b.cos_prev, 0)) AS upd,
           a.norm AS in_norm
    FROM t AS b JOIN t AS a ON a.sample_id = b.sample_id AND a.pos = b.pos AND a.layer = b.layer - 1
    WHERE b.layer >= 0 AND b.cos_prev IS NOT NULL
)
SELECT block,
       count(*) AS tokens,
       avg(cos_prev) AS mean_cos,
       1 - avg(cos_prev) AS block_influence,
       1 - sum(entropy * cos_prev) / sum(entropy) AS entropy_weighted_influence,
       avg(upd) AS mean_update_norm,
       avg(upd / in_norm) AS rel_update_norm
FROM d
GROUP BY block
ORDER BY block
"""


def test_block_evidence_query_equals_its_former_form(lakes, tmp_path):
    """The prune plan's evidence from block_sums equals the former per-token join: with every sample's
    sums, with some samples' sums deleted (those read from token rows) and with none. Tolerances: counts
    exact; cosine means 1e-12 (the same float32 values summed in float64); entropy-weighted and update
    norms 1e-6 relative (the former form multiplied FLOAT columns in float32)."""
    import shutil

    lake = Lake(str(shutil.copytree(lakes["float32"], tmp_path / "lake")))
    query = query_file("block_evidence").read_text()
    want = run_query(connect(lake), BLOCK_EVIDENCE_BEFORE, {"run": "r"}).fetchall()
    assert [r[0] for r in want] == [0, 1, 2]
    ids = sorted(lake.read("samples").column("sample_id").to_pylist())
    for dropped in (0, 2, len(ids)):
        if dropped:
            lake.dataset("block_sums").delete("sample_id IN ({})".format(", ".join(repr(i) for i in ids[:dropped])))
        con = connect(lake)
        assert con.sql("SELECT count(DISTINCT sample_id) FROM block_sums").fetchall() == [(len(ids) - dropped,)]
        got = run_query(con, query, {"run": "r"}).fetchall()
        assert [r[:2] for r in got] == [r[:2] for r in want]
        for g, w in zip(got, want):
            assert g[2:4] == pytest.approx(w[2:4], rel=1e-12, abs=1e-15)
            assert g[4:] == pytest.approx(w[4:], rel=1e-6)
    assert run_query(connect(lake), query, {"run": "nope"}).fetchall() == []


def test_perplexity_by_category_query(lakes):
    con = connect(str(lakes["float16"]))
    rows = run_query(con, query_file("perplexity_by_category").read_text(), {"run": "r"}).fetchall()
    by_cat = {r[0]: r for r in rows}
    assert set(by_cat) == {"train", "eval"} and len(rows) == 2  # one row per category
    assert by_cat["train"][1] == 4 and by_cat["eval"][1] == 2
    for cat, samples, tokens, mean_s, ppl, mean_e in rows:
        assert ppl > 1 and ppl == pytest.approx(np.exp(mean_s), rel=1e-9)
        assert mean_e > 0


def test_views_show_only_complete_samples(lakes, tmp_path):
    """Rows of a sample with no samples row (a killed capture's leftovers) are not counted."""
    import shutil

    lake = Lake(str(shutil.copytree(lakes["float16"], tmp_path / "lake")))
    con = connect(lake)
    per_sample = ("tokens", "activations", "token_layers", "blocks")
    before = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in per_sample}
    ppl = run_query(con, query_file("perplexity_by_category").read_text(), {"run": "r"}).fetchall()
    src = lake.read("samples").column("sample_id")[0].as_py()
    for t in per_sample:
        rows = lake.read(t, filter=f"sample_id = '{src}'")
        rows = rows.set_column(rows.schema.get_field_index("sample_id"), "sample_id", pa.array(["orphan"] * rows.num_rows))
        lake.append(t, rows, lake.dataset(t).schema)
    con = connect(lake)
    for t in per_sample:
        assert lake.dataset(t).count_rows(filter="sample_id = 'orphan'") > 0
        assert con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] == before[t]
        raw = con.execute(f"SELECT count(*) FROM raw_{t}").fetchall()[0][0]
        assert raw == lake.dataset(t).count_rows() > before[t]
    assert run_query(con, query_file("perplexity_by_category").read_text(), {"run": "r"}).fetchall() == ppl
