"""`tourray qa`: every toggle of the matrix on the tiny Qwen3, judged alike; folds keep the function,
lossy toggles are measured, the report names them, and a re-run captures nothing new."""

from __future__ import annotations

import csv
import json

import pytest

from tourray.lake import tables as lk

from conftest import lake_snapshot


@pytest.fixture(scope="module")
def qa_lake(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    """One evidence run: both sites stored (plans, patches, slicing) and inline unit statistics."""
    from tourray.capture import CaptureConfig, run_capture

    root = tmp_path_factory.mktemp("qa_lake")
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir / "train"), lake=str(root), run="ev",
                              store_dtype="float32", batch_size=2, group_size=3, sites="resid_post,resid_mid",
                              stats=["moments"]), progress=False, executor="local")
    return root


def test_qa_matrix_report_and_resume(qa_lake, qwen3_model, corpus_dir, tmp_path):
    from tourray.prune.verdict import Criteria
    from tourray.qa import QAConfig, run_qa

    cfg = QAConfig.parse(dict(
        name="t", model=str(qwen3_model), lake=str(qa_lake), run="ev", eval_samples=str(corpus_dir / "eval"),
        batch_size=2, slice_widths=[96], width=[dict(keep_neurons=0.5, keep_heads=0.5)],
        depth=[dict(method="block-influence", remove=1), dict(method="block-influence", remove=1, patch="lstsq")],
        combined=[dict(method="block-influence", remove=1, patch="lstsq", target=0.55),
                  dict(method="block-influence", remove=1, target=0.45, keep_heads=0.5)], hidden_texts=2,
        teacher=str(qwen3_model),  # the original as its own teacher: KL to the teacher = KL to the original
        workdir=str(tmp_path / "work"), reports=str(tmp_path / "reports"), criteria=Criteria(seen_category="seen").model_dump()),
        source="test")
    s = run_qa(cfg, progress=False)
    by = {r["variant"]: r for r in s["variants"]}
    assert list(by) == ["base", "permuted", "rotated", "slice-96", "width-n0.5-h0.5", "depth-block-influence-r1",
                        "depth-block-influence-r1-lstsq", "combined-0.55-block-influence-r1-lstsq",
                        "combined-0.45-block-influence-r1-h0.5"]
    by["combined-0.55"], by["combined-0.45"] = by["combined-0.55-block-influence-r1-lstsq"], by["combined-0.45-block-influence-r1-h0.5"]
    kl = lambda r: r["comparison"][-1]["mean_kl"]  # noqa: E731
    assert by["base"]["comparison"][-1]["ppl_ratio"] == 1 and min(by["base"]["cos"]) == pytest.approx(1)
    for name in ("permuted", "rotated"):  # function-preserving: KL ~0, cosine 1 in the original's basis
        assert kl(by[name]) < 1e-6 and min(by[name]["cos"]) > 0.99999 and by[name]["verdict"]["passed"], name
    assert by["permuted"]["parameters"] == by["base"]["parameters"]
    assert by["rotated"]["parameters"] == by["base"]["parameters"] + 320 * 128  # the LM head, untied
    for name in ("slice-96", "width-n0.5-h0.5", "depth-block-influence-r1", "combined-0.55"):
        assert kl(by[name]) > 1e-4 and by[name]["parameter_fraction"] < 1, name
    assert by["slice-96"]["cos"][0] < 0.9999  # lossy by design
    assert len(by["depth-block-influence-r1"]["kept_blocks"]) == 2 and by["width-n0.5-h0.5"]["cos"][0] < 0.9999
    assert by["combined-0.55"]["parameter_fraction"] == pytest.approx(0.55, abs=0.02)
    assert by["combined-0.45"]["parameter_fraction"] == pytest.approx(0.45, abs=0.02)  # heads counted in the target
    for r in s["variants"]:  # the in-process KL (first 2 texts) against the teacher and against the original
        assert r["kl_teacher"] == pytest.approx(r["kl_original_inprocess"], rel=1e-9, abs=1e-12)
    assert by["rotated"]["max_logprob_diff"] < 1e-4 < by["slice-96"]["max_logprob_diff"]
    md = (tmp_path / "reports" / "qa_t.md").read_text()
    assert "preserved the function" in md and "| combined-0.55-block-influence-r1-lstsq |" in md and "Bought the most" in md
    assert "more parameters (a tied LM head is written untied)" in md  # the rotated fold grows: not "saves none"
    rows = list(csv.DictReader((tmp_path / "reports" / "qa_t.csv").open()))
    assert {r["metric"] for r in rows} >= {"kl_original", "ppl_ratio_seen", "cos_block_2", "tokens_per_s", "parameters"}
    assert json.loads((tmp_path / "reports" / "qa_t.json").read_text())["variants"][0]["variant"] == "base"

    before = lake_snapshot(qa_lake)
    again = run_qa(cfg, progress=False)  # complete eval runs are judged again, not captured again
    assert lake_snapshot(qa_lake) == before
    assert [r["verdict"] for r in again["variants"]] == [r["verdict"] for r in s["variants"]]
    # (another seed, model or lost workdir: test_stale_eval_runs_are_captured_again)


def test_qa_refuses_before_building(qa_lake, prune_lake, qwen3_model, corpus_dir, tmp_path):
    from tourray.errors import UserError
    from tourray.qa import QAConfig, run_qa

    base = dict(model=str(qwen3_model), eval_samples=str(corpus_dir / "eval"), workdir=str(tmp_path / "w"),
                reports=str(tmp_path / "r"))
    for extra, message in ((dict(lake=str(qa_lake), run="ev", slice_widths=[128]), "not below the hidden size"),
                           (dict(lake=str(qa_lake), run="nope"), "no run 'nope'"),
                           (dict(lake=str(prune_lake), run="full", width=[dict(keep_neurons=0.5)]), "--stats units")):
        before = lake_snapshot(extra["lake"])
        with pytest.raises(UserError, match=message):
            run_qa(QAConfig.parse(base | extra, source="test"), progress=False)
        assert lake_snapshot(extra["lake"]) == before and not (tmp_path / "w").exists()


def test_state_depths():
    """Which original block a variant block's output stands for (for the hidden-state cosine)."""
    from tourray.qa.job import state_depths

    assert state_depths([0, 1, 2], 3, False) == [0, 1, 2]
    assert state_depths([0, 3, 4], 5, False) == [0, 3, 4]  # blocks 1-2 removed, no patch: block 0 is block 0
    assert state_depths([0, 3, 4], 5, True) == [2, 3, 4]   # block 0's patch maps onto the end of span 1-2
    assert state_depths([0, 1, 2], 5, True) == [0, 1, 4]   # the last kept block replaces the removed tail


def test_in_process_pass_with_text_at_position_0(qwen3_model, corpus_dir, tmp_path):
    """No system prompt, no chat template: the text starts at position 0, which has no prediction; the
    log-probs start at position 1 (a crash, or a wrapped-around slice, before)."""
    from tourray.capture import CaptureConfig, run_capture
    from tourray.qa.job import Side, eval_texts

    root = tmp_path / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir / "eval"), lake=str(root), run="p0",
                              chat_template=False, layers="none"), progress=False, executor="local")
    texts = [(ids[a:], 0, e - a) for ids, a, e in eval_texts(lk.Lake(str(root)), "p0", 2)]  # drop the BOS
    assert texts and all(e > 1 for _, _, e in texts)
    side = Side(str(qwen3_model), texts, repeats=1)
    assert [len(p) for p in side.logp] == [e - 1 for _, _, e in texts]
    assert [len(h[0]) for h in side.states] == [e for _, _, e in texts]


def test_stale_eval_runs_are_captured_again(qa_lake, qwen3_model, corpus_dir, tmp_path):
    """An eval run is reused only while its identity (the checkpoint's revision, texts, settings)
    matches: another seed with the workdir cache lost (another machine, a shared lake) judged the old
    seed's complete run as the new checkpoint's. Now it is captured again; a matching one is reused."""
    from tourray.model.identity import model_revision
    from tourray.prune.verdict import Criteria
    from tourray.qa import QAConfig, run_qa

    def qa(seed, work):
        cfg = QAConfig.parse(dict(name="stale", model=str(qwen3_model), lake=str(qa_lake), run="ev",
                                  eval_samples=str(corpus_dir / "eval"), batch_size=2, rotation=False, seed=seed,
                                  hidden_texts=1, keep_checkpoints=True, workdir=str(tmp_path / work),
                                  criteria=Criteria(seen_category="seen").model_dump(),
                                  reports=str(tmp_path / "reports")), source="test")
        return {r["variant"]: r for r in run_qa(cfg, progress=False)["variants"]}

    def revision(run):
        return lk.Lake(str(qa_lake)).read("runs", ["model_revision"], filter=f"run = '{run}'").column(0)[0].as_py()

    first = qa(0, "a")
    run = first["permuted"]["run"]
    assert revision(run) == model_revision(str(tmp_path / "a" / "stale" / "permuted"), None)
    other = qa(1, "b")  # another seed, a fresh workdir: another checkpoint, so its run is captured again
    new = model_revision(str(tmp_path / "b" / "stale" / "permuted"), None)
    assert new != model_revision(str(tmp_path / "a" / "stale" / "permuted"), None)
    assert revision(run) == new and other["permuted"]["eval_run"]["model_revision"] == new
    assert other["permuted"]["comparison"] != first["permuted"]["comparison"]
    before = lake_snapshot(qa_lake)
    qa(1, "c")  # the same settings, the cache lost again: the run matches and is reused as it is
    assert lake_snapshot(qa_lake) == before


def test_leftover_depth_folder_does_not_block_a_combined_build(qa_lake, qwen3_model, tmp_path):
    """A failed earlier build left `<variant>.depth` behind: the next build replaces it ("Directory
    not empty" from the rename before)."""
    import shutil

    from tourray.qa import QAConfig
    from tourray.qa.job import Variant, _narrow
    from tourray.surgery.fold import parameters, read_layout

    out = tmp_path / "combined"
    shutil.copytree(qwen3_model, out)  # stands in for the depth-pruned checkpoint (no block removed)
    (tmp_path / "combined.depth").mkdir()
    (tmp_path / "combined.depth" / "model.safetensors").write_text("left over by a failed surgery")
    cfg = QAConfig.parse(dict(model=str(qwen3_model), lake=str(qa_lake), run="ev", workdir=str(tmp_path)), source="test")
    v = Variant("combined", "combined", dict(method="block-influence", remove=1, patch="none", target=0.9, keep_heads=1.0))
    lay = read_layout(qwen3_model)
    _narrow(cfg, v, lay, out, list(range(lay.layers)), parameters(qwen3_model))
    assert not (tmp_path / "combined.depth").exists() and 0 < v.params["keep_neurons"] < 1
    assert read_layout(out).ffn < lay.ffn
