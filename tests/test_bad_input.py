"""Bad input, tried as a user would: every case runs the real `tourray` command against a lake that
holds a run, and must print exactly one `error:` line naming what is wrong, exit 2, print no traceback,
and leave every table's row count and version as it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TEXTS, free_port, lake_snapshot, write_corpus

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def world(qwen3_model, tmp_path_factory):
    """A lake with run "base" (captured in this process: the cases are the commands), its texts, and
    files the cases point at."""
    from tourray.capture import CaptureConfig, run_capture

    root = tmp_path_factory.mktemp("bad")
    samples = write_corpus(root / "samples", dict(list(TEXTS.items())[:3]))
    lake = root / "lake"
    run_capture(CaptureConfig(model=str(qwen3_model), samples=str(samples), lake=str(lake), run="base",
                              layers="embed,0", group_size=2), progress=False, executor="local")
    files = {
        "broken.yaml": "run: [unclosed\n",
        "list.yaml": "- a\n- b\n",
        "unknown_key.yaml": "run: x\nbogus_key: 1\n",
        "twice.yaml": "run: x\nrun: y\n",
        "wrong_type.yaml": "run: x\nbatch_size: many\n",
        "other_prompt.md": "You are someone else.\n",
        "spec.json": "{not json",
        "not_eager.yaml": "engine: vllm\nvllm:\n  enforce_eager: false\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    changed = root / "changed"
    shutil.copytree(samples, changed)
    first = sorted(changed.rglob("*.txt"))[0]
    first.write_text(first.read_text() + "One more sentence.\n")
    return dict(root=root, lake=lake, model=qwen3_model, samples=samples, changed=changed)


def run(argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tourray.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env or ENV, cwd=REPO, timeout=timeout)


def capture(w, *extra):
    return ["capture", "--model", w["model"], "--samples", w["samples"], "--lake", w["lake"], "--run", "x",
            "--no-progress", *extra]


def s3_env(endpoint: str, credentials: bool = True) -> dict:
    env = {k: v for k, v in ENV.items() if not k.startswith("AWS_")}
    env |= dict(AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT=endpoint, AWS_ALLOW_HTTP="true", AWS_REGION="us-east-1",
                AWS_EC2_METADATA_DISABLED="true")
    if credentials:
        env |= dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    return env


# case -> (argv builder, words the error must contain[, environment builder])
CASES = {
    # config files
    "broken YAML": (lambda w: capture(w, "--config", w["root"] / "broken.yaml"), ["broken.yaml", "line 2"]),
    "YAML not a mapping": (lambda w: capture(w, "--config", w["root"] / "list.yaml"), ["list.yaml", "mapping"]),
    "unknown YAML key": (lambda w: capture(w, "--config", w["root"] / "unknown_key.yaml"), ["bogus_key"]),
    "YAML key twice": (lambda w: capture(w, "--config", w["root"] / "twice.yaml"), ["twice.yaml", "appears twice"]),
    "YAML wrong type": (lambda w: capture(w, "--config", w["root"] / "wrong_type.yaml"), ["batch_size"]),
    "missing config file": (lambda w: capture(w, "--config", w["root"] / "nope.yaml"), ["nope.yaml"]),
    # wrong types and values in flags
    "batch size not a number": (lambda w: capture(w, "--batch-size", "abc"), ["--batch-size"]),
    "max length 1": (lambda w: capture(w, "--max-length", "1"), ["--max-length"]),
    "zero actors": (lambda w: capture(w, "--actors", "0"), ["--actors"]),
    "negative GPUs": (lambda w: capture(w, "--gpus-per-actor", "-1"), ["--gpus-per-actor"]),
    "zero CPUs per actor": (lambda w: capture(w, "--cpus-per-actor", "0"), ["--cpus-per-actor"]),
    "zero threads": (lambda w: capture(w, "--threads", "0"), ["--threads"]),
    "unknown stats": (lambda w: capture(w, "--stats", "bogus"), ["--stats"]),
    "unknown site": (lambda w: capture(w, "--sites", "resid_pre"), ["--sites"]),
    "garbage layers": (lambda w: capture(w, "--layers", "x-y"), ["--layers", "x-y"]),
    "store outside hooked": (lambda w: capture(w, "--layers", "0", "--store", "1"), ["--store", "not hooked"]),
    "unknown text role": (lambda w: capture(w, "--text-role", "narrator"), ["--text-role"]),
    "bad run name": (lambda w: capture(w, "--run", "bad name!"), ["--run"]),
    "unknown engine": (lambda w: capture(w, "--engine", "tensorrt"), ["--engine", "tensorrt"]),
    "unknown model dtype": (lambda w: capture(w, "--model-dtype", "float8"), ["--model-dtype", "float8"]),
    "engine sub-config out of range": (lambda w: capture(w, "--vllm-gpu-memory-utilization", "2"),
                                       ["--vllm-gpu-memory-utilization"]),
    # module hooks do not fire under vLLM's compiled / CUDA-graph forwards: refused, not accepted
    "vllm without eager mode": (lambda w: capture(w, "--engine", "vllm", "--no-vllm-enforce-eager"),
                                ["--vllm-enforce-eager", "must be true", "hooks"]),
    "vllm without eager mode (YAML)": (lambda w: capture(w, "--config", w["root"] / "not_eager.yaml"),
                                       ["vllm.enforce_eager", "must be true"]),
    "missing system prompt file": (lambda w: capture(w, "--system-prompt", w["root"] / "nope.md"), ["nope.md"]),
    "missing reference": (lambda w: capture(w, "--reference", w["root"] / "no-ref"), ["--reference"]),
    "include matches nothing": (lambda w: capture(w, "--include", "nothing/*"), ["--include", "nothing/*"]),
    "malformed --logits": (lambda w: capture(w, "--logits", "top:5"), ["--logits", "sample:N"]),
    "--logits beyond the vocabulary": (lambda w: capture(w, "--logits", "100000"), ["--logits", "vocabulary"]),
    # run identity: a resumed run must see the same inputs
    "changed texts": (lambda w: capture(w, "--run", "base", "--layers", "embed,0", "--samples", w["changed"]),
                      ["run 'base' already exists"]),
    "changed system prompt": (lambda w: capture(w, "--run", "base", "--layers", "embed,0", "--system-prompt",
                                                w["root"] / "other_prompt.md"), ["run 'base' already exists"]),
    "schema drift (store dtype)": (lambda w: capture(w, "--store-dtype", "float32"), ["activations"]),
    # lake URIs and object stores
    "unsupported URI scheme": (lambda w: capture(w, "--lake", "ftp://host/lake"), ["ftp://host/lake"]),
    "unreachable object store": (lambda w: capture(w, "--lake", "s3://bucket/lake"), ["s3://bucket/lake"],
                                 lambda: s3_env(f"http://127.0.0.1:{free_port()}")),
    "missing credentials": (lambda w: capture(w, "--lake", "s3://bucket/lake"), ["s3://bucket/lake"],
                            lambda: s3_env(f"http://127.0.0.1:{free_port()}", credentials=False)),
    # the other commands
    "sql unknown table": (lambda w: ["sql", "--lake", w["lake"], "SELECT * FROM no_such_table"], ["no_such_table"]),
    "sql unknown query": (lambda w: ["sql", "--lake", w["lake"], "--query", "no_such_query"], ["no_such_query"]),
    "sql missing param": (lambda w: ["sql", "--lake", w["lake"], "--query", "layer_similarity"], ["--param"]),
    "stats unknown run": (lambda w: ["stats", "--lake", w["lake"], "--run", "nope", "--no-progress"], ["nope"]),
    "verify unknown run": (lambda w: ["verify", "--lake", w["lake"], "--run", "nope", "--no-progress"], ["nope"]),
    "runs unknown run": (lambda w: ["runs", "--lake", w["lake"], "--run", "nope"], ["nope"]),
    "solve unknown layer": (lambda w: ["solve", "pca", "--lake", w["lake"], "--from", "base:7", "--no-progress"],
                            ["--from", "layer 7", "out of range"]),
    "prune plan unknown method": (lambda w: ["prune", "plan", "--lake", w["lake"], "--run", "base", "--method",
                                             "bogus", "--remove", "1"], ["--method", "bogus"]),
    "fold malformed spec": (lambda w: ["fold", "--model", w["model"], "--spec", w["root"] / "spec.json", "--out",
                                       w["root"] / "folded"], ["spec.json"]),
    "verify not a lake": (lambda w: ["verify", "--lake", w["root"] / "empty-lake", "--no-progress"], ["--lake"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(world, case):
    build, words, *env = CASES[case]
    before = lake_snapshot(world["lake"])
    assert before
    p = run(build(world), env=env[0]() if env else None)
    assert p.returncode == 2, (p.returncode, p.stdout[-1000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1, p.stderr[-3000:]
    shown = p.stderr[p.stderr.index(errors[0]):]  # the error and any lines it lists
    for w in words:
        assert str(w) in shown, (w, p.stderr[-3000:])
    assert lake_snapshot(world["lake"]) == before
    assert not Path(world["root"] / "folded").exists()


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
