"""Planning a capture: the run's identity (texts as `run_texts` rows, categories, runtime, library
versions), what the driver pins for its actors (hub commit, prompt text, tokenizer), and a start
whose cost is what the last capture wrote, not the whole run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from tourray.lake import tables as lk
from tourray.lake import runs as manifest
from tourray.capture import CaptureConfig, run_capture
from tourray.capture.driver import NamedCaptureStage, _stage_kwargs
from tourray.capture.plan import plan_capture, prepare_lake
from tourray.errors import UserError

OPTS = dict(run="r", batch_size=2, group_size=2, store_dtype="float32", layers="0,2")


def _cfg(model, samples, lake, **kw) -> CaptureConfig:
    return CaptureConfig(model=str(model), samples=str(samples), lake=str(lake), **dict(OPTS, **kw))


def _capture(cfg) -> dict:
    return run_capture(cfg, progress=False, executor="local")


def test_texts_are_run_texts_rows_and_the_manifest_stays_small(qwen3_model, fresh_corpus, tmp_path):
    lake = tmp_path / "lake"
    _capture(_cfg(qwen3_model, fresh_corpus, lake))
    rows = lk.Lake(str(lake)).read("run_texts").to_pylist()
    want = {p.relative_to(fresh_corpus).as_posix() for p in fresh_corpus.rglob("*.txt")}
    assert {r["source"] for r in rows} == want and len(rows) == len(want)
    assert {r["category"] for r in rows} == {"train", "eval"}
    m = manifest.read_manifest(lk.Lake(str(lake)), "r")
    assert "samples" not in m and m["n_texts"] == len(want)  # no JSON cell listing every text
    assert m["texts_sha256"] == manifest.snapshot_hash({r["source"]: r["sha256"] for r in rows})


def test_a_recategorised_text_is_a_change_of_run(qwen3_model, fresh_corpus, tmp_path):
    lake = tmp_path / "lake"
    _capture(_cfg(qwen3_model, fresh_corpus, lake))
    (fresh_corpus / "index.tsv").write_text("path\tsplit\tcategory\tcity\tlanguage\tsha256\n"
                                            "train/xian__bell-tower.txt\ttrain\ttowers\txian\ten\t\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"texts recategorised: 1 \(train/xian__bell-tower.txt\)"):
        plan_capture(_cfg(qwen3_model, fresh_corpus, lake))


def test_runtime_and_versions_are_identity(qwen3_model, fresh_corpus, tmp_path, monkeypatch):
    lake = tmp_path / "lake"
    _capture(_cfg(qwen3_model, fresh_corpus, lake))
    with pytest.raises(UserError, match="attn_implementation: None in the lake, 'eager' now"):
        plan_capture(_cfg(qwen3_model, fresh_corpus, lake, hf={"attn_implementation": "eager"}))
    with pytest.raises(UserError, match="device: 'cpu' in the lake, 'cuda' now"):
        plan_capture(_cfg(qwen3_model, fresh_corpus, lake, gpus_per_actor=1))
    real = manifest.capture_versions()
    monkeypatch.setattr(manifest, "capture_versions", lambda: dict(real, torch="9.9.9"))
    with pytest.raises(UserError, match=re.escape(f"torch version: {real['torch']} in the lake, 9.9.9 now (--allow-version-change")):
        plan_capture(_cfg(qwen3_model, fresh_corpus, lake))
    # allowed: the resumed capture records its own versions, and the next resume compares with those
    _capture(_cfg(qwen3_model, fresh_corpus, lake, allow_version_change=True))
    captures = manifest.read_manifest(lk.Lake(str(lake)), "r")["captures"]
    assert [c["versions"]["torch"] for c in captures] == [real["torch"], "9.9.9"]
    plan_capture(_cfg(qwen3_model, fresh_corpus, lake))  # 9.9.9 now and last time: no change


def test_a_start_reads_only_what_was_committed_since_the_run_was_clean(qwen3_model, fresh_corpus, tmp_path, monkeypatch):
    lake_dir = tmp_path / "lake"
    cfg = _cfg(qwen3_model, fresh_corpus, lake_dir)
    _capture(cfg)
    lake = lk.Lake(str(lake_dir))
    marks = manifest.read_manifest(lake, "r")["clean_fragments"]
    assert marks["tokens"] == lake.last_fragment("tokens") >= 2  # three groups of two texts
    rows_read = []
    real_read = lk.Lake.read

    def spy(self, table, columns=None, filter=None, after_fragment=None):
        out = real_read(self, table, columns, filter, after_fragment)
        if table in ("tokens", "blocks"):
            rows_read.append((table, after_fragment, out.num_rows))
        return out

    monkeypatch.setattr(lk.Lake, "read", spy)
    plan = plan_capture(cfg)
    assert prepare_lake(plan) == {s.sample_id for s in plan.samples}
    assert rows_read and all(n == 0 and after is not None for _, after, n in rows_read), rows_read

    # a killed capture's rows after the marks: an orphan sample's tokens, committed but no samples row
    tok = lake.read("tokens", filter="sample_id = " + lk.sql_quote(plan.samples[0].sample_id))
    orphan = tok.set_column(tok.schema.get_field_index("sample_id"), "sample_id", pa.array(["0" * 16] * tok.num_rows))
    lake.append("tokens", orphan, lk.schema("tokens"))
    rows_read.clear()
    prepare_lake(plan_capture(cfg))
    assert ("tokens", marks["tokens"], tok.num_rows) in rows_read  # only the new fragment was read
    assert lake.read("tokens", filter="sample_id = '0000000000000000'").num_rows == 0  # and it was removed
    assert manifest.read_manifest(lake, "r")["clean_fragments"]["tokens"] > marks["tokens"]


def _fake_hub(cache: Path, model: Path, commit: str) -> None:
    """A hub cache entry for `tourray-test/tiny` at `commit` (what snapshot_download leaves)."""
    repo = cache / "models--tourray-test--tiny"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_the_driver_pins_the_hub_commit_prompt_and_tokenizer_for_its_actors(qwen3_model, llama_model, fresh_corpus,
                                                                           tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    a, b = "a" * 40, "b" * 40
    _fake_hub(cache, qwen3_model, a)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("transformers.utils.hub.TRANSFORMERS_CACHE", str(cache), raising=False)
    prompt = tmp_path / "system.txt"
    prompt.write_text("You are a tour guide.", encoding="utf-8")
    cfg = CaptureConfig(model="tourray-test/tiny", samples=str(fresh_corpus), lake=str(tmp_path / "lake"),
                        system_prompt=str(prompt), **OPTS)
    plan = plan_capture(cfg)
    assert plan.info.model_revision == a and plan.actor_cfg.revision == a and plan.cfg.revision is None
    ref = plan_capture(_cfg(qwen3_model, fresh_corpus, tmp_path / "lake2", reference="tourray-test/tiny"))
    assert ref.actor_cfg.reference_revision == a and json.loads(ref.run_row["manifest"])["reference_revision"] == a
    # main moves to another model and the prompt file is gone (as on a node that never had it)
    _fake_hub(cache, llama_model, b)
    prompt.unlink()
    stage = NamedCaptureStage(**_stage_kwargs(plan))
    assert stage.engine.model.config.model_type == "qwen3"  # commit a, not main
    assert stage.fmt.system_prompt == "You are a tour guide." and stage.tok is plan.tokenizer
    assert _stage_kwargs(plan)["cfg"].revision == a


def test_a_local_checkpoint_is_not_pinned(qwen3_model, corpus_dir, tmp_path):
    plan = plan_capture(_cfg(qwen3_model, corpus_dir, tmp_path / "lake"))
    assert plan.actor_cfg.revision is None and plan.info.model_revision.startswith("st-sha256:")
    assert json.loads(plan.run_row["manifest"])["runtime"] == {"device": "cpu", "attn_implementation": None}
