"""`tourray tours generate`: the input grid, a Ray Data run into the lake table `tours` whose texts equal
the generator's (the server's code), re-running adds nothing, a run killed mid-way resumes to the rows
of an uninterrupted one, a run's identity is guarded, the export, and bad input (one `error:` line,
exit 2, nothing written)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, lake_snapshot
from serve_fixtures import SYS, chatty_llama, one_thread, system_prompt_file  # noqa: F401
from tourray.corpus.places import PLACE_COLUMNS, PLACES_FILE
from tourray.errors import UserError
from tourray.model.decoding import TOUR_DECODING
from tourray.serve.config import ToursConfig
from tourray.serve.prompt import DEFAULT_TAG_SETS, tour_prompt
from tourray.serve.tours import plan_tours, run_tours

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
STOPS = ("train/sydney__opera-house-exterior.txt", "train/sydney__opera-house-zh.txt", "train/xian__bell-tower.txt",
         "eval/seen_cities/xian__small-wild-goose-pagoda.txt", "train/rome__colosseum.txt")


@pytest.fixture(scope="module")
def world(tmp_path_factory, chatty_llama, system_prompt_file):  # noqa: F811
    """A places table of 5 stops (one point twice: a landmark's English and Chinese texts; one eval
    stop), a tag list file of two sets, and the paths the cases use."""
    root = tmp_path_factory.mktemp("tours")
    rows = [r for r in csv.DictReader(PLACES_FILE.open(encoding="utf-8"), delimiter="\t") if r["path"] in STOPS]
    with (root / "places.tsv").open("w", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=PLACE_COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    (root / "tags.txt").write_text("# interests\nhistory\narchitecture, history\n\n")
    return dict(root=root, places=root / "places.tsv", tags=root / "tags.txt", model=str(chatty_llama),
                system_prompt=str(system_prompt_file))


def cfg(w, **over) -> ToursConfig:
    base = dict(model=w["model"], places=str(w["places"]), tags=str(w["tags"]), styles=["brief", "detailed"],
                system_prompt=w["system_prompt"], max_new_tokens=6, batch_size=3, group_size=2, lake=str(w["root"] / "lake"))
    return ToursConfig.parse(base | over)


def test_the_grid_of_inputs(world):
    plan = plan_tours(cfg(world))
    rows = plan.inputs.to_pylist()
    # 3 training points (the Opera House's two texts share one), 2 tag sets, 2 styles; the eval stop left out
    assert len(rows) == 3 * 2 * 2 and len({r["input_id"] for r in rows}) == len(rows)
    assert {r["stop"] for r in rows} == {"train/sydney__opera-house-exterior.txt", "train/xian__bell-tower.txt",
                                         "train/rome__colosseum.txt"}
    r = next(r for r in rows if r["stop"].endswith("colosseum.txt") and r["tags"] == ["history", "architecture"]
             and r["style"] == "brief")
    assert r["place"] == "Colosseum, Rome, Italy" and r["plus_code"] == "8FHJVFRR+3V"
    assert r["prompt"] == tour_prompt("8FHJVFRR+3V", "Colosseum, Rome, Italy", ["architecture", "history"], "brief")
    assert r["max_new_tokens"] == 6 and r["seed"] is None
    assert plan.identity["decoding"] == json.dumps(TOUR_DECODING.record(), sort_keys=True)
    assert len(plan_tours(cfg(world, include=["*"])).inputs) == 4 * 2 * 2
    default = plan_tours(cfg(world, tags=None, max_new_tokens=None, n=5, seed=1))
    assert len(default.inputs) == 5 and default.inputs.to_pylist() == plan_tours(cfg(world, tags=None, max_new_tokens=None,
                                                                                        n=5, seed=1)).inputs.to_pylist()
    full = plan_tours(cfg(world, tags=None, max_new_tokens=None)).inputs.to_pylist()
    assert len(full) == 3 * len(DEFAULT_TAG_SETS) * 2 and {r["max_new_tokens"] for r in full} == {80, 240}
    sampled = plan_tours(cfg(world, decoding={"sample": True, "seed": 3})).inputs.to_pylist()
    assert all(isinstance(r["seed"], int) for r in sampled) and len({r["seed"] for r in sampled}) == len(sampled)


def _tours(lake, run):
    from tourray.lake.tables import Lake

    return sorted(Lake(str(lake)).read("tours", filter=f"run = '{run}'").to_pylist(), key=lambda r: r["input_id"])


def test_run_writes_the_generators_texts_and_a_rerun_adds_nothing(world, ray_session):
    from tourray.model.generate import Generator

    c = cfg(world, run="a")
    s = run_tours(c, progress=False)
    assert s["written"] == 12 and s["groups"] == 6 and s["already_done"] == 0
    rows = _tours(c.lake, "a")
    assert len(rows) == 12 and len({r["input_id"] for r in rows}) == 12
    gen = Generator(world["model"], SYS)
    for r in rows[:4]:
        want = gen([r["prompt"]], 6, decoding=TOUR_DECODING)[0]
        assert r["text"] == want["text"] and r["new_tokens"] == want["n_new_tokens"] and r["stopped"] == want["stopped"]
        assert r["prompt_tokens"] == len(gen.encode(r["prompt"]))
    r = rows[0]
    assert r["model"] == world["model"] and r["model_revision"].startswith("st-sha256:") and r["engine"] == "hf"
    assert json.loads(r["decoding"]) == TOUR_DECODING.record() and r["seed"] is None
    assert r["seconds"] > 0 and 1 <= r["batch_size"] <= 3
    assert {"tourray", "torch", "transformers", "host"} <= set(json.loads(r["provenance"]))
    before = lake_snapshot(c.lake)
    again = run_tours(c, progress=False)
    assert again["written"] == 0 and again["already_done"] == 12 and lake_snapshot(c.lake) == before
    with pytest.raises(UserError, match="(?s)run 'a' .* other settings; use a new --run.*decoding"):
        run_tours(cfg(world, run="a", decoding={"repetition_penalty": 1.3}), progress=False)
    assert lake_snapshot(c.lake) == before


def test_a_killed_run_resumes_to_the_uninterrupted_rows(world, ray_session, tmp_path):
    c = cfg(world, run="k", lake=str(tmp_path / "lake"), group_size=1, batch_size=1)
    argv = [sys.executable, "-m", "tourray.cli", "-q", "tours", "generate", "--model", c.model, "--places", c.places,
            "--tags", c.tags, "--styles", "brief,detailed", "--system-prompt", c.system_prompt, "--max-new-tokens", "6",
            "--batch-size", "1", "--group-size", "1", "--lake", c.lake, "--run", "k", "--no-progress"]
    p = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    t0, seen = time.time(), 0
    try:
        while time.time() - t0 < 300 and p.poll() is None:
            try:
                seen = len(_tours(c.lake, "k"))
            except Exception:  # noqa: BLE001 - the table does not exist yet
                seen = 0
            if seen >= 2:
                break
            time.sleep(0.3)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started
        p.wait()
    assert 2 <= seen < 12, (seen, p.stderr.read().decode()[-2000:])
    done = run_tours(c, progress=False)
    assert done["already_done"] >= 2 and done["already_done"] + done["written"] == 12
    resumed = _tours(c.lake, "k")
    assert len(resumed) == 12 and len({r["input_id"] for r in resumed}) == 12
    whole = {r["input_id"]: r["text"] for r in _tours(cfg(world).lake, "a")} or None
    if whole:  # the uninterrupted run of the same inputs (test above) wrote the same texts
        assert {r["input_id"]: r["text"] for r in resumed} == whole


def test_export_writes_training_texts_capture_reads(world, ray_session, tmp_path):
    from tourray.corpus.texts import load_samples

    out = tmp_path / "tours-out"
    s = run_tours(cfg(world, run="a", export=str(out)), progress=False)
    rows = _tours(cfg(world).lake, "a")
    assert s["exported"] == sum(1 for r in rows if r["text"].strip())
    samples, skipped = load_samples(out)
    assert len(samples) == s["exported"] and not skipped
    assert {x.category for x in samples} <= {"tours-brief", "tours-detailed"}
    index = list(csv.DictReader((out / "index.tsv").open(encoding="utf-8"), delimiter="\t"))
    assert {r["split"] for r in index} == {"train"} and {r["city"] for r in index} <= {"sydney", "xian", "rome"}
    pairs = [json.loads(line) for line in (out / "tours.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {p["prompt"] for p in pairs} <= {r["prompt"] for r in rows}
    again = run_tours(cfg(world, run="a", export=str(out)), progress=False)  # the same files again
    assert again["exported"] == s["exported"] and len(list(out.glob("*.txt"))) == s["exported"]
    with pytest.raises(UserError, match="not an export of run 'b'"):
        run_tours(cfg(world, run="b", export=str(out)), progress=False)


# -- bad input: one error line, exit 2, nothing written ------------------------------------------
def _cli(args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "tourray.cli", "tours", "generate", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


@pytest.mark.parametrize("case", ["missing model", "not a checkpoint", "unknown style", "missing tag list file",
                                  "unknown tag in the file", "empty tag list file", "export into samples/eval",
                                  "export into a corpus's eval", "export onto a file", "no stop matches"])
def test_bad_input_one_error_line_exit_2_nothing_written(world, tmp_path, case):
    (tmp_path / "bad_tags.txt").write_text("history\nhistory, ghosts\n")
    (tmp_path / "empty_tags.txt").write_text("# nothing\n")
    corpus = tmp_path / "corpus"
    (corpus / "eval" / "x").mkdir(parents=True)
    (corpus / "index.tsv").write_text("path\tsplit\tcategory\tcity\tlanguage\tsha256\n")
    (tmp_path / "afile").write_text("x")
    lake = tmp_path / "lake"
    base = ["--model", world["model"], "--places", world["places"], "--system-prompt", world["system_prompt"],
            "--lake", lake, "--no-progress"]
    over = {
        "missing model": (["--model", tmp_path / "nope"], "--model: no such checkpoint folder"),
        "not a checkpoint": (["--model", tmp_path], "--model:"),
        "unknown style": (["--styles", "brief,loud"], "--styles"),
        "missing tag list file": (["--tags", tmp_path / "none.txt"], "--tags:"),
        "unknown tag in the file": (["--tags", tmp_path / "bad_tags.txt"], "line 2: unknown tag(s) 'ghosts'"),
        "empty tag list file": (["--tags", tmp_path / "empty_tags.txt"], "has no tag sets"),
        "export into samples/eval": (["--export", REPO / "samples" / "eval" / "tours"], "--export:"),
        "export into a corpus's eval": (["--export", corpus / "eval" / "x"], "held-out eval folder"),
        "export onto a file": (["--export", tmp_path / "afile"], "is a file"),
        "no stop matches": (["--include", "train/atlantis__*"], "--include: no stop"),
    }[case]
    p = _cli(base + over[0])
    assert p.returncode == 2, (p.stdout, p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and p.stderr.startswith("error: "), p.stderr  # (a config error lists its fields below)
    assert over[1] in p.stderr[p.stderr.index(errors[0]):], p.stderr
    assert "Traceback" not in p.stderr
    assert not lake.exists() and not (REPO / "samples" / "eval" / "tours").exists() and not (corpus / "eval" / "x" / "index.tsv").exists()
