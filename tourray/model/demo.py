"""An offline model whose analyses mean something: a small Qwen3 trained on the tour-guide corpus.

Nothing can be downloaded here, so the demo (and the tests, at a smaller size) build a byte-level
BPE tokenizer with `tokenizers` on local text and a `Qwen3ForCausalLM` from a config, train it
briefly, and save a standard Hugging Face checkpoint that `AutoModelForCausalLM` and vLLM load.
The checkpoint folder is keyed by a hash of its settings and training texts, so it is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

from pydantic import Field

from tourray.corpus import texts as corpus
from tourray.config import BaseConfig

log = logging.getLogger("tourray")


class DemoModelConfig(BaseConfig):
    """Size and training of the demo model. Every field is a `tourray demo-model` flag."""

    samples: str = Field("samples", description="Corpus root: trains on <samples>/train, reports on <samples>/eval/*.")
    out: str = Field(".cache/demo-model", description="Checkpoint folder; reused when its recorded settings and training texts match, else retrained.")
    layers: int = Field(8, gt=0, description="Decoder blocks.")
    hidden_size: int = Field(256, gt=0, description="Residual width.")
    head_dim: int = Field(64, description="Per-head width; vLLM's CPU attention accepts 64 or 128.")
    kv_heads: int = Field(2, gt=0, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(768, gt=0, description="MLP width.")
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary trained on the corpus.")
    seq_len: int = Field(256, gt=8, description="Training sequence length (texts are packed).")
    steps: int = Field(300, ge=0, description="Optimiser steps (0 = untrained).")
    batch_size: int = Field(8, gt=0, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (cosine decay, 5% warm-up).")
    seed: int = Field(0, description="Seed for weights and data order: same seed, same checkpoint.")
    threads: int | None = Field(None, gt=0, description="torch threads; default all cores.")


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|bos|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def qwen3(cfg: DemoModelConfig, vocab_size: int, bos: int, eos: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(cfg.seed)
    heads = max(1, cfg.hidden_size // cfg.head_dim)
    mc = Qwen3Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers, num_attention_heads=heads, num_key_value_heads=min(cfg.kv_heads, heads),
        head_dim=cfg.head_dim, max_position_embeddings=max(2048, cfg.seq_len), tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, rope_theta=10000.0,
    )
    return Qwen3ForCausalLM(mc)


def settings_hash(cfg: DemoModelConfig, texts: list[str]) -> str:
    keep = cfg.model_dump(exclude={"out", "samples", "threads"})
    h = hashlib.sha256(json.dumps(keep, sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:12]


def perplexity(model, tok, texts: list[str], max_length: int = 512) -> float:
    """exp(mean next-token loss) over all predicted tokens of `texts` (each with a leading bos)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor([[tok.bos_token_id] + tok(t)["input_ids"][: max_length - 1]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(total / count)


def build_demo_model(cfg: DemoModelConfig) -> Path:
    """Train (or reuse) the demo model; print its perplexity table; return the checkpoint folder."""
    import torch

    train = [s.text for s in corpus.load_samples(Path(cfg.samples) / "train")[0]]
    out, key = Path(cfg.out), settings_hash(cfg, train)
    meta = out / "tourray_demo.json"
    recorded = json.loads(meta.read_text()) if meta.exists() else {}
    if recorded.get("settings_hash") == key and "eval_perplexity" in recorded:
        log.info("demo model: reusing %s (settings %s)", out, key)
    else:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        tok = train_tokenizer(train, cfg.vocab_size)
        model = qwen3(cfg, len(tok), tok.bos_token_id, tok.eos_token_id)
        sets = eval_sets(cfg.samples)
        untrained = {k: perplexity(model, tok, v) for k, v in sets.items()}
        losses = train_lm(model, tok, train, cfg)
        seconds = time.perf_counter() - t0
        table = {k: dict(uniform=float(len(tok)), untrained=untrained[k], trained=perplexity(model, tok, v))
                 for k, v in sets.items()}
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tourray_demo.json").write_text(json.dumps(dict(
            settings_hash=key, settings=cfg.model_dump(), final_loss=losses[-1] if losses else None,
            train_seconds=round(seconds, 1), eval_perplexity=table), indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log.info("demo model: trained %d steps in %.0f s -> %s", cfg.steps, seconds, out)
    table = json.loads(meta.read_text())["eval_perplexity"]
    print(f"perplexity of the demo model ({out}) on the held-out sets:")
    print(f"  {'eval set':<18}{'uniform':>10}{'untrained':>12}{'trained':>10}")
    for k, r in table.items():
        print(f"  {k:<18}{r['uniform']:>10.0f}{r['untrained']:>12.1f}{r['trained']:>10.1f}")
    return out


def eval_sets(samples: str) -> dict[str, list[str]]:
    root = Path(samples) / "eval"
    return {d.name: [s.text for s in corpus.load_samples(d)[0]] for d in sorted(root.iterdir()) if d.is_dir()}


def train_lm(model, tok, texts: list[str], cfg: DemoModelConfig) -> list[float]:
    """Next-token training on the packed corpus: AdamW, cosine schedule, fixed seed."""
    import torch
    from tqdm import tqdm

    if cfg.steps == 0:
        return []
    g = torch.Generator().manual_seed(cfg.seed)
    stream = []
    for t in texts:
        stream += [tok.bos_token_id] + tok(t)["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(stream)
    n = len(data) - cfg.seq_len - 1
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="train demo model", unit="step", dynamic_ncols=True)
    for _ in bar:
        starts = torch.randint(0, n, (cfg.batch_size,), generator=g)
        batch = torch.stack([data[s : s + cfg.seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


