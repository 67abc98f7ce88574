"""The offline demo model: deterministic for a seed, reused when cached, a standard HF checkpoint,
and better than untrained on every held-out set (at a tiny size, so the test is quick)."""

from __future__ import annotations

import json

from conftest import REPO
from tourray.model.demo import DemoModelConfig, build_demo_model


def tiny(out, **kw):
    return DemoModelConfig(samples=str(REPO / "samples"), out=str(out), layers=2, hidden_size=128, kv_heads=1,
                           intermediate_size=256, vocab_size=512, seq_len=64, batch_size=8, steps=60, lr=5e-3,
                           threads=2, **kw)


def test_deterministic_cached_and_better_than_untrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = build_demo_model(tiny(tmp_path / "a"))
    b = build_demo_model(tiny(tmp_path / "b"))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()  # same seed, same bytes
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(tiny(tmp_path / "a")) == a and (a / "model.safetensors").stat().st_mtime_ns == mtime
    c = build_demo_model(tiny(tmp_path / "a", seed=1))  # other settings: retrained in place
    assert (c / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()

    model = AutoModelForCausalLM.from_pretrained(b)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(b).is_fast
    table = json.loads((b / "tourray_demo.json").read_text())["eval_perplexity"]
    assert set(table) == {"seen_cities", "unseen_similar", "unseen_different", "edge_cases"}
    for name, r in table.items():
        assert r["trained"] < 0.5 * r["untrained"] and r["trained"] < 0.5 * r["uniform"], (name, r)


def test_job_sections_use_the_captures_storage_options(tmp_path):
    """One set of lake credentials in a job file: stats, sweep and qa read the capture's lake."""
    import yaml

    from tourray.recipes import DemoConfig

    job = yaml.safe_load((REPO / "jobs" / "configs" / "demo.yaml").read_text())
    job["capture"]["storage_options"] = {"aws_region": "eu-west-1"}
    job["qa"]["storage_options"] = {"aws_region": "us-east-1"}  # its own wins
    cfg = DemoConfig.model_validate(job)
    assert cfg.stats.storage_options == cfg.sweep.storage_options == {"aws_region": "eu-west-1"}
    assert cfg.qa.storage_options == {"aws_region": "us-east-1"}
    assert "storage_options" not in cfg.model_dump()["stats"]
