#!/usr/bin/env python
"""Fold benchmark: `tourray.surgery.fold.apply_surgery` (streamed shard by shard) against the non-streaming
fold it avoids, on random-weight Qwen3 safetensors checkpoints: wall time, peak memory, bytes moved.

Everything runs in one invocation, so every ratio compares figures taken under the same machine load
(other work may share the cores: compare ratios, not absolute figures, across runs).

  checkpoint  a Qwen3 of the given shape with random weights (seed 0; norm weights ~ 1 + 0.1 N(0,1),
              so the fold really absorbs them), untied LM head (as Qwen3-8B..32B), written tensor by
              tensor in state-dict order into shards of --shard-size with the greedy split
              save_pretrained(max_shard_size=...) uses; no model object is ever built, so building
              needs about one shard of memory. Two sizes at the same width (--layers, default 28 and
              7 blocks): is the fold's peak memory flat in the checkpoint size?
  surgery     one random orthogonal residual rotation Q (QR of a Gaussian, float64), every block's FFN
              neurons permuted, and every block's query heads permuted within their key/value group
              with the groups reordered (so k/v move too): the transforms of tests/test_fold.py.
  streaming   apply_surgery(src, out, surgery, provenance={}) in a fresh subprocess.
  baseline    the non-streaming fold, in a fresh subprocess: AutoModelForCausalLM.from_pretrained
              (same dtype), the same per-tensor algebra (tourray.surgery.fold._Fold, float64, cast back)
              applied to every parameter in memory, save_pretrained(max_shard_size=--shard-size).
  checks      the two outputs hold the same tensors (bit for bit), and for the smallest size the
              folded model's logits on 2 x 12 tokens against the original's (float32 compute).
  probe       the largest tensor alone (an LM head [vocab, d]) through _Fold as apply_surgery runs it,
              and through the same algebra in row blocks into a preallocated output: what the peak
              would be with a blocked fold (--no-probe to skip, --probe-only for just this).

Per measurement (one subprocess each, so peaks never mix): wall time and phases; VmHWM (the kernel's
peak RSS, file-backed mmap pages included); the anonymous-memory peak and what was running at that
moment (a thread samples /proc/self/status every 5 ms; the fold's tensors are labelled by wrapping
_Fold.__call__, save_file and model_revision in the child, package untouched); /proc/self/io.

Defaults: one torch thread per child (on this shared 2-core VM two MKL threads ran float64 GEMMs at
about half the speed of one while other work held the cores), 500 MB shards (a few shards even at
this width; real checkpoints use ~4-5 GB).

Usage:  .venv/bin/python bench/bench_fold.py             # d=1024 (Qwen3-0.6B shapes), 28 and 7 blocks, bf16 (~8 min)
        .venv/bin/python bench/bench_fold.py --quick     # tiny float32 model, 8 and 2 blocks (~3 min)
        .venv/bin/python bench/bench_fold.py --width 2048 --layers 28   # Qwen3-1.7B shapes (4 GB)
Writes bench/out/fold/results.json and prints a table; the checkpoints live under .cache/bench_fold
and are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RULE = "-" * 84
IDS = [[5, 17, 42, 99, 3, 250, 77, 12, 8, 140, 33, 64], [9, 1, 300, 45, 45, 2, 18, 27, 200, 11, 6, 91]]
#: Shapes by width: Qwen3-0.6B (1024), Qwen3-1.7B (2048), Qwen3-4B (2560); vocab 151,936 for all.
WIDTHS = {
    256: dict(intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    512: dict(intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    1024: dict(intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    2048: dict(intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    2560: dict(intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def fmt_row(label: str, value, spec: str = ",.0f") -> str:
    v = "-" if value is None else (value if isinstance(value, str) else format(value, spec))
    return f"{label:<68}{v:>16}"


def parse_size(s: str) -> int:
    s = s.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def mib(b) -> float | None:
    return None if b is None else b / 2**20


# -- the checkpoint ------------------------------------------------------------------------------
def qwen3_config(width: int, layers: int, vocab: int, dtype: str):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, max_position_embeddings=4096,
                       tie_word_embeddings=False, rope_theta=1_000_000.0, dtype=dtype, **WIDTHS[width])


def build_checkpoint(out: Path, width: int, layers: int, vocab: int, dtype: str, shard_size: int, seed: int = 0) -> dict:
    """Random weights, written shard by shard (no model object; at most one shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3ForCausalLM

    t0 = time.perf_counter()
    cfg = qwen3_config(width, layers, vocab, dtype)
    with torch.device("meta"):
        shapes = [(k, tuple(v.shape)) for k, v in Qwen3ForCausalLM(cfg).state_dict().items()]
    tdt = getattr(torch, dtype)
    esize = torch.empty((), dtype=tdt).element_size()
    # the greedy split of huggingface_hub.split_torch_state_dict_into_shards (save_pretrained's):
    # in state-dict order; a new shard when the next tensor would overflow; a big tensor alone
    shards, cur, cur_bytes = [], [], 0
    for k, shp in shapes:
        nb = esize * int(torch.Size(shp).numel())
        if cur and cur_bytes + nb > shard_size:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((k, shp))
        cur_bytes += nb
    shards.append(cur)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    n = len(shards)
    for i, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for k, shp in shard:
            if len(shp) == 1:  # RMSNorm weights (residual norms, q_norm, k_norm)
                t = 1.0 + 0.1 * torch.randn(shp, generator=gen, dtype=torch.float32)
            else:
                t = torch.randn(shp, generator=gen, dtype=torch.float32).mul_(0.02)
            tensors[k] = t.to(tdt)
            del t
            weight_map[k] = name
            total += tensors[k].numel() * esize
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg.save_pretrained(out)
    params = sum(int(torch.Size(s).numel()) for _, s in shapes)
    matrix_params = sum(int(torch.Size(s).numel()) for _, s in shapes if len(s) == 2)
    files = sorted(out.glob("*.safetensors"))
    return dict(path=str(out), params=params, fold_gflop=round(2 * width * matrix_params / 1e9, 1), dtype=dtype, hidden_size=width, layers=layers, vocab_size=vocab,
                **WIDTHS[width], shards=n, shard_size=shard_size, bytes=sum(f.stat().st_size for f in files),
                largest_shard_bytes=max(f.stat().st_size for f in files), largest_tensor=max(
                    ((k, esize * int(torch.Size(s).numel())) for k, s in shapes), key=lambda kv: kv[1]),
                build_seconds=round(time.perf_counter() - t0, 2))


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# -- the child processes ------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """Samples /proc/self/status every `interval` s: peak RssAnon / VmRSS and the label current at the
    anonymous peak; per label its own anonymous peak."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.label, self.stop = interval, "start", threading.Event()
        self.peak_anon, self.peak_rss, self.peak_label, self.samples = 0, 0, None, 0
        self.by_label: dict[str, int] = {}

    @staticmethod
    def read() -> dict:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
        return out

    def run(self):
        while not self.stop.is_set():
            s, label = self.read(), self.label
            self.samples += 1
            if s["RssAnon"] > self.peak_anon:
                self.peak_anon, self.peak_label = s["RssAnon"], label
            self.peak_rss = max(self.peak_rss, s["VmRSS"])
            self.by_label[label] = max(self.by_label.get(label, 0), s["RssAnon"])
            time.sleep(self.interval)


def proc_io() -> dict:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
    return out


def make_surgery(folder: str, seed: int):
    """Rotation + neuron permutations + head permutations (within groups, groups reordered)."""
    import numpy as np

    from tourray.surgery.fold import Layout, Surgery, read_config

    lay = Layout.of(read_config(folder)[1], folder)
    rng = np.random.default_rng(seed)
    s = Surgery(residual=np.linalg.qr(rng.standard_normal((lay.hidden, lay.hidden)))[0])
    for i in range(lay.layers):
        s.neurons[i] = rng.permutation(lay.ffn)
        groups = rng.permutation(lay.kv_heads)
        s.heads[i] = np.concatenate([g * lay.group + rng.permutation(lay.group) for g in groups])
    return s, lay


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import tourray.surgery.fold as fold_mod
    import tourray.lake.runs as manifest
    from safetensors import torch as st_torch

    # imported before the clock starts, in both modes alike (so rss_before is comparable)
    import tqdm  # noqa: F401
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401
    from transformers import AutoModelForCausalLM

    import tourray.model.gguf  # noqa: F401
    import tourray.surgery.blocks  # noqa: F401
    import tourray.runtime  # noqa: F401

    src, out, mode = spec["src"], spec["out"], spec["mode"]
    surgery, lay = make_surgery(src, spec["seed"])
    phases: dict[str, float] = {}
    per_tensor: dict[str, float] = {}
    sampler = Sampler()

    def timed(label_of, key):
        def wrap(fn):
            def inner(*a, **k):
                prev = sampler.label
                sampler.label = label_of(*a, **k)
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    phases[key] = phases.get(key, 0.0) + time.perf_counter() - t
                    if key == "fold_tensors":
                        per_tensor[sampler.label] = time.perf_counter() - t
                    sampler.label = prev
            return inner
        return wrap

    fold_mod._Fold.__call__ = timed(lambda self, name, t: f"fold {name}", "fold_tensors")(fold_mod._Fold.__call__)
    manifest.model_revision = timed(lambda *a, **k: "model_revision (sha256 of the source)", "model_revision")(
        manifest.model_revision)
    st_torch.save_file = timed(lambda tensors, filename, **k: f"save_file {Path(filename).name}", "save_file")(
        st_torch.save_file)
    base = Sampler.read()
    io0 = proc_io()
    ru0 = time.process_time()
    sampler.start()
    t0 = time.perf_counter()
    if mode == "stream":
        sampler.label = "apply_surgery (other)"
        fold_mod.apply_surgery(src, out, surgery, provenance={})
    else:  # the non-streaming fold: whole model in memory, same per-tensor algebra, save_pretrained
        sampler.label = "from_pretrained"
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, spec["dtype"]))
        phases["from_pretrained"] = time.perf_counter() - t
        sampler.label = "fold (other)"
        surgery.check(lay)  # as apply_surgery: fills the k/v group order from the head permutation
        sd = dict(model.named_parameters())
        norms = {n: sd[n].detach().to(torch.float64).clone() for n in fold_mod._norm_names(lay)}
        f = fold_mod._Fold(surgery, lay, norms)
        t = time.perf_counter()
        with torch.no_grad():
            for n, p in sd.items():
                p.data = f(n, p.data)[n]
        phases["fold_in_memory"] = time.perf_counter() - t
        sampler.label = "save_pretrained"
        t = time.perf_counter()
        model.save_pretrained(out, max_shard_size=spec["shard_size"])
        phases["save_pretrained"] = time.perf_counter() - t
    wall = time.perf_counter() - t0
    cpu = time.process_time() - ru0
    sampler.stop.set()
    sampler.join()
    io1 = proc_io()
    end = Sampler.read()
    top = sorted(sampler.by_label.items(), key=lambda kv: -kv[1])[:8]
    slow = sorted(per_tensor.items(), key=lambda kv: -kv[1])[:5]
    return dict(mode=mode, wall_seconds=round(wall, 2), cpu_seconds=round(cpu, 2), cpu_util=round(cpu / wall, 2),
                phases={k: round(v, 2) for k, v in phases.items()}, vm_hwm=end["VmHWM"], rss_before=base["VmRSS"],
                anon_before=base["RssAnon"], peak_anon_sampled=sampler.peak_anon, peak_rss_sampled=sampler.peak_rss,
                peak_anon_label=sampler.peak_label, anon_peak_by_label=dict(top), samples=sampler.samples,
                slowest_tensors={k: round(v, 2) for k, v in slow},
                io={k: io1[k] - io0[k] for k in ("rchar", "wchar", "read_bytes", "write_bytes")},
                torch_threads=torch.get_num_threads(), load1_end=load1())


def run_child(spec: dict, log_path: Path) -> dict:
    """One measurement in a fresh interpreter; its own VmHWM, and ru_maxrss of the child as a check."""
    import resource

    os.sync()  # the previous step's dirty pages written back before the clock starts
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as lf:
        p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=lf, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{spec['mode']} subprocess failed (rc {p.returncode}); see {log_path}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_wall_seconds"] = round(time.perf_counter() - t0, 2)  # incl. interpreter start + imports
    res["ru_maxrss_children"] = r1.ru_maxrss * 1024 if r1.ru_maxrss > r0.ru_maxrss else None
    res["out_bytes"] = folder_bytes(Path(spec["out"]))
    return res


def probe_child(spec: dict) -> dict:
    """The largest tensor alone: an LM head [vocab, d] (bf16, random) with its norm weight, through
    _Fold as apply_surgery runs it, or through the same algebra in row blocks of `chunk` rows written
    into a preallocated output (the fix this benchmark suggests). Anonymous-memory peak above the
    level before the call (which holds the input tensor), time, and the output's bits."""
    import hashlib

    import numpy as np
    import torch

    import tourray.surgery.fold as fold_mod

    torch.set_num_threads(spec["threads"])
    vocab, d, chunk = spec["vocab"], spec["width"], spec["chunk"]
    gen = torch.Generator().manual_seed(0)
    t = torch.randn((vocab, d), generator=gen).mul_(0.02).to(torch.bfloat16)
    g = (1.0 + 0.1 * torch.randn(d, generator=gen)).to(torch.bfloat16).to(torch.float64)
    lay = fold_mod.Layout(model_type="qwen3", hidden=d, layers=1, heads=1, kv_heads=1, head_dim=d, ffn=1, tied=False,
                          eps=1e-6, head_norms=True)
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0]
    f = fold_mod._Fold(fold_mod.Surgery(residual=q), lay, {"model.norm.weight": g})
    sampler = Sampler()
    base = Sampler.read()
    sampler.start()
    t0 = time.perf_counter()
    if chunk == 0:
        out = f("lm_head.weight", t)["lm_head.weight"]
    else:  # row blocks: (W[r] diag(g)) Q, cast into the preallocated output; float64 only per block
        out = torch.empty_like(t)
        gq = g * f.scale
        for r0 in range(0, vocab, chunk):
            blk = t[r0:r0 + chunk].to(torch.float64)
            blk.mul_(gq)
            out[r0:r0 + chunk] = (blk @ f.q).to(t.dtype)
            del blk
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    return dict(chunk=chunk, vocab=vocab, width=d, tensor_bytes=t.numel() * t.element_size(),
                anon_before=base["RssAnon"], anon_peak=sampler.peak_anon, added=sampler.peak_anon - base["RssAnon"],
                wall_seconds=round(wall, 2), sha256=hashlib.sha256(out.view(torch.int16).numpy().tobytes()).hexdigest()[:16])


def check_child(spec: dict) -> dict:
    """Logits of the original and of the folded checkpoint (float32 compute, one model at a time)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    ids = torch.tensor(IDS)
    outs = []
    for folder in (spec["src"], spec["out"]):
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            outs.append(m(ids).logits.double().numpy())
        del m
    a, b = outs
    return dict(rel_max_abs_diff=float(np.abs(b - a).max() / np.abs(a).max()),
                argmax_agree=float((a.argmax(-1) == b.argmax(-1)).mean()), logits_max_abs=float(np.abs(a).max()))


def same_tensors(a: Path, b: Path) -> dict:
    """Bit-for-bit comparison of two checkpoints' tensors, one tensor at a time."""
    import torch
    from safetensors import safe_open

    from tourray.surgery.fold import weight_files

    def names(folder):
        m = {}
        for f in weight_files(folder):
            with safe_open(str(f), framework="pt") as fh:
                m.update({n: f for n in fh.keys()})
        return m

    na, nb = names(a), names(b)
    diff = []
    for n in sorted(set(na) & set(nb)):
        with safe_open(str(na[n]), framework="pt") as fa, safe_open(str(nb[n]), framework="pt") as fb:
            x, y = fa.get_tensor(n), fb.get_tensor(n)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                diff.append(n)
    return dict(tensors=len(set(na) & set(nb)), only_in_stream=sorted(set(na) - set(nb)),
                only_in_baseline=sorted(set(nb) - set(na)), differing=diff[:10], n_differing=len(diff))


def run_probe(args, logs: Path) -> dict:
    """The LM head alone, as apply_surgery folds it and in row blocks, one fresh process each."""
    res = {}
    for chunk in (0, args.probe_chunk):
        log(f"probe: LM head [{args.vocab}, {args.width}] {'as _Fold does it' if not chunk else f'in blocks of {chunk} rows'} ...")
        spec = dict(vocab=args.vocab, width=args.width, chunk=chunk, threads=args.threads)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-child", json.dumps(spec)]
        p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=open(logs / f"probe_{chunk}.log", "w"), text=True)
        if p.returncode != 0:
            res["whole" if not chunk else "blocks"] = dict(error=f"rc {p.returncode}, see {logs / f'probe_{chunk}.log'}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        res["whole" if not chunk else "blocks"] = r
        log(f"probe: added anon {mib(r['added']):,.0f} MiB ({r['added'] / r['tensor_bytes']:.1f}x the tensor), "
            f"{r['wall_seconds']} s, output sha256 {r['sha256']}")
    if "added" in res.get("whole", {}) and "added" in res.get("blocks", {}):
        res["same_bits"] = res["whole"]["sha256"] == res["blocks"]["sha256"]
        res["added_blocks_over_whole"] = ratio(res["blocks"]["added"], res["whole"]["added"])
        res["time_blocks_over_whole"] = ratio(res["blocks"]["wall_seconds"], res["whole"]["wall_seconds"])
    return res


# -- the parent -----------------------------------------------------------------------------------
def environment() -> dict:
    import datetime as dt
    import platform
    from importlib.metadata import version

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("MemTotal", "MemAvailable"):
                mem[k] = round(int(v.split()[0]) / 2**20, 1)
    versions = {}
    for pkg in ("torch", "transformers", "safetensors", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            pass
    du = shutil.disk_usage(REPO)
    return dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
                python=platform.python_version(), cpu_model=cpu, cores=os.cpu_count(),
                ram_gib=mem.get("MemTotal"), ram_available_gib_start=mem.get("MemAvailable"),
                disk_free_gib_start=round(du.free / 2**30, 1), versions=versions,
                command=" ".join([Path(sys.executable).name] + sys.argv))


def gbps(nbytes, seconds):
    return round(nbytes / seconds / 1e9, 3) if seconds else None


def bench_size(args, work: Path, layers: int, logs: Path, check: bool) -> dict:
    tag = f"L{layers}"
    src = work / f"src_{tag}"
    log(f"{tag}: building a random Qwen3 (hidden {args.width}, {layers} blocks, {args.dtype}) in {src} ...")
    ck = build_checkpoint(src, args.width, layers, args.vocab, args.dtype, args.shard_size)
    log(f"{tag}: {ck['params'] / 1e9:.3f} B params, {ck['bytes'] / 1e9:.2f} GB in {ck['shards']} shards "
        f"(largest {ck['largest_shard_bytes'] / 1e9:.2f} GB; largest tensor {ck['largest_tensor'][0]} "
        f"{ck['largest_tensor'][1] / 1e9:.2f} GB), built in {ck['build_seconds']} s")
    res = dict(checkpoint=ck, runs=[])
    base = dict(src=str(src), seed=args.seed, threads=args.threads, dtype=args.dtype, shard_size=args.shard_size)
    order = ["stream", "baseline"] if args.repeat == 1 else ["stream", "baseline", "baseline", "stream"] * (args.repeat // 2)
    if args.no_baseline:
        order = [m for m in order if m != "baseline"]
    kept = {}  # the first output of each mode, for the comparison and the logits check
    for k, mode in enumerate(order):
        out = work / f"out_{tag}_{mode}_{k}"
        shutil.rmtree(out, ignore_errors=True)
        log(f"{tag}: {mode} (load {load1()}) ...")
        r = run_child(dict(base, mode=mode, out=str(out)), logs / f"{tag}_{mode}_{k}.log")
        r["load1_end_parent"] = load1()
        res["runs"].append(r)
        log(f"{tag}: {mode}: {r['wall_seconds']} s, cpu util {r['cpu_util']}, VmHWM {mib(r['vm_hwm']):,.0f} MiB, "
            f"anon peak {mib(r['peak_anon_sampled']):,.0f} MiB at {r['peak_anon_label']!r}; phases {r['phases']}")
        if mode in kept:
            shutil.rmtree(out, ignore_errors=True)
        else:
            kept[mode] = out
    s_out = kept["stream"]
    if "baseline" in kept:
        t = time.perf_counter()
        res["same_tensors"] = same_tensors(s_out, kept["baseline"])
        log(f"{tag}: stream vs baseline outputs: {res['same_tensors']['n_differing']} of "
            f"{res['same_tensors']['tensors']} tensors differ ({time.perf_counter() - t:.1f} s)")
    if check:
        log(f"{tag}: logits check (original vs folded, float32 compute) ...")
        t = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--check-child",
               json.dumps(dict(src=str(src), out=str(s_out), threads=args.threads))]
        p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=open(logs / f"{tag}_check.log", "w"), text=True)
        if p.returncode == 0:
            res["logits_check"] = json.loads(p.stdout.strip().splitlines()[-1])
            res["logits_check"]["seconds"] = round(time.perf_counter() - t, 1)
            log(f"{tag}: logits {res['logits_check']}")
        else:
            res["logits_check"] = dict(error=f"rc {p.returncode}, see {logs / f'{tag}_check.log'}")
    summarize(res)
    if not args.keep:
        for p in [src, *work.glob(f"out_{tag}_*")]:
            shutil.rmtree(p, ignore_errors=True)
    return res


def summarize(res: dict) -> None:
    ck = res["checkpoint"]
    by = {}
    for r in res["runs"]:
        by.setdefault(r["mode"], []).append(r)
    best = {m: min(rs, key=lambda r: r["wall_seconds"]) for m, rs in by.items()}
    s = {}
    for m, r in best.items():
        moved = ck["bytes"] + r["out_bytes"]
        s[m] = dict(wall_seconds=r["wall_seconds"], runs=[x["wall_seconds"] for x in by[m]], vm_hwm=max(
            x["vm_hwm"] for x in by[m]), peak_anon=max(x["peak_anon_sampled"] for x in by[m]),
            peak_anon_label=r["peak_anon_label"], rss_before=r["rss_before"],
            added_hwm=max(x["vm_hwm"] - x["rss_before"] for x in by[m]),
            checkpoint_gb_per_s=gbps(ck["bytes"], r["wall_seconds"]), read_plus_written_gb_per_s=gbps(moved, r["wall_seconds"]),
            io=r["io"], cpu_util=r["cpu_util"], cpu_seconds=r["cpu_seconds"], phases=r["phases"],
            fold_gflop_per_s=round(ck["fold_gflop"] / r["phases"]["fold_tensors"], 1))
    res["summary"] = s
    st, bl = s.get("stream"), s.get("baseline")
    res["ratios"] = dict(
        stream_hwm_over_checkpoint=ratio(st["vm_hwm"], ck["bytes"]) if st else None,
        stream_added_hwm_over_checkpoint=ratio(st["added_hwm"], ck["bytes"]) if st else None,
        stream_hwm_over_largest_shard=ratio(st["vm_hwm"], ck["largest_shard_bytes"]) if st else None,
        stream_anon_over_largest_tensor=ratio(st["peak_anon"], ck["largest_tensor"][1]) if st else None,
        baseline_hwm_over_checkpoint=ratio(bl["vm_hwm"], ck["bytes"]) if bl else None,
        stream_hwm_over_baseline_hwm=ratio(st["vm_hwm"], bl["vm_hwm"]) if st and bl else None,
        stream_time_over_baseline_time=ratio(st["wall_seconds"], bl["wall_seconds"]) if st and bl else None,
        stream_cpu_over_baseline_cpu=ratio(st["cpu_seconds"], bl["cpu_seconds"]) if st and bl else None,
    )


def fmt_table(res: dict) -> str:
    lines = [RULE]
    row = lambda *a: lines.append(fmt_row(*a))  # noqa: E731
    for tag, r in res["sizes"].items():
        ck = r["checkpoint"]
        row(f"{tag}: checkpoint ({ck['params'] / 1e9:.3f} B params, {ck['dtype']}, {ck['shards']} shards) GB",
            ck["bytes"] / 1e9, ".2f")
        row(f"{tag}: largest shard GB / largest tensor GB", f"{ck['largest_shard_bytes'] / 1e9:.2f} / "
            f"{ck['largest_tensor'][1] / 1e9:.2f}")
        for m, x in r["summary"].items():
            row(f"{tag}: {m}: wall s (best; runs {x['runs']})", x["wall_seconds"], ".1f")
            row(f"{tag}: {m}: CPU s; cpu util", f"{x['cpu_seconds']:.1f}; {x['cpu_util']}")
            row(f"{tag}: {m}: VmHWM MiB (before the call {mib(x['rss_before']):,.0f})", mib(x["vm_hwm"]))
            row(f"{tag}: {m}: anonymous peak MiB", mib(x["peak_anon"]))
            row(f"{tag}: {m}:   ... at", str(x["peak_anon_label"])[:40])
            row(f"{tag}: {m}: checkpoint GB/s; (read + written) GB/s",
                f"{x['checkpoint_gb_per_s']} / {x['read_plus_written_gb_per_s']}")
            row(f"{tag}: {m}: phases s", ", ".join(f"{k} {v}" for k, v in x["phases"].items())[:50])
            row(f"{tag}: {m}: float64 GEMM GFLOP/s in the fold ({ck['fold_gflop']:,.0f} GFLOP)", x["fold_gflop_per_s"], ".1f")
            row(f"{tag}: {m}: disk read / written GB (/proc/self/io)",
                f"{x['io']['read_bytes'] / 1e9:.2f} / {x['io']['write_bytes'] / 1e9:.2f}")
        for k, v in r["ratios"].items():
            row(f"{tag}: {k}", v, ".3f")
        if "same_tensors" in r:
            row(f"{tag}: tensors differing, stream vs baseline", f"{r['same_tensors']['n_differing']} of "
                f"{r['same_tensors']['tensors']}")
        if "logits_check" in r:
            c = r["logits_check"]
            row(f"{tag}: logits rel. max diff; argmax agreement", c.get("error") or
                f"{c['rel_max_abs_diff']:.2e}; {c['argmax_agree']:.3f}")
        lines.append(RULE)
    for k, v in res.get("flatness", {}).items():
        row(k, v, ".3f")
    pr = res.get("probe")
    if pr:
        lines.append(RULE)
        for k in ("whole", "blocks"):
            x = pr.get(k, {})
            if "added" in x:
                how = "via _Fold" if not x["chunk"] else f"in {x['chunk']}-row blocks"
                row(f"probe: LM head {how}: added anon MiB; x tensor; s",
                    f"{mib(x['added']):,.0f}; {x['added'] / x['tensor_bytes']:.1f}; {x['wall_seconds']}")
        row("probe: same output bits", str(pr.get("same_bits")))
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] in ("--child", "--check-child", "--probe-child"):
        fn = dict(zip(("--child", "--check-child", "--probe-child"), (child, check_child, probe_child)))[sys.argv[1]]
        print(json.dumps(fn(json.loads(sys.argv[2]))), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Tiny float32 model (width 256, vocab 32000), 8 and 2 blocks, 50MB shards.")
    p.add_argument("--width", type=int, default=None, choices=sorted(WIDTHS), help="Hidden size (default 1024; --quick: 256).")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="Block counts, one checkpoint each (default 28 7).")
    p.add_argument("--vocab", type=int, default=None, help="Vocabulary (default 151936, Qwen3's; --quick: 32000).")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"), help="Default bfloat16; --quick: float32.")
    p.add_argument("--shard-size", default=None, help="max_shard_size (default 500MB; --quick: 50MB).")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1).")
    p.add_argument("--repeat", type=int, default=1, help="Runs of each: 1, or an even number (order stream, baseline, baseline, stream, ...).")
    p.add_argument("--no-baseline", action="store_true", help="Streaming only (for sizes whose baseline would not fit).")
    p.add_argument("--no-check", action="store_true", help="Skip the logits check on the smallest size.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "bench_fold", help="Checkpoints (default .cache/bench_fold).")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "fold", help="results.json and logs.")
    p.add_argument("--keep", action="store_true", help="Keep the checkpoints and outputs.")
    p.add_argument("--probe-chunk", type=int, default=8192, help="Rows per block in the LM-head probe (default 8192).")
    p.add_argument("--no-probe", action="store_true", help="Skip the LM-head probe (whole vs row blocks).")
    p.add_argument("--probe-only", action="store_true", help="Only the LM-head probe (no checkpoints).")
    p.add_argument("--report", type=Path, default=None, help="Print the table of a results.json again (re-summarised).")
    args = p.parse_args(argv)
    if args.report:
        res = json.loads(args.report.read_text())
        for r in res["sizes"].values():
            summarize(r)
        print(fmt_table(res))
        return 0
    q = args.quick
    args.width = args.width or (256 if q else 1024)
    args.layers = args.layers or ([8, 2] if q else [28, 7])
    args.vocab = args.vocab or (32000 if q else 151936)
    args.dtype = args.dtype or ("float32" if q else "bfloat16")
    args.shard_size = parse_size(args.shard_size or ("50MB" if q else "500MB"))

    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    res: dict = dict(environment=environment(), settings=dict(
        width=args.width, layers=args.layers, vocab=args.vocab, dtype=args.dtype, shard_size=args.shard_size,
        threads=args.threads, repeat=args.repeat, seed=args.seed, load1_start=load1()), sizes={})
    env = res["environment"]
    log(f"environment: {env['cpu_model']}, {env['cores']} cores, {env['ram_gib']} GiB RAM "
        f"({env['ram_available_gib_start']} available), {env['disk_free_gib_start']} GiB disk free, load {load1()}")
    smallest = min(args.layers)
    try:
        for layers in ([] if args.probe_only else args.layers):
            res["sizes"][f"L{layers}"] = bench_size(args, work, layers, logs, check=not args.no_check and layers == smallest)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    tags = list(res["sizes"])
    if len(tags) >= 2:
        big, small = max(tags, key=lambda t: res["sizes"][t]["checkpoint"]["bytes"]), min(
            tags, key=lambda t: res["sizes"][t]["checkpoint"]["bytes"])
        B, S = res["sizes"][big], res["sizes"][small]
        fl = {f"checkpoint bytes {big}/{small}": ratio(B["checkpoint"]["bytes"], S["checkpoint"]["bytes"])}
        for m in ("stream", "baseline"):
            if m in B["summary"] and m in S["summary"]:
                fl[f"{m} VmHWM {big}/{small}"] = ratio(B["summary"][m]["vm_hwm"], S["summary"][m]["vm_hwm"])
                fl[f"{m} anonymous peak {big}/{small}"] = ratio(B["summary"][m]["peak_anon"], S["summary"][m]["peak_anon"])
                fl[f"{m} wall {big}/{small}"] = ratio(B["summary"][m]["wall_seconds"], S["summary"][m]["wall_seconds"])
        res["flatness"] = fl
    if not args.no_probe:
        res["probe"] = run_probe(args, logs)
    res["settings"]["load1_end"] = load1()
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print()
    print(fmt_table(res))
    print(f"\nwritten {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
