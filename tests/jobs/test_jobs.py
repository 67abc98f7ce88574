"""Every entry script in jobs/ runs, small, as a user runs it: `python jobs/X.py --config FILE` in a
fresh process (its own embedded Ray), on the demo Qwen3 trained here in seconds, with every step of
the real job. Asserts exit 0 and each report file. (jobs/capture.py: tests/jobs/test_capture_job.py.)

The demo runs first; the sweep and QA jobs reuse its lake and model (their capture section matches,
so it resumes with nothing to do), as `python jobs/prune_sweep.py` does after `make demo`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

EVAL = ["seen_cities/sydney__fort-denison.txt", "unseen_similar/beijing__forbidden-city.txt",
        "unseen_different/barcelona__casa-batllo.txt", "edge_cases/dubai__dubai-frame.txt"]


def job_config(work: Path) -> dict:
    """jobs/configs/demo.yaml's sections at test size: the demo Qwen3 (4 blocks), 4 training texts."""
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "demo.yaml").read_text())
    samples, system = str(REPO / "samples"), str(REPO / "samples" / "system_prompt.md")
    lake, folder = str(work / "lake"), str(work / "demo-model")
    cfg.update(model="demo", model_dir=str(work / "unused"), reports=str(work / "reports"),
               demo_model=dict(samples=samples, out=folder, layers=4, hidden_size=128, kv_heads=1,
                               intermediate_size=256, vocab_size=512, seq_len=64, batch_size=8, steps=40,
                               lr=5e-3, threads=2))
    cfg["capture"].update(model=folder, samples=samples, lake=lake, system_prompt=system, run="tiny",
                          include=["train/sydney__a*", "train/rome__c*"], max_length=1024, batch_size=2, group_size=2)
    cfg["stats"].update(lake=lake, run="tiny", workers=1)
    cfg["sweep"].update(model=folder, lake=lake, run="tiny", eval_samples=str(REPO / "samples" / "eval"),
                        eval_include=EVAL, system_prompt=system, removed=[1],
                        generate_prompts=str(REPO / "jobs" / "configs" / "prompts.txt"), max_new_tokens=6)
    cfg["qa"].update(model=folder, lake=lake, run="tiny", base_run="tiny.original",
                     eval_samples=str(REPO / "samples" / "eval"), eval_include=EVAL, system_prompt=system,
                     combined=[{"method": "block-influence", "remove": 1, "patch": "lstsq", "target": 0.8}],
                     hidden_texts=2, workdir=str(work / "qa-work"))
    cfg["teacher"].update(model=folder, samples=samples, lake=lake, system_prompt=system, run="tiny.teach",
                          include=["train/sydney__a*", "train/rome__c*"], max_length=1024, logits="16")
    cfg["heal"].update(model=folder, lake=lake, run="tiny", base_run="tiny.original", teacher_run="tiny.teach",
                       eval_samples=str(REPO / "samples" / "eval"), eval_include=EVAL, system_prompt=system,
                       workdir=str(work / "heal-work"),
                       heal=dict(max_steps=2, batch_size=2, eval_every=2, warmup_steps=1, val_fraction=0.2, patience=0))
    return cfg


def run_job(script: str, cfg: dict, work: Path, name: str) -> subprocess.CompletedProcess:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--config", str(path)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, f"{script}: rc {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("jobs")
    cfg = job_config(work)
    return work, cfg, run_job("demo.py", cfg, work, "demo")


def test_demo_runs_every_step_and_writes_each_report(demo):
    work, cfg, p = demo
    out = p.stdout
    for step in ("1. model", "2. capture", "3. verify", "4. layer_similarity", "5. layer statistics",
                 "6. pruning sweep", "7. QA toggle report", "8. heal", "done"):
        assert f"== {step}" in out, out[-3000:]
    assert "all match" in out  # the verify step found no problem
    reports = work / "reports"
    for f in ("tiny_layer_similarity.png", "tiny_angular.png", "prune_tiny.md", "qa_demo.md", "qa_demo.csv",
              "qa_demo.json", "heal_demo.md"):
        assert (reports / f).is_file() and (reports / f).stat().st_size > 0, (f, sorted(os.listdir(reports)))
    assert "fold check" in out and "max |log-prob difference|" in out


def test_prune_sweep_job_reuses_the_demo_capture(demo):
    work, cfg, _ = demo
    cfg = dict(cfg, qa=None, heal=None, teacher=None)
    cfg["sweep"] = dict(cfg["sweep"], methods=["reverse"], patch=["none"], patch_methods=[], generate_prompts=None)
    p = run_job("prune_sweep.py", cfg, work, "sweep")
    assert "evidence run tiny" in p.stdout and "already committed" in p.stdout
    assert "== 3. sweep" in p.stdout and (work / "reports" / "prune_tiny.md").is_file()


def test_qa_job_reuses_the_demo_capture(demo):
    work, cfg, _ = demo
    cfg = dict(cfg, sweep=None, stats=None, heal=None, teacher=None)
    cfg["qa"] = dict(cfg["qa"], name="job", base_run=None, rotation=False, permutations=True, width=[], combined=[],
                     depth=[{"method": "block-influence", "remove": 1}])
    p = run_job("qa.py", cfg, work, "qa")
    assert "== 3. qa" in p.stdout and (work / "reports" / "qa_job.md").is_file()


def test_capture_job_help():
    """jobs/capture.py is `tourray capture` (run end to end in tests/jobs/test_capture_job.py)."""
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "capture.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--model" in p.stdout


def test_heal_job_heals_a_width_pruned_demo_model(demo, tmp_path):
    """jobs/heal.py at test size, after the demo (as a user runs it after `make demo`): its model, evidence
    and teacher runs are the demo's (resumed with nothing to do); one width-pruned variant judged, healed
    for a few steps on Ray Train and judged again; the report is written."""
    work, demo_cfg, _ = demo
    cfg = yaml.safe_load((REPO / "jobs" / "configs" / "heal.yaml").read_text())
    cfg.update(model="demo", model_dir=demo_cfg["model_dir"], demo_model=demo_cfg["demo_model"],
               reports=str(tmp_path / "reports"), capture=demo_cfg["capture"], teacher=demo_cfg["teacher"])
    cap = demo_cfg["capture"]
    cfg["study"].update(lake=cap["lake"], run="tiny", teacher_run="tiny.teach", eval_samples=str(REPO / "samples" / "eval"),
                        eval_include=EVAL, system_prompt=cap["system_prompt"], width=[{"keep_neurons": 0.75}],
                        depth=[], combined=[], workdir=str(tmp_path / "heal-work"), max_new_tokens=4,
                        generate_prompts=str(REPO / "jobs" / "configs" / "prompts.txt"),
                        heal=dict(max_steps=4, batch_size=2, eval_every=2, warmup_steps=1, learning_rate=1e-3,
                                  val_fraction=0.2))
    p = run_job("heal.py", cfg, work, "heal")
    for step in ("1. model", "2. evidence run tiny", "3. teacher run tiny.teach", "4. heal study"):
        assert f"== {step}" in p.stdout, p.stdout[-3000:]
    for run in ("evidence run tiny", "teacher run tiny.teach"):  # the demo's runs, resumed with nothing to capture
        assert re.search(rf"== \d\. {run}\b.*?(\d+) samples,? \(?\1 already committed", p.stdout), p.stdout[-3000:]
    assert "width-n0.75-h1" in p.stdout and "4 steps" in p.stdout, p.stdout[-3000:]
    report = tmp_path / "reports" / "heal_smol.md"
    assert report.is_file() and "| before |" in report.read_text() and "| after |" in report.read_text()
    assert (tmp_path / "reports" / "heal_smol_ppl_vs_params.png").is_file()
    assert (tmp_path / "heal-work" / "smol" / "width-n0.75-h1.healed" / "tourray_heal.json").is_file()


@pytest.mark.parametrize("script", ["demo.py", "prune_sweep.py", "qa.py", "heal.py"])
def test_job_help(script):
    p = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--config" in p.stdout
