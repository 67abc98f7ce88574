#!/usr/bin/env python
"""Heal benchmark: is reading the lake what `tourray heal` waits for?

One invocation, so every ratio compares figures taken under the same machine load:

  lake        a teacher capture of --texts training texts with --logits K (tokens only) into a fresh lake
              under bench/out/heal/ (reused when present), on the model given (default: a random Qwen3
              of hidden 512, 8 blocks; --model DIR for a real checkpoint with its tokenizer).
  in-memory   the same training step as the heal's (HealObjective + AdamW + clipping, one process, the
              same threads), on batches read from the lake and collated BEFORE timing: tokens/s of
              --steps steps after one warm-up step.
  heal        `tourray heal` (Ray Train, 1 worker) for --steps steps with the same batch size: tokens/s
              from heal_log (the median over steps 2..N: each step's time includes waiting for its batch).
  bytes       bytes on disk per text token of the logits table, against activations (the same texts,
              both sites of every layer at float16, from the model's width and depth).

Usage:  .venv/bin/python bench/bench_heal.py [--model DIR] [--texts 40] [--steps 12] [--batch-size 4] [--logits 64]
Writes bench/out/heal/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "heal"


def random_model(folder: Path) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tourray.corpus.texts import load_samples
    from tourray.model.demo import train_tokenizer

    if (folder / "config.json").is_file():
        return folder
    texts = [s.text for s in load_samples(REPO / "samples" / "train")[0]]
    tok = train_tokenizer(texts, 4096)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Checkpoint folder (default: a random Qwen3, hidden 512, 8 blocks).")
    p.add_argument("--texts", type=int, default=40)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--logits", default="64")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig

    from tourray.capture import CaptureConfig, run_capture
    from tourray.corpus.texts import load_samples
    from tourray.heal import data
    from tourray.heal.config import HealConfig
    from tourray.heal.losses import HealObjective
    from tourray.heal.train import load_student, run_heal
    from tourray.lake.tables import Lake

    OUT.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else random_model(OUT / "model")
    include = [s.source for s in load_samples(REPO / "samples" / "train")[0]][: args.texts]
    include = [f"train/{s}" for s in include]
    lake = OUT / "lake"
    run = f"teach-{args.texts}-{args.logits.replace(':', '')}"
    t0 = time.perf_counter()
    run_capture(CaptureConfig(model=str(model), samples=str(REPO / "samples"), include=include, lake=str(lake), run=run,
                              layers="none", logits=args.logits, system_prompt=str(REPO / "samples" / "system_prompt.md"),
                              batch_size=8, group_size=16), progress=False)
    capture_s = time.perf_counter() - t0
    cfg = HealConfig(student=str(model), teacher_run=f"{lake}:{run}", out=str(OUT / "healed"), max_steps=args.steps,
                     batch_size=args.batch_size, eval_every=args.steps, patience=0, threads=args.threads,
                     val_fraction=0.1, eval_samples=None, run="bench")
    teacher = data.open_teacher(Lake(str(lake)), run)
    train, _ = data.split(teacher.samples, cfg.val_fraction)
    items = data.schedule(train, args.steps * args.batch_size + args.batch_size, cfg.seed)
    import pyarrow as pa

    rows = data.read_samples(pa.Table.from_pylist(items), teacher.lake.root, None, run, teacher.versions).to_pylist()
    batches = [data.collate(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    torch.set_num_threads(args.threads)
    student = load_student(cfg)
    obj = HealObjective(student, cfg.alpha, cfg.temperature, cfg.chunk_positions)
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    times = []
    for b in batches:
        t = time.perf_counter()
        loss, _, _ = obj(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append((b.n_tokens, time.perf_counter() - t))
    steady = times[1:]
    mem_tps = sum(n for n, _ in steady) / sum(s for _, s in steady)
    del student, obj, opt
    shutil.rmtree(OUT / "healed", ignore_errors=True)
    t = time.perf_counter()
    run_heal(cfg, progress=False)
    heal_s = time.perf_counter() - t
    log = Lake(str(lake)).read("heal_log", filter="run = 'bench'").sort_by("step").to_pylist()
    heal_tps = statistics.median(r["tokens_per_s"] for r in log if r["step"] >= 2)
    tc = AutoConfig.from_pretrained(model).get_text_config()
    n_text = Lake(str(lake)).dataset("logits").count_rows(filter=f"run = '{run}'")
    logit_bytes = sum(os.path.getsize(f) for f in glob.glob(str(lake / "logits.lance" / "data" / "*")))
    rows_all = Lake(str(lake)).dataset("logits").count_rows()
    res = dict(machine=f"{platform.machine()} {os.cpu_count()} cores", python=sys.version.split()[0], torch=torch.__version__,
               model=str(model), hidden=tc.hidden_size, layers=tc.num_hidden_layers, vocab=tc.vocab_size, texts=args.texts,
               text_tokens=n_text, logits=args.logits, capture_s=round(capture_s, 1), steps=args.steps, batch_size=args.batch_size,
               in_memory_tokens_per_s=round(mem_tps, 1), heal_tokens_per_s=round(heal_tps, 1),
               ratio=round(heal_tps / mem_tps, 3), heal_wall_s=round(heal_s, 1),
               logits_bytes_per_token=round(logit_bytes / max(rows_all, 1), 1),
               activations_bytes_per_token_fp16_both_sites=2 * tc.hidden_size * (2 * tc.num_hidden_layers + 1),
               dense_fp16_bytes_per_token=2 * tc.vocab_size)
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    for k, v in res.items():
        print(f"{k:45} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
