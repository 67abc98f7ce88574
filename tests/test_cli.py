"""The `tourray` command as a user runs it: help, refusals (exit 2, one `error:`, lake unchanged),
truncation and --skip-invalid captures, and a light `import tourray`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, TEXTS, lake_snapshot, write_corpus
from tourray.lake.tables import Lake

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
MAX_LENGTH = 12
SHORT = {"train/short.txt": "Hi.\n"}  # fits in MAX_LENGTH tokens; every TEXTS entry does not


def tourray(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tourray.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


def error_lines(p):
    return [x for x in p.stderr.splitlines() if "error:" in x]


@pytest.fixture(scope="module")
def base(qwen3_model, tmp_path_factory):
    """One successful CLI capture (run "base"), with every text but one past --max-length."""
    root = tmp_path_factory.mktemp("cli")
    samples = write_corpus(root / "samples", TEXTS | SHORT)
    lake = root / "lake"
    p = tourray("capture", "--model", qwen3_model, "--samples", samples, "--lake", lake, "--run", "base",
                "--layers", "embed,0", "--group-size", 2, "--max-length", MAX_LENGTH, "--no-progress")
    assert p.returncode == 0, p.stderr
    return dict(root=root, lake=lake, model=qwen3_model, proc=p)


def test_long_texts_are_truncated_and_flagged(base):
    lake = Lake(str(base["lake"]))
    samples = {r["source"]: r for r in lake.read("samples").to_pylist()}
    assert len(samples) == len(TEXTS) + 1
    short = samples.pop("train/short.txt")
    assert not short["truncated"] and short["n_tokens"] < MAX_LENGTH
    assert all(r["truncated"] and r["n_tokens"] == MAX_LENGTH for r in samples.values())
    for s in [short, *samples.values()]:
        n = s["n_tokens"]
        assert lake.dataset("tokens").count_rows(filter=f"sample_id = '{s['sample_id']}'") == n
        assert lake.dataset("activations").count_rows(filter=f"sample_id = '{s['sample_id']}'") == 2 * n
    p = base["proc"]
    warned = [x for x in p.stderr.splitlines() if "truncated" in x]
    assert len(warned) == len(TEXTS) and all(f"--max-length {MAX_LENGTH}" in x for x in warned)
    assert f"{len(TEXTS)} sample(s) truncated at --max-length {MAX_LENGTH}" in p.stdout
    # the actor pool's bounded restarts make Ray warn twice (see tourray.runtime.init_ray): neither shows
    assert "has constructor arguments in the object store" not in p.stderr and "ray_remote_args" not in p.stderr
    assert "Progress bars disabled" not in p.stderr and "execution finished" not in p.stderr  # Ray Data's notices


def refusal_cases(root, model):
    bad = {}
    for name, data in (("empty", b""), ("blank", b" \n\t \n"), ("latin1", "caf\xe9\n".encode("latin-1"))):
        d = write_corpus(root / name, {"train/ok.txt": "A good text.\n"})
        (d / f"train/{name}.txt").write_bytes(data)
        bad[name] = d
    (root / "no-texts").mkdir()
    (root / "no-texts/readme.md").write_text("no .txt here")
    good = write_corpus(root / "good", {"train/ok.txt": "A good text.\n"})
    missing_model = root / "no-such-model"
    return {
        # case: (extra capture args, strings the error must contain)
        "missing samples": (["--samples", root / "nope"], ["--samples", str(root / "nope"), "does not exist"]),
        "no .txt": (["--samples", root / "no-texts"], ["--samples", "no .txt files", str(root / "no-texts")]),
        "empty .txt": (["--samples", bad["empty"]], ["empty.txt: empty", "--skip-invalid"]),
        "whitespace .txt": (["--samples", bad["blank"]], ["blank.txt: whitespace only"]),
        "non-UTF-8 .txt": (["--samples", bad["latin1"]], ["latin1.txt: not UTF-8"]),
        "unknown model": (["--samples", good, "--model", missing_model], ["--model", str(missing_model)]),
        "layers out of range": (["--samples", good, "--layers", "0-7"], ["--layers", "'0-7'", "out of range"]),
        "unknown flag": (["--samples", good, "--bogus-flag", "1"], ["unrecognized arguments: --bogus-flag"]),
        "bad store dtype": (["--samples", good, "--store-dtype", "int8"], ["--store-dtype", "int8"]),
        "bad group size": (["--samples", good, "--group-size", "0"], ["group-size", "greater than 0"]),
    }


CASES = ["missing samples", "no .txt", "empty .txt", "whitespace .txt", "non-UTF-8 .txt", "unknown model",
         "layers out of range", "unknown flag", "bad store dtype", "bad group size"]


@pytest.mark.parametrize("case", CASES)
def test_refusals_exit_2_with_one_error_and_leave_the_lake_alone(base, case, tmp_path):
    args, words = refusal_cases(tmp_path, base["model"])[case]
    before = lake_snapshot(base["lake"])
    assert before  # the lake holds run "base"
    argv = ["capture", "--model", base["model"], "--lake", base["lake"], "--run", "x", "--no-progress"]
    p = tourray(*argv, *args)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    errors = error_lines(p)
    assert len(errors) == 1, p.stderr
    first = p.stderr[p.stderr.index(errors[0]):]  # the error and any lines it lists
    for w in words:
        assert w in first, (w, p.stderr)
    assert lake_snapshot(base["lake"]) == before


def test_skip_invalid_captures_the_good_and_lists_the_bad(base):
    root = base["root"]
    samples = write_corpus(root / "mixed", {"train/a.txt": "A good text.\n", "eval/x/b.txt": "Another one.\n"})
    (samples / "train/empty.txt").write_bytes(b"")
    (samples / "train/blank.txt").write_bytes(b"   \n")
    (samples / "eval/x/latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    lake = root / "lake-mixed"
    p = tourray("capture", "--model", base["model"], "--samples", samples, "--lake", lake, "--run", "m",
                "--layers", "embed,0", "--group-size", 2, "--skip-invalid", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "3 invalid file(s) skipped" in p.stdout
    for name in ("train/empty.txt: empty", "train/blank.txt: whitespace only", "eval/x/latin1.txt: not UTF-8"):
        assert name in p.stdout, p.stdout
    assert sorted(Lake(str(lake)).read("samples").column("source").to_pylist()) == ["eval/x/b.txt", "train/a.txt"]


HELP = [None, "capture", "sql", "stats", "solve", "model", "prune", "prune plan", "prune apply", "prune verdict",
        "prune sweep", "prune width", "fold", "transport", "qa", "generate", "verify", "runs", "demo-model", "index",
        "optimize", "repair", "serve", "tours", "tours generate", "tours examples", "heal", "soup",
        "compress"]


@pytest.mark.parametrize("command", HELP)
def test_help_exits_0(command):
    p = tourray(*(command.split() if command else []), "--help", timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: tourray" + (f" {command}" if command else "")) and "Traceback" not in p.stderr


def test_every_subcommand_has_a_help_test():
    from tourray.cli import parser

    sub = next(a for a in parser()._actions if a.dest == "command")
    assert set(sub.choices) == {c for c in HELP if c and " " not in c}


HEAVY = ("torch", "transformers", "ray")


def imported(code):
    code = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""


def test_import_tourray_is_light():
    assert imported("import tourray\nassert tourray.__version__") == ""


def test_help_does_not_import_torch():
    for argv in (["--help"], ["capture", "--help"], ["fold", "--help"], ["qa", "--help"], ["serve", "--help"],
                 ["tours", "generate", "--help"], ["heal", "--help"], ["soup", "--help"],
                 ["compress", "--help"]):
        loaded = imported(f"from tourray import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit as e:\n"
                          f"    assert e.code == 0\n")
        assert "torch" not in loaded.split(","), (argv, loaded)
