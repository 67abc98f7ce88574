"""Greedy generation with a model's chat template and system prompt: "does it still talk?".

The prompt is rendered exactly as capture renders it (the same `PromptFormat`: system prompt,
template choice, verbatim check), but as `[system, user: <prompt>]` with the generation prompt
appended, so the model speaks the assistant turn. Without a chat template the plain format is
`<bos?><system prompt>\\n\\n<prompt>\\n` (just `<bos?><prompt>\\n` with no system prompt).

Batches are left-padded, so a batch generates the same tokens as one prompt at a time. float32 on
CPU, `torch.inference_mode()`. The next-token rule is a `Decoding` (`tourray.model.decoding`): plain
greedy by default, or a repetition penalty, no repeated n-grams, or seeded sampling (`--repetition-penalty`,
`--no-repeat-ngram-size`, `--sample --seed`); the tour server uses the same rule, so its text for a
prompt equals this command's. Importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from tourray.errors import UserError
from tourray.model.decoding import Decoding, add_decoding_flags, decoding_from_args

log = logging.getLogger("tourray")

EPILOG = """examples:
  tourray generate --model .cache/smollm2-135m-instruct --prompts prompts.txt --system-prompt samples/system_prompt.md
  tourray generate --model ckpt/pruned-3-4 --prompts prompts.txt --max-new-tokens 96 --out pruned-3-4.jsonl
  tourray generate --model .cache/smollm2-135m-instruct --prompts prompts.txt --repetition-penalty 1.1 --no-repeat-ngram-size 4
  tourray generate --model .cache/smollm2-135m-instruct --prompts prompts.txt --sample --temperature 0.7 --seed 3

prompts.txt: one prompt per line (UTF-8); blank lines and lines starting with # are skipped."""


# -- inputs ----------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 file; blank lines and `#` comment lines skipped."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"--prompts: {p} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"--prompts: {p} is a folder, not a file") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    prompts = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"--prompts: {p} line {n} is not UTF-8") from None
        if line and not line.startswith("#"):
            prompts.append(line)
    if not prompts:
        raise UserError(f"--prompts: {p} has no prompts (one per line; blank lines and # comments are skipped)")
    return prompts


def generation_prompt(fmt, user_text: str) -> str:
    """`[system, user: user_text]` rendered by `fmt` (a PromptFormat) with the generation prompt
    appended; the plain format `<bos?><system>\\n\\n<user_text>\\n` without a chat template."""
    if not fmt.chat:
        bos = fmt.tok.bos_token or ""
        return bos + (f"{fmt.system_prompt}\n\n" if fmt.system_prompt else "") + user_text + "\n"
    msgs = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    msgs.append({"role": "user", "content": user_text})
    return fmt.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# -- the generator ---------------------------------------------------------------------------
class Generator:
    """A model and its prompt format, loaded once; `__call__` generates for a list of prompts."""

    def __init__(self, model_dir: str, system_prompt: str = "", chat_template: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tourray.model.identity import require_folder
        from tourray.model.prompt import PromptFormat

        model_dir = str(model_dir)
        require_folder("--model", model_dir)
        try:
            tok = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise UserError(f"--model: cannot load a model and tokenizer from {model_dir!r}: "
                            f"{str(e).splitlines()[0]}") from None
        self.torch = torch
        self.model.eval()
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.fmt = PromptFormat(tok, system_prompt=system_prompt, use_chat_template=chat_template)
        self.tok = tok
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids = sorted(set(eos) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))

    def render(self, prompt: str) -> str:
        return generation_prompt(self.fmt, prompt)

    def encode(self, prompt: str) -> list[int]:
        # the rendered text already holds bos and template tokens, as capture's encoding does
        return self.tok(self.render(prompt), add_special_tokens=False)["input_ids"]

    def __call__(self, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
                 decoding: Decoding | None = None, seeds: list[int] | None = None) -> list[dict]:
        """`seeds[i]`: prompt i's random stream when `decoding.sample` (default: `decoding.seed` for all)."""
        check_limits(max_new_tokens, batch_size)
        ids = [self.encode(p) for p in prompts]
        seeds = seeds if seeds is not None else [(decoding or Decoding()).seed] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        out: list[dict | None] = [None] * len(prompts)
        for s in range(0, len(order), batch_size):
            chunk = order[s: s + batch_size]
            new = self.generate_ids([ids[i] for i in chunk], max_new_tokens, decoding, [seeds[i] for i in chunk])
            for i, n in zip(chunk, new):
                out[i] = self._result(prompts[i], n)
        return out

    def generate_ids(self, batch: list[list[int]], max_new_tokens: int, decoding: Decoding | None = None,
                     seeds: list[int] | None = None, streamer=None, stopping_criteria=None) -> list[list[int]]:
        """New token ids (eos and whatever follows it included) for a batch of encoded prompts, left-padded
        into one `generate` call. `streamer`: a transformers streamer; `stopping_criteria`: extra
        transformers stopping criteria (e.g. a cancelled request)."""
        from tourray.model.decoding import logits_processors

        torch = self.torch
        decoding = decoding or Decoding()
        width = max(map(len, batch))
        pad = self.tok.pad_token_id
        device = self.model.device
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], dtype=torch.long, device=device)
        procs = logits_processors(decoding, [width - len(x) for x in batch], width, seeds)
        with torch.inference_mode():
            seqs = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad,
                                       eos_token_id=self.eos_ids or None, temperature=None, top_p=None, top_k=None,
                                       repetition_penalty=None, no_repeat_ngram_size=None,
                                       logits_processor=procs, streamer=streamer,
                                       stopping_criteria=stopping_criteria)
        return seqs[:, width:].tolist()

    def result(self, prompt: str, new: list[int]) -> dict:
        """{"prompt", "text", "n_new_tokens", "stopped", "token_ids"} of one prompt's new tokens."""
        return self._result(prompt, new)

    def _result(self, prompt: str, new: list[int]) -> dict:
        stop = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
        kept = new if stop is None else new[: stop + 1]       # eos counts as a generated token
        text_ids = kept if stop is None else kept[:-1]
        return {"prompt": prompt, "text": self.tok.decode(text_ids, skip_special_tokens=True),
                "n_new_tokens": len(kept), "stopped": stop is not None, "token_ids": kept}


def generate(model_dir: str, prompts: list[str], system_prompt: str = "", max_new_tokens: int = 64,
             batch_size: int = 8, chat_template: bool = True, decoding: Decoding | None = None) -> list[dict]:
    """Continuations of `prompts` (greedy unless `decoding` says otherwise), in order: per prompt
    {"prompt", "text", "n_new_tokens" (eos included when hit), "stopped" (eos hit), "token_ids" (the new tokens)}."""
    return Generator(model_dir, system_prompt, chat_template)(prompts, max_new_tokens, batch_size, decoding)


def check_limits(max_new_tokens: int, batch_size: int = 1) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be at least 1, not {max_new_tokens}")
    if batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, not {batch_size}")


# -- the report section ----------------------------------------------------------------------
def _quote(text: str) -> str:
    if not text.strip():
        return "> _(empty)_"
    return "\n".join("> " + line if line.strip() else ">" for line in text.splitlines())


def side_by_side(results: dict[str, list[dict]], title: str = "Generations") -> str:
    """Markdown: per prompt a heading, then one blockquoted block per variant (`original` first,
    then the dict's order). Prompts follow the first variant's order; a variant without a result
    for a prompt shows `(no output)`. Blockquotes keep any ``` in a text inside its own block."""
    names = sorted(results, key=lambda n: n != "original")  # stable: original first, others as given
    prompts: list[str] = []
    for name in names:
        for r in results[name]:
            if r["prompt"] not in prompts:
                prompts.append(r["prompt"])
    by = {name: {r["prompt"]: r for r in reversed(results[name])} for name in names}
    lines = [f"## {title}", ""]
    for n, prompt in enumerate(prompts, 1):
        lines += [f"### {n}. {' '.join(prompt.split())}", ""]
        for name in names:
            r = by[name].get(prompt)
            if r is None:
                lines += [f"**{name}**", "", "> _(no output)_", ""]
                continue
            how = "stopped at eos" if r.get("stopped") else "cut at max tokens"
            lines += [f"**{name}** ({r.get('n_new_tokens', '?')} tokens, {how})", "", _quote(r["text"]), ""]
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from tourray.corpus.texts import read_system_prompt

    prompts = read_prompts(args.prompts)
    system = read_system_prompt(args.system_prompt)
    t0 = time.perf_counter()
    decoding = decoding_from_args(args)
    check_limits(args.max_new_tokens, args.batch_size)
    gen = Generator(args.model, system, chat_template=not args.no_chat_template)
    t1 = time.perf_counter()
    results = gen(prompts, args.max_new_tokens, args.batch_size, decoding)
    t2 = time.perf_counter()
    tokens = sum(r["n_new_tokens"] for r in results)
    log.info("generate: %d prompt(s), %d new tokens in %.1f s (%.1f tokens/s; model load %.1f s; %s)",
             len(results), tokens, t2 - t1, tokens / max(t2 - t1, 1e-9), t1 - t0, decoding.describe())
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps({"model": str(args.model), **r}, ensure_ascii=False) + "\n")
        print(f"wrote {len(results)} generation(s) to {out}")
        return 0
    for r in results:
        how = "stopped at eos" if r["stopped"] else f"cut at --max-new-tokens {args.max_new_tokens}"
        print(f"### {r['prompt']}\n{r['text']}\n({r['n_new_tokens']} tokens, {how})\n")
    return 0


def add_parser(command) -> argparse.ArgumentParser:
    """Add `tourray generate`; `command(name, fn, help)` is `tourray.cli.parser`'s helper."""
    p = command("generate", cmd_generate, "Generation with the model's chat template and system prompt, one prompt "
                                          "per line (greedy unless told otherwise): does a (pruned) model still talk?")
    p.epilog = EPILOG
    p.add_argument("--model", required=True, metavar="DIR", help="Checkpoint folder (or hub id) to generate with.")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="UTF-8 file, one prompt per line; blank lines and lines starting with # are skipped.")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="Most new tokens per prompt (default: 64).")
    p.add_argument("--system-prompt", metavar="FILE", help="System prompt file, as for capture (default: none).")
    p.add_argument("--no-chat-template", action="store_true",
                   help="Use the plain format <bos><system>\\n\\n<prompt>\\n even when the tokenizer has a chat template.")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="Prompts per batch, left-padded (default: 8).")
    p.add_argument("--out", metavar="FILE.jsonl", help="Write one JSON object per prompt here instead of printing.")
    add_decoding_flags(p)
    return p
