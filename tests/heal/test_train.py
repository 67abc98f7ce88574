"""`tourray heal` end to end on the tiny Qwen3 (CPU, one Ray Train worker): a killed heal re-run with the
same --out ends with the same weights as an uninterrupted one, and heal_log holds each step once; LoRA
is merged into a standard checkpoint; soups average members of one shape and refuse others, naming the
tensor; bad inputs give one `error:` line, exit 2, and write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, lake_snapshot, one_error
from tourray.lake.tables import Lake

pytestmark = pytest.mark.slow
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
ENV.pop("RAY_ADDRESS", None)


def _save_variant(src: Path, out: Path, seed: int, scale: float = 0.05, **config_changes) -> Path:
    """A student sharing the teacher's tokenizer: its weights perturbed (or a model of another shape)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    if config_changes:
        cfg = Qwen3Config.from_pretrained(src)
        for k, v in config_changes.items():
            setattr(cfg, k, v)
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    from tourray.capture import CaptureConfig, run_capture

    root = tmp_path_factory.mktemp("heal")
    lake = root / "lake"
    common = dict(model=str(qwen3_model), samples=str(corpus_dir), lake=str(lake), layers="none", batch_size=2, group_size=2)
    run_capture(CaptureConfig(run="teach", include=["train/*"], logits="32", **common), progress=False, executor="local")
    run_capture(CaptureConfig(run="bare", include=["train/*"], **common), progress=False, executor="local")
    run_capture(CaptureConfig(run="witheval", logits="8", **common), progress=False, executor="local")
    student = _save_variant(qwen3_model, root / "student", seed=5)
    return dict(root=root, lake=lake, teacher=qwen3_model, student=student, corpus=corpus_dir)


def heal_cfg(w, out, **kw):
    from tourray.heal.config import HealConfig

    base = dict(student=str(w["student"]), teacher_run=f"{w['lake']}:teach", out=str(out), max_steps=10, batch_size=2,
                eval_every=4, val_fraction=0.3, learning_rate=1e-3, warmup_steps=2, patience=0,
                eval_samples=str(w["corpus"] / "eval"))
    return HealConfig(**(base | kw))


def weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted heal of 10 steps on one worker, from a relative --student (Ray Train's workers run
    elsewhere): the kill test's reference weights and the DDP test's one-worker held-out KL."""
    from tourray.heal.train import run_heal

    out = tmp_path_factory.mktemp("ref") / "ref"
    before = set(Path(tempfile.gettempdir()).glob("heal-*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(world["root"])
        ref = run_heal(heal_cfg(world, out, run="ref", student="student"), progress=False)
    return dict(ref, out=out, temp_before=before, temp_after=set(Path(tempfile.gettempdir()).glob("heal-*")))


def test_kill_and_resume_ends_with_the_uninterrupted_weights(world, reference, tmp_path):
    from tourray.heal.train import run_heal

    ref = reference
    assert ref["steps"] == 10 and not ref["already_done"]
    # each checkpoint is written to a temporary folder that Ray Train copies; none may stay behind (a CI
    # machine once filled its disk with them)
    assert ref["temp_after"] <= ref["temp_before"]
    cfg = heal_cfg(world, tmp_path / "killed", run="killed")
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "_kill_heal.py"), cfg.model_dump_json()],
                       env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert p.returncode == -9, (p.returncode, p.stderr[-3000:])
    assert list((tmp_path / "killed" / ".heal" / "ray").glob("checkpoint_*")), "killed before its first checkpoint"
    assert not (tmp_path / "killed" / "tourray_heal.json").exists()
    logged = Lake(str(world["lake"])).read("heal_log", ["step"], filter="run = 'killed'").column(0).to_pylist()
    assert logged and max(logged) < 10  # killed mid-run
    out = run_heal(cfg, progress=False)
    assert out["steps"] == 10 and out["tokens"] == ref["tokens"]
    a, b = weights(ref["out"]), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, float((a[k] - b[k]).abs().max()))
    steps = sorted(Lake(str(world["lake"])).read("heal_log", ["step"], filter="run = 'killed'").column(0).to_pylist())
    assert steps == list(range(11))  # step 0 (the student as it came) .. 10, each once
    assert not (tmp_path / "killed" / ".heal" / "ray").exists()  # checkpoints removed after success
    rec = json.loads((tmp_path / "killed" / "tourray_heal.json").read_text())
    assert rec["teacher"]["run"] == "teach" and rec["steps"] == 10 and rec["lake_versions"]["logits"] >= 1
    again = run_heal(cfg, progress=False)  # a finished heal: nothing to do
    assert again["already_done"]


def test_lora_is_merged_and_soups_average_one_shape(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from tourray.errors import UserError
    from tourray.heal.config import SoupConfig
    from tourray.heal.soup import run_soup
    from tourray.heal.train import run_heal

    s = run_heal(heal_cfg(world, tmp_path / "lora", run="lora", lora_rank=4, max_steps=3, eval_every=3), progress=False)
    assert s["lora_merged"] and s["steps"] == 3
    w, w0 = weights(tmp_path / "lora"), weights(world["student"])
    assert w.keys() == w0.keys() and not any("lora" in k for k in w)  # a plain checkpoint
    assert any(not torch.equal(w[k], w0[k]) for k in w)
    AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    other = _save_variant(world["student"], tmp_path / "other", seed=9, scale=0.01)
    run_soup(SoupConfig(models=[str(world["student"]), str(other)], out=str(tmp_path / "soup")))
    ws, wo = weights(tmp_path / "soup"), weights(other)
    for k in ws:
        torch.testing.assert_close(ws[k], ((w0[k].double() + wo[k].double()) / 2).float(), rtol=0, atol=1e-7)
    greedy = run_soup(SoupConfig(models=[str(world["student"]), str(tmp_path / "lora"), str(other)],
                                 out=str(tmp_path / "greedy"), greedy=True, teacher_run=f"{world['lake']}:teach",
                                 val_fraction=0.3))
    assert greedy["members"][0] == min(greedy["held_out_kl"], key=greedy["held_out_kl"].get)
    assert greedy["soup_held_out_kl"] <= min(greedy["held_out_kl"].values()) + 1e-9
    narrow = _save_variant(world["teacher"], tmp_path / "narrow", seed=1, intermediate_size=128)
    with pytest.raises(UserError, match=r"mlp\.down_proj\.weight"):
        run_soup(SoupConfig(models=[str(world["student"]), str(narrow)], out=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def cli(argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "tourray.cli", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


def heal_args(w, out, *extra, student=None, run="teach"):
    return ["heal", "--student", student or w["student"], "--teacher-run", f"{w['lake']}:{run}", "--out", out,
            "--val-fraction", "0.3", "--eval-samples", w["corpus"] / "eval", "--no-progress", *extra]


CASES = {
    "tokenizer differs": (lambda w, o: heal_args(w, o, student=w["other_tok"]), ["--student", "tokenizer"]),
    "teacher without --logits": (lambda w, o: heal_args(w, o, run="bare"), ["bare", "--logits"]),
    "eval texts in the teacher run": (lambda w, o: heal_args(w, o, run="witheval"), ["eval texts", "sha256"]),
    "student not a checkpoint": (lambda w, o: heal_args(w, o, student=w["root"]), ["--student", "not a checkpoint"]),
    "changed config on resume": (lambda w, o: heal_args(w, w["started"], "--learning-rate", "0.5"),
                                 ["learning_rate", "--allow-config-change"]),
    "alpha above 1": (lambda w, o: heal_args(w, o, "--alpha", "1.5"), ["--alpha"]),
    "zero steps": (lambda w, o: heal_args(w, o, "--max-steps", "0"), ["--max-steps"]),
    "negative learning rate": (lambda w, o: heal_args(w, o, "--learning-rate", "-1e-4"), ["--learning-rate"]),
    "unknown teacher run": (lambda w, o: heal_args(w, o, run="nope"), ["nope"]),
    "sampled support at temperature 2": (lambda w, o: heal_args(w, o, "--temperature", "2", run="sampled"),
                                         ["--temperature", "sample:"]),
    "soup of one model": (lambda w, o: ["soup", "--models", w["student"], "--out", o], ["--models"]),
}


@pytest.fixture(scope="module")
def bad_world(world, tmp_path_factory):
    from tourray.capture import CaptureConfig, run_capture
    from tourray.model.demo import train_tokenizer
    from conftest import TEXTS

    w = dict(world)
    run_capture(CaptureConfig(model=str(w["teacher"]), samples=str(w["corpus"]), lake=str(w["lake"]), run="sampled",
                              include=["train/*"], logits="sample:4", layers="none", batch_size=2, group_size=2),
                progress=False, executor="local")
    other = tmp_path_factory.mktemp("othertok")
    _save_variant(w["student"], other, seed=2)
    train_tokenizer(list(TEXTS.values()) * 8, 300).save_pretrained(other)
    w["other_tok"] = other
    started = tmp_path_factory.mktemp("started")  # what a first start of a heal leaves before its checkpoints
    (started / ".heal").mkdir()
    from tourray.heal.config import HealConfig

    first = HealConfig(student=str(w["student"]), teacher_run=f"{w['lake']}:teach", out=str(started), val_fraction=0.3,
                       eval_samples=str(w["corpus"] / "eval"))
    (started / ".heal" / "config.json").write_text(json.dumps(first.identity()))
    w["started"] = started
    return w


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_and_writes_nothing(bad_world, case, tmp_path):
    build, words = CASES[case]
    out = tmp_path / "out"
    before = lake_snapshot(bad_world["lake"])
    started = sorted(p.name for p in bad_world["started"].rglob("*"))
    p = cli(build(bad_world, out))
    one_error(p, *words)
    assert not out.exists()
    assert lake_snapshot(bad_world["lake"]) == before
    assert sorted(p.name for p in bad_world["started"].rglob("*")) == started


def test_two_workers_train_with_ddp_and_validate_on_the_whole_held_out_slice(world, reference, tmp_path):
    """Two CPU workers (DDP over gloo, half a CPU each so Ray Data keeps a core): each step trains on
    both workers' texts, and the held-out KL before training equals one worker's (every worker reads the
    whole held-out slice; an equal split of a one-text slice would leave both with nothing)."""
    from tourray.heal.train import run_heal

    one = reference  # the same student and held-out slice on one worker
    two = run_heal(heal_cfg(world, tmp_path / "two", run="two", max_steps=2, eval_every=1, workers=2,
                            cpus_per_worker=0.5), progress=False)
    assert two["val_kl_before"] > 0 and abs(two["val_kl_before"] - one["val_kl_before"]) < 1e-6
    log = Lake(str(world["lake"])).read("heal_log", filter="run = 'two'").sort_by("step").to_pylist()
    assert [r["step"] for r in log] == [0, 1, 2] and all(r["val_kl"] > 0 for r in log)
    # two workers' texts per step: more tokens in its first step than one worker's first step
    first = Lake(str(world["lake"])).read("heal_log", ["run", "tokens"], filter="step = 1 AND run IN ('ref', 'two')")
    first = dict(zip(*first.to_pydict().values()))
    assert two["steps"] == 2 and first["two"] > first["ref"], first


def test_without_the_state_api_the_trainer_leaves_out_the_placement_group_cleaner(ray_session, monkeypatch):
    """Ray's PlacementGroupCleaner asks the state API, which a Ray without a dashboard lacks (this test
    process's embedded one), and stalled each heal 12 s at its end: it is left out there and kept where a
    dashboard runs; the result poll is 0.1 s unless set."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from tourray.heal import train
    from tourray.runtime import has_state_api

    def cleaner(state_api: bool) -> bool:
        t = train._trainer_class(state_api)(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return any(isinstance(c, PlacementGroupCleanerCallback) for c in t._create_default_callbacks())

    assert not has_state_api()
    monkeypatch.delenv(train.POLL_ENV, raising=False)
    assert not cleaner(False) and cleaner(True)
    assert os.environ[train.POLL_ENV] == train.POLL_S
    monkeypatch.setenv(train.POLL_ENV, "5")
    cleaner(False)
    assert os.environ[train.POLL_ENV] == "5"  # a user's setting is kept
