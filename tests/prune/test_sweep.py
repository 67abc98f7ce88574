"""`prune sweep`: variants as Ray tasks, two at once, the report, and a re-run that reuses them."""

from __future__ import annotations

import json

from transformers import AutoConfig

from conftest import lake_snapshot
from tourray.lake.tables import Lake


def test_sweep_two_tasks_at_once_and_resume(prune_lake, qwen3_model, corpus_dir, tmp_path, ray_session):
    from tourray.prune.sweep import SweepConfig, run_sweep
    from tourray.prune.verdict import Criteria

    cfg = SweepConfig(model=str(qwen3_model), lake=str(prune_lake), run="full", eval_samples=str(corpus_dir / "eval"),
                      methods=["block-influence", "reverse", "random"], removed=[1], patch=["none", "lstsq"], seeds=2,
                      workers=2, cpus_per_task=0.5, workdir=str(tmp_path / "work"), reports=str(tmp_path / "reports"),
                      criteria=Criteria(seen_category="seen"), batch_size=2)
    s = run_sweep(cfg, progress=False)
    names = [v["variant"] for v in s["variants"]]
    assert names == ["block-influence-r1", "block-influence-r1-lstsq", "reverse-r1", "reverse-r1-lstsq",
                     "random-r1-s0", "random-r1-s1"]
    lk = Lake(str(prune_lake))
    for v in s["variants"]:
        assert lk.read("samples", ["sample_id"], filter=f"run = '{v['run']}'").num_rows == 2  # both eval texts
        seen = next(c for c in v["comparison"] if c["category"] == "seen")
        assert seen["ppl_ratio"] > 0 and seen["mean_kl"] > 0 and isinstance(v["verdict"]["passed"], bool)
        # the KL reference is the original's stored distribution (the whole tiny vocabulary: exact), not a second model
        conf = json.loads(lk.read("runs", ["manifest"], filter=f"run = '{v['run']}'").column(0)[0].as_py())["config"]
        assert conf["reference_run"] == "full.original" and conf["reference"] is None
    base = json.loads(lk.read("runs", ["manifest"], filter="run = 'full.original'").column(0)[0].as_py())["config"]
    assert base["logits"] == str(AutoConfig.from_pretrained(qwen3_model).vocab_size)  # min(kl_top_k, vocab)
    assert not any((tmp_path / "work" / "full" / n).exists() for n in names)  # checkpoints deleted
    md = (tmp_path / "reports" / "prune_full.md").read_text()
    assert "Predicted cliff" in md and "| reverse-r1-lstsq |" in md and "Which method won" in md
    assert (tmp_path / "reports" / "prune_full_ppl_ratio.png").stat().st_size > 0
    before = lake_snapshot(prune_lake)
    again = run_sweep(cfg, progress=False)  # complete variants are judged again from the lake, not recomputed
    after = lake_snapshot(prune_lake)
    assert after.pop("runs.lance")[0] == before.pop("runs.lance")[0]  # the baseline's re-run only logs its summary
    assert after == before
    assert [v["verdict"] for v in again["variants"]] == [v["verdict"] for v in s["variants"]]
