"""tourray transport: a rotation planted between two copies of a model is recovered and folded back
(function unchanged, basis aligned); between models of other widths and tokenizers the per-pair maps
are stored as analysis artefacts and the fold is refused; bad input is one error line, lakes unchanged."""

from __future__ import annotations

import argparse
import hashlib
import logging
import time

import numpy as np
import pytest

from conftest import lake_snapshot, needs_smollm2, write_corpus
from tourray.capture import CaptureConfig, run_capture
from tourray.errors import UserError
from tourray.surgery.fold import Surgery, apply_surgery
from tourray.lake.tables import Lake
from tourray.stats.solves import SolveConfig, run_solve
from tourray.stats.transport import TransportConfig, nearest_depth, pooled, run_transport, tie_groups

KW = dict(store_dtype="float32", batch_size=3, group_size=3, run="r", stats=[])


def capture(model, samples, lake, **extra):
    """A small float32 capture run in this process (executor "local": the same tables, no actor pool)."""
    run_capture(CaptureConfig(model=str(model), samples=str(samples), lake=str(lake), **(KW | extra)), progress=False,
                executor="local")
    return lake


def two_heldout(lake) -> float:
    """A --heldout fraction that holds out exactly the two samples with the smallest id buckets."""
    ids = Lake(str(lake)).read("samples", ["sample_id"]).column(0).to_pylist()
    b = sorted(int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 2**32 for s in ids)
    return (b[1] + b[2]) / 2


def cli(argv: list[str]) -> int:
    """`tourray transport ARGS` through a parser built like tourray.cli's, with this module's add_parser."""
    from tourray.config import guarded
    from tourray.stats.transport import add_parser

    top = argparse.ArgumentParser(prog="tourray")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name, fn, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    add_parser(command)
    args = top.parse_args(["transport", *map(str, argv), "--no-progress"])
    root, handlers = logging.getLogger(), list(logging.getLogger().handlers)
    try:
        return guarded(args.fn, args)
    finally:  # guarded's basicConfig handler writes to this test's captured stderr: drop it after
        for h in root.handlers[len(handlers):]:
            root.removeHandler(h)


def hidden_and_logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        o = m(torch.tensor(ids), output_hidden_states=True)
    # every entry but the last is pre-norm (the embedding, then blocks 0..L-2); the last is post-norm
    return np.stack([h.double().numpy() for h in o.hidden_states[:-1]]), o.logits.double().numpy()


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- unit pieces ----------------------------------------------------------------------------------
def test_nearest_depth_and_stages():
    # 3 student blocks against a 30-block teacher that stored embed, 9, 19, 29
    assert nearest_depth([-1, 0, 1, 2], 3, [-1, 9, 19, 29], 30) == [(-1, -1), (0, 9), (1, 19), (2, 29)]
    # a deeper student than teacher: several student blocks share a teacher block; no teacher embed
    assert nearest_depth([-1, 0, 1, 2, 3, 4, 5], 6, [0, 1, 2], 3) == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert tie_groups("none", 4) == [] and tie_groups("all", 4) == [[0, 1, 2, 3]]
    assert tie_groups("stage:2", 5) == [[0, 1, 2], [3, 4]]
    with pytest.raises(UserError, match="stages"):
        tie_groups("stage:5", 4)


def test_pooled_moments_give_the_least_squares_tied_rotation():
    """The tied rotation from pooled moments equals scipy's Procrustes on the stacked, per-layer
    centred tokens (a different mean per layer, one rotation)."""
    import scipy.linalg

    from tourray.stats.linalg import procrustes
    from tourray.stats.moments import CrossMoments, Moments

    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    fits, xs, ys = [], [], []
    for layer in range(3):
        x = rng.standard_normal((50, 6)) * (layer + 1) + 5 * layer
        y = x @ q + 0.1 * rng.standard_normal((50, 6)) + rng.standard_normal(6) * 3
        fits.append((Moments(6).update(x), Moments(6).update(y), CrossMoments(6, 6).update(x, y)))
        xs.append(x - x.mean(0))
        ys.append(y - y.mean(0))
    r_ref, _ = scipy.linalg.orthogonal_procrustes(np.vstack(xs), np.vstack(ys))
    tied = procrustes(*pooled(fits, center=True), center=True)
    assert np.abs(tied.matrix - r_ref).max() < 1e-12
    # merging the layers as one stream would centre on the pooled mean: another, worse answer
    merged = [fits[0][i].merge(fits[1][i]).merge(fits[2][i]) for i in range(3)]
    assert np.abs(procrustes(*merged, center=True).matrix - r_ref).max() > 1e-3


# -- a planted rotation ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(qwen3_model, corpus_dir, tmp_path_factory):
    """The demo-sized Qwen3 (teacher) and a copy with a random orthogonal Q folded in (student: its
    residual stream is h @ Q), each captured into its own lake over the same texts."""
    root = tmp_path_factory.mktemp("transport")
    q = np.linalg.qr(np.random.default_rng(7).standard_normal((128, 128)))[0]
    apply_surgery(qwen3_model, root / "rotated", Surgery(residual=q), {})
    teacher = capture(qwen3_model, corpus_dir, root / "teacher")
    student = capture(root / "rotated", corpus_dir, root / "student")
    return dict(root=root, q=q, teacher=teacher, student=student, rotated=root / "rotated", original=qwen3_model,
                heldout=two_heldout(student))


def test_planted_rotation_is_recovered_and_folded(planted, tmp_path):
    p = planted
    before_t = lake_snapshot(p["teacher"])
    s = run_transport(TransportConfig(teacher_lake=str(p["teacher"]), student_lake=str(p["student"]), run="r",
                                      tie="all", heldout=p["heldout"], fold_into=str(tmp_path / "aligned")),
                      progress=False)
    assert [x["name"] for x in s["pairs"]] == ["embed->embed", "0->0", "1->1", "2->2"] and s["pairing"] == "position"
    tied = s["groups"][0]
    err = np.abs(tied["matrix"] - p["q"].T).max()
    own = max(np.abs(x["matrix"] - p["q"].T).max() for x in s["pairs"])
    print(f"\nplanted: max|W_tied - Q^T| = {err:.2e}, per-pair max|W - Q^T| = {own:.2e}, "
          f"orth error {tied['orth_error']:.1e}")
    assert err < 1e-4 and own < 1e-3                             # float32 captures: measured ~1e-6
    for x in s["pairs"]:
        print(f"  {x['name']}: fit {x['n_fit']}, held {x['n_heldout']}, cos {x['cos_before']:.4f} -> own "
              f"{x['own']['cos_after']:.6f}, tied {x['tied']['cos_after']:.6f}, bare R {x['rotation']['cos_after']:.6f}, "
              f"rms ratio {x['rms_ratio_before']:.3f} -> {x['tied']['rms_ratio']:.2e}")
        assert x["n_heldout"] > 0 and abs(x["cos_before"]) < 0.5
        assert min(x["own"]["cos_after"], x["tied"]["cos_after"], x["rotation"]["cos_after"]) > 0.99999
        assert x["tied"]["rms_ratio"] < 1e-4
    # stored: one row per pair, as `tourray solve` stores it (same solve_id: reused), and the tied row
    lake = Lake(str(p["student"]))
    rows = lake.read("solves").to_pylist()
    assert len(rows) == 5 and s["stored"] == 5 and lake_snapshot(p["teacher"]) == before_t
    one = run_solve("procrustes", SolveConfig(lake=str(p["student"]), **{"from": "r:1", "to": f"{p['teacher']}:r:1"},
                                              heldout=p["heldout"]), progress=False)
    assert one["reused"] and np.array_equal(one["matrix"], s["pairs"][2]["matrix"])
    # the fold: the rotated copy's function, the original's residual basis
    ids = [[5, 17, 42, 99, 3, 250, 77, 12, 8, 140, 33, 64], [9, 1, 300, 45, 45, 2, 18, 27, 200, 11, 6, 91]]
    h_al, lg_al = hidden_and_logits(tmp_path / "aligned", ids)
    h_rot, lg_rot = hidden_and_logits(p["rotated"], ids)
    h_org, _ = hidden_and_logits(p["original"], ids)
    d_logits, d_hidden, d_before = rel(lg_al, lg_rot), rel(h_al, h_org), rel(h_rot, h_org)
    print(f"  fold: logits vs rotated copy {d_logits:.1e} rel; hidden states vs original {d_hidden:.1e} rel "
          f"(rotated copy vs original: {d_before:.2f})")
    assert d_logits < 1e-5 and d_hidden < 1e-4 and d_before > 0.5


def test_cli_stages_out_folder_and_reuse(planted, tmp_path, capsys):
    """Through the parser: --tie stage:2 stores two tied rows (the pair rows are already there) and
    prints the table; asking again stores nothing."""
    p = planted
    argv = ["--teacher-lake", p["teacher"], "--student-lake", p["student"], "--run", "r", "--tie", "stage:2",
            "--heldout", p["heldout"], "--out", tmp_path / "maps"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "cos tied" in out and "tied map 1 over 1->1, 2->2" in out and "analysis artefacts" in out
    assert sorted(f.name for f in (tmp_path / "maps").iterdir())[:3] == ["W_0_to_0.npy", "W_1_to_1.npy", "W_2_to_2.npy"]
    w1 = np.load(tmp_path / "maps" / "W_tied1.npy")
    assert np.abs(w1 - p["q"].T).max() < 1e-4
    n = Lake(str(p["student"])).read("solves").num_rows
    assert cli(argv[:-2]) == 0 and Lake(str(p["student"])).read("solves").num_rows == n
    assert "already there" in capsys.readouterr().out


def test_transport_uses_the_stored_layers(planted, qwen3_model, corpus_dir, tmp_path):
    """A student run that hooked every block but stored only embed,0 (the rest fed inline statistics):
    the default pairs are of its stored layers (it paired the hooked ones and failed with "no
    overlapping text spans"), and a pair naming a hooked-only layer says so."""
    p = planted
    student = capture(qwen3_model, corpus_dir, tmp_path / "student", store="embed,0", stats=["units"])
    args = dict(teacher_lake=str(p["teacher"]), student_lake=str(student), run="r", heldout=p["heldout"])
    s = run_transport(TransportConfig(**args), progress=False)
    assert [x["name"] for x in s["pairs"]] == ["embed->embed", "0->0"]
    assert all(x["own"]["cos_after"] > 0.99999 for x in s["pairs"])  # the same model on both sides
    with pytest.raises(UserError, match="layer 1 was hooked but not stored"):
        run_transport(TransportConfig(**args, pairs="1:1"), progress=False)


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_texts(qwen3_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    other = write_corpus(root / "samples", {"train/a.txt": "A different text about a harbour and its bridge.\n",
                                            "train/b.txt": "Another text, about a tower and a wall.\n"})
    return capture(qwen3_model, other, root / "lake")


@pytest.mark.parametrize("case, extra, message", [
    ("texts", [], "not over the same texts"),
    ("run", ["--teacher-run", "nope"], "no run 'nope'"),
    ("k", ["--k", "129"], "--k 129 is larger than the width"),
    ("fold-none", ["--fold-into", "{tmp}/f"], "only one rotation tied over all layers folds"),
    ("fold-k", ["--tie", "all", "--k", "16", "--fold-into", "{tmp}/f"], "a projection, not a rotation"),
    ("fold-whiten", ["--tie", "all", "--whiten", "--ridge", "0.1", "--fold-into", "{tmp}/f"], "not orthogonal"),
    ("fold-full", ["--tie", "all", "--fold-into", "{tmp}"], "not empty"),
    ("itself", ["--teacher-lake", "{student}"], "is the student run itself"),
    ("pairs", ["--pairs", "0:7"], "layer 7 is out of range"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(planted, other_texts, case, extra, message, tmp_path, capsys):
    p = planted
    (tmp_path / "junk").write_text("x")
    student = other_texts if case == "texts" else p["student"]
    extra = [e.format(tmp=tmp_path, student=student) for e in extra]
    before = [lake_snapshot(x) for x in (student, p["teacher"])]
    heldout = 0.01 if case == "texts" else p["heldout"]  # its two samples would both be held out at p's
    argv = ["--teacher-lake", p["teacher"], "--student-lake", student, "--run", "r", "--heldout", heldout, *extra]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1, err
    assert [lake_snapshot(x) for x in (student, p["teacher"])] == before
    assert not (tmp_path / "f").exists()


# -- another width and tokenizer --------------------------------------------------------------------
@needs_smollm2
def test_smollm2_teacher_other_width_and_tokenizer(planted, smollm2_model, corpus_dir, tmp_path, capsys):
    """The demo-sized Qwen3 (width 128, its own tokenizer) as student of SmolLM2 (576, 30 blocks):
    span-aligned per-pair maps through top-16 PCA spaces; the fold is refused."""
    p = planted
    t0 = time.perf_counter()
    teacher = capture(smollm2_model, corpus_dir, tmp_path / "smol", layers="embed,9,19,29")
    print(f"\nsmollm2 capture {time.perf_counter() - t0:.1f} s")
    args = dict(teacher_lake=str(teacher), student_lake=str(p["teacher"]), run="r", heldout=p["heldout"])
    before = lake_snapshot(p["teacher"])
    with pytest.raises(UserError, match="pass --k"):
        run_transport(TransportConfig(**args), progress=False)
    with pytest.raises(UserError, match="width 128 and the teacher 576"):
        run_transport(TransportConfig(**args, k=16, tie="all", fold_into=str(tmp_path / "f")), progress=False)
    assert lake_snapshot(p["teacher"]) == before and not (tmp_path / "f").exists()
    t0 = time.perf_counter()
    s = run_transport(TransportConfig(**args, k=16), progress=False)
    print(f"transport {time.perf_counter() - t0:.1f} s")
    assert s["pairing"] == "span" and [x["name"] for x in s["pairs"]] == ["embed->embed", "0->9", "1->19", "2->29"]
    rows = {r["from_stream"]: r for r in Lake(str(p["teacher"])).read("solves").to_pylist()
            if str(teacher) in r["to_stream"]}
    assert len(rows) == 4 and all((r["rows"], r["cols"]) == (128, 576) for r in rows.values())
    for x in s["pairs"]:
        print(f"\n  smollm2 {x['name']}: fit {x['n_fit']}, held {x['n_heldout']}, top sv {x['singular_values'][0]:.3g}, "
              f"cos after {x['own']['cos_after']:.4f}, rel residual {x['own']['rel_residual']:.3f}, "
              f"rms ratio {x['own']['rms_ratio']:.3f}")
        assert x["cos_before"] is None and x["n_fit"] > 100 and x["n_heldout"] > 0
        assert -1 <= x["own"]["cos_after"] <= 1 and np.isfinite(x["own"]["rel_residual"])
        assert len(x["singular_values"]) == 16 and x["orth_error"] < 1e-10
        assert np.linalg.matrix_rank(x["matrix"]) == 16  # P_s R P_t^T: rank k
