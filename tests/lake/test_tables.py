"""Declared schemas, write checks, vector round trips, and fragment writes + atomic commits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from lance.arrow import BFloat16Type

from tourray.lake import tables as lk
from tourray.errors import UserError
from tourray.lake.tables import Lake, arrow_to_numpy, check, empty_table, schema, vectors_to_arrow

PARAMS = dict(store_dtype="float16", hidden_size=8)


# samples 2: text_start, text_end; 3: tokens_sha256. tokens 2: token_class, kl_ref. leases 2: kind, host
# identity, started. Others 1.
VERSIONS = {"samples": 3, "tokens": 2, "leases": 2}


@pytest.mark.parametrize("table", lk.TABLES)
def test_every_declared_schema_parses(table):
    s = schema(table, **PARAMS)
    assert s.metadata[b"tourray.table"] == table.encode()
    assert s.metadata[b"tourray.schema_version"] == str(VERSIONS.get(table, 1)).encode()
    key = yaml.safe_load((lk.SCHEMA_DIR / f"{table}.yaml").read_text())["key"]
    assert len(s) >= 5 and s.names[0] == key[0] and set(key) <= set(s.names)  # run, for per-run tables


def test_schema_types():
    h = schema("activations", store_dtype="bfloat16", hidden_size=128).field("h").type
    assert pa.types.is_fixed_size_list(h) and h.list_size == 128 and isinstance(h.value_type, BFloat16Type)
    runs = schema("runs")
    assert runs.field("layers").type == pa.list_(pa.int16())
    assert runs.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert runs.field("tourray_commit").nullable and not runs.field("run").nullable
    with pytest.raises(ValueError, match="hidden_size"):
        schema("activations", store_dtype="float16")


def acts(n=3, d=8, dtype="float16", **over):
    cols = dict(run=pa.array(["r"] * n), sample_id=pa.array(["s"] * n), pos=pa.array(np.arange(n, dtype=np.int32)),
                layer=pa.array(np.zeros(n, np.int16)), site=pa.array(["resid_post"] * n))
    cols.update(over)
    if "h" not in cols:
        cols["h"] = vectors_to_arrow(np.ones((n, d), np.uint16 if dtype == "bfloat16" else dtype), dtype)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def refused(table, **over):
    with pytest.raises(UserError) as e:
        check("activations", acts(**over) if table is None else table, schema("activations", **PARAMS))
    return str(e.value)


def test_check_accepts_matching_data():
    check("activations", acts(), schema("activations", **PARAMS))  # no exception


@pytest.mark.parametrize("over,words", [
    (dict(layer=pa.array(np.zeros(3, np.int32))), ["'layer'", "int32", "int16"]),               # wrong dtype
    (dict(h=vectors_to_arrow(np.ones((3, 8), np.float32), "float32")), ["'h'", "float"]),        # wrong store dtype
    (dict(h=vectors_to_arrow(np.ones((3, 16), np.float16), "float16")), ["'h'", "[16]", "[8]"]),  # wrong width
    (dict(site=None), ["missing column 'site'"]),
    (dict(extra=pa.array([1, 2, 3])), ["unexpected column 'extra'"]),
    (dict(sample_id=pa.array(["s", None, "s"])), ["'sample_id'", "nulls"]),
])
def test_check_refusals_name_table_and_column(over, words):
    msg = refused(None, **over)
    assert "table 'activations'" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_nullable_column_accepts_nulls():
    s = schema("tokens")
    t = empty_table(s).to_pylist()
    row = dict(run="r", sample_id="s", pos=0, token_id=1, token="a", char_start=None, char_end=None,
               segment="template", surprisal=None, entropy=None)
    check("tokens", pa.Table.from_pylist(t + [row], schema=s), s)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_vectors_round_trip_exact(dtype):
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(dtype)
    col = vectors_to_arrow(x, dtype)
    assert col.type.list_size == 8 and len(col) == 5
    assert np.array_equal(arrow_to_numpy(col), x) and arrow_to_numpy(col).dtype == x.dtype
    assert np.array_equal(arrow_to_numpy(col, np.float32), x.astype(np.float32))
    assert np.array_equal(arrow_to_numpy(col.slice(2, 2)), x[2:4])  # slices keep their offset
    assert np.array_equal(arrow_to_numpy(pa.chunked_array([col[:2], col[2:]])), x)
    from_torch = vectors_to_arrow(torch.from_numpy(x), dtype)
    assert np.array_equal(arrow_to_numpy(from_torch), x)


def test_bfloat16_round_trip_matches_torch_rounding():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 100
    bf = x.to(torch.bfloat16)
    bits = bf.view(torch.int16).numpy().view(np.uint16)  # what the capture engine hands over
    col = vectors_to_arrow(bits, "bfloat16")
    assert isinstance(col.type.value_type, BFloat16Type)
    assert np.array_equal(arrow_to_numpy(col), bits)  # dtype=None keeps the raw patterns
    got = arrow_to_numpy(col, np.float32)
    assert np.array_equal(got, bf.float().numpy())  # exactly torch's round-to-nearest-even value
    assert not np.array_equal(got, x.numpy())  # (and bfloat16 did round)
    assert np.array_equal(arrow_to_numpy(col.slice(1, 3), np.float32), bf.float().numpy()[1:4])


def test_write_fragments_then_commit_is_one_atomic_append(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    s = schema("activations", **PARAMS)
    lake.ensure("activations", s)
    assert lake.tables() == ["activations"] and lake.dataset("activations").count_rows() == 0
    v0 = lake.dataset("activations").version
    frags = lake.write_fragments("activations", acts(4), s) + lake.write_fragments("activations", acts(3), s)
    assert lake.dataset("activations").count_rows() == 0  # written, not yet visible
    v1 = lake.commit("activations", frags)
    assert v1 == v0 + 1 and lake.dataset("activations").count_rows() == 7
    assert lake.commit("activations", []) is None  # nothing to commit: no new version
    assert lake.dataset("activations").version == v1
    with pytest.raises(UserError, match="'h'"):
        lake.write_fragments("activations", acts(2, d=16), s)
    assert lake.dataset("activations").count_rows() == 7


def test_empty_bfloat16_table_creates_a_bfloat16_lake(tmp_path):
    s = schema("activations", store_dtype="bfloat16", hidden_size=8)
    e = empty_table(s)
    assert e.num_rows == 0 and e.schema.equals(s)
    lake = Lake(str(tmp_path / "lake"))
    lake.ensure("activations", s)
    lake.ensure("activations", s)  # same schema: accepted
    h = lake.dataset("activations").schema.field("h").type
    assert isinstance(h.value_type, BFloat16Type) and h.list_size == 8
    lake.append("activations", acts(2, dtype="bfloat16"), s)
    assert lake.dataset("activations").count_rows() == 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("other", [dict(hidden_size=16), dict(store_dtype="float32")])
def test_ensure_refuses_a_lake_of_other_width_or_dtype(tmp_path, dtype, other):
    s = schema("activations", store_dtype=dtype, hidden_size=8)
    lake = Lake(str(tmp_path / "lake"))
    lake.ensure("activations", s)
    lake.append("activations", acts(2, dtype=dtype), s)
    with pytest.raises(UserError, match="another --lake") as err:
        lake.ensure("activations", schema("activations", **(dict(store_dtype=dtype, hidden_size=8) | other)))
    assert "activations.lance" in str(err.value) and "h:" in str(err.value)
    assert lake.dataset("activations").count_rows() == 2


def test_check_refuses_bfloat16_of_wrong_width():
    # pyarrow 26 says fixed_size_list<bfloat16>[16] .equals fixed_size_list<bfloat16>[8] (the list
    # size is ignored when the item is an extension type): check() must still see the width
    s = schema("activations", store_dtype="bfloat16", hidden_size=8)
    wide = acts(3, dtype="bfloat16", h=vectors_to_arrow(np.zeros((3, 16), np.uint16), "bfloat16"))
    with pytest.raises(UserError, match="'h'"):
        check("activations", wide, s)


def test_read_of_missing_table_is_empty(tmp_path):
    t = Lake(str(tmp_path / "none")).read("samples", ["run", "n_tokens"])
    assert t.num_rows == 0 and t.column_names == ["run", "n_tokens"]


def test_a_lake_of_an_older_schema_is_refused_by_version(tmp_path):
    """A table written under an earlier schema version gets a message that says so (not 'another width')."""
    lake = Lake(str(tmp_path / "lake"))
    old = schema("tokens").remove(schema("tokens").get_field_index("kl_ref"))
    old = old.with_metadata({b"tourray.table": b"tokens", b"tourray.schema_version": b"1"})
    lake.ensure("tokens", old)
    with pytest.raises(UserError, match=r"written by an older tourray \(schema version 1, this one writes version 2"):
        lake.ensure("tokens", schema("tokens"))


def test_model_revision_is_cheap_but_tells_weights_apart(qwen3_model, tmp_path):
    """Headers, sizes and sampled tensor bytes: a rewritten identical checkpoint keeps its revision,
    perturbed weights (same shapes) change it, and the old full hash stays available for old lakes."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from tourray.model.identity import model_revision

    rev = model_revision(str(qwen3_model), None)
    assert rev.startswith("st-sha256:") and model_revision(str(qwen3_model), None, full=True).startswith("sha256:")
    m = AutoModelForCausalLM.from_pretrained(str(qwen3_model))
    same, other = tmp_path / "same", tmp_path / "other"
    m.save_pretrained(same)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)
    m.save_pretrained(other)
    for d in (same, other):
        for f in qwen3_model.iterdir():
            if f.name.startswith("tokenizer") and not (d / f.name).exists():
                shutil.copy(f, d / f.name)
    assert model_revision(str(same), None) == rev
    assert model_revision(str(other), None) != rev
