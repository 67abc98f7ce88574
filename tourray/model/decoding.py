"""How the next token is chosen: one `Decoding` config for `tourray generate`, the tour server and
the batch tour writer, so that the same settings give the same text everywhere.

Plain greedy decoding makes small models loop ("a marvel of engineering, a marvel of science, and a
marvel of architecture. It's a marvel of science, ..."). Two deterministic remedies, usable alone or
together, and seeded sampling:

- `repetition_penalty` p (CTRL, Keskar et al. 2019; as transformers and vLLM define it): the logit of
  every token already in the prompt or the text so far is divided by p when positive, multiplied by p
  when negative;
- `no_repeat_ngram_size` n: a token that would repeat an n-gram of the *generated text* is banned
  (the prompt's n-grams are not: a guide may say "Sydney Opera House" after the prompt did);
- `sample`: temperature, top-k and top-p, then one draw per step from a random stream seeded per
  prompt (the Gumbel-max trick: the argmax of logits plus Gumbel noise is a draw from their softmax).

Every rule here looks only at its own row's tokens (left padding never counts, and each row has its
own random stream), so a prompt generates the same tokens alone, in any batch, and streamed. The
processors run inside transformers' `generate(do_sample=False)`: its argmax then picks the token.
Importing this module imports no torch.
"""

from __future__ import annotations

from pydantic import Field

from tourray.config import BaseConfig


class Decoding(BaseConfig):
    """Next-token rule; the defaults are plain greedy decoding (what `tourray generate` always did)."""

    repetition_penalty: float = Field(1.0, ge=1.0, le=3.0, description=(
        "Divide (multiply, when negative) the logit of every token already in the prompt or text by this; "
        "1 = off. 1.1-1.3 breaks loops; higher drifts off topic."))
    no_repeat_ngram_size: int = Field(0, ge=0, le=32, description=(
        "Never repeat an n-gram of the generated text (the prompt's may be repeated); 0 = off. 3-4 stops "
        "loops with little harm to fluency."))
    sample: bool = Field(False, description="Sample instead of taking the most likely token (then temperature, top-k, top-p, seed apply).")
    temperature: float = Field(0.7, gt=0.0, le=5.0, description="Sampling temperature: lower is closer to greedy.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens only; 0 = all.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Sample within the smallest set of tokens whose probability reaches p; 1 = all.")
    seed: int = Field(0, ge=0, description="Seed of each prompt's random stream when sampling: same seed, same text.")

    @property
    def plain_greedy(self) -> bool:
        return not self.sample and self.repetition_penalty == 1.0 and self.no_repeat_ngram_size == 0

    def describe(self) -> str:
        """One line a person can read: what produced a text."""
        parts = ([f"sampling (temperature {self.temperature:g}, top-k {self.top_k or 'all'}, top-p {self.top_p:g}, "
                  f"seed {self.seed})"] if self.sample else ["greedy"])
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition penalty {self.repetition_penalty:g}")
        if self.no_repeat_ngram_size:
            parts.append(f"no repeated {self.no_repeat_ngram_size}-grams")
        return ", ".join(parts)

    def record(self) -> dict:
        """The settings that matter for this rule (sampling knobs only when sampling)."""
        d = self.model_dump(mode="json")
        if not self.sample:
            for k in ("temperature", "top_k", "top_p", "seed"):
                d.pop(k)
        return d


class TourDecoding(Decoding):
    """What a tour guide can live with, the default of `tourray serve` and `tourray tours generate`:
    deterministic, and SmolLM2-135M-Instruct no longer loops (greedy alone repeats whole sentences; no
    repeated 3-grams alone still echoes the prompt; a penalty of 1.2-1.3 alone drifts off topic: see
    docs/serve.md)."""

    repetition_penalty: float = Field(1.1, ge=1.0, le=3.0, description=Decoding.model_fields["repetition_penalty"].description)
    no_repeat_ngram_size: int = Field(4, ge=0, le=32, description=Decoding.model_fields["no_repeat_ngram_size"].description)


TOUR_DECODING = TourDecoding()


def add_decoding_flags(p, defaults: Decoding | None = None) -> None:
    """`--repetition-penalty`, `--no-repeat-ngram-size`, `--sample`, `--temperature`, `--top-k`, `--top-p`,
    `--seed` on a command that is not config-backed (read them back with `decoding_from_args`)."""
    import argparse

    d = defaults or Decoding()
    for name, field in Decoding.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(d, name)
        help_ = f"{field.description} (default: {default})".replace("%", "%%")
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            p.add_argument(flag, type=field.annotation, default=argparse.SUPPRESS, metavar=name.split("_")[-1].upper(),
                           help=help_)


def decoding_from_args(args, defaults: Decoding | None = None) -> Decoding:
    given = {k: v for k, v in vars(args).items() if k in Decoding.model_fields}
    base = (defaults or Decoding()).model_dump()
    return Decoding.parse({**base, **given})


# -- the processors (torch) ------------------------------------------------------------------
def logits_processors(dec: Decoding, starts: list[int], width: int, seeds: list[int] | None = None):
    """A transformers `LogitsProcessorList` for a left-padded batch: row r's prompt starts at column
    `starts[r]`, generated tokens at column `width`; `seeds[r]` seeds row r's random stream. Empty for
    plain greedy decoding."""
    from transformers import LogitsProcessorList

    procs = []
    if dec.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(dec.repetition_penalty, starts))
    if dec.no_repeat_ngram_size:
        procs.append(NoRepeatGeneratedNgram(dec.no_repeat_ngram_size, width))
    if dec.sample:
        seeds = seeds if seeds is not None else [dec.seed] * len(starts)
        procs.append(SeededSample(dec.temperature, dec.top_k, dec.top_p, seeds))
    return LogitsProcessorList(procs)


class RepetitionPenalty:
    """transformers' RepetitionPenaltyLogitsProcessor over each row's own tokens (not its padding)."""

    def __init__(self, penalty: float, starts: list[int]):
        self.penalty, self.starts = penalty, starts

    def __call__(self, input_ids, scores):
        import torch

        for r, s in enumerate(self.starts):
            ids = input_ids[r, s:]
            got = scores[r].gather(0, ids)
            scores[r].scatter_(0, ids, torch.where(got < 0, got * self.penalty, got / self.penalty))
        return scores


class NoRepeatGeneratedNgram:
    """Ban each token that would complete an n-gram already in the row's generated text."""

    def __init__(self, n: int, width: int):
        self.n, self.width = n, width

    def __call__(self, input_ids, scores):
        n = self.n
        for r in range(input_ids.shape[0]):
            gen = input_ids[r, self.width:].tolist()
            if len(gen) < n:
                continue
            prefix = gen[len(gen) - n + 1:] if n > 1 else []
            banned = {gen[i + n - 1] for i in range(len(gen) - n + 1) if gen[i:i + n - 1] == prefix}
            if banned:
                scores[r, sorted(banned)] = float("-inf")
        return scores


class SeededSample:
    """Temperature, top-k, top-p, then Gumbel noise from row r's own generator (seeded `seeds[r]`):
    the argmax transformers takes next is then a draw from the filtered softmax."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seeds: list[int]):
        import torch

        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature
        vocab = scores.shape[-1]
        if 0 < self.top_k < vocab:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_, idx = scores.sort(dim=-1, descending=True)
            cum = sorted_.softmax(-1).cumsum(-1)
            drop = cum - sorted_.softmax(-1) >= self.top_p  # keep up to and including the token reaching p
            scores = scores.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
        out = torch.empty_like(scores)
        for r, g in enumerate(self.gens):
            u = torch.rand(vocab, generator=g, dtype=torch.float64).clamp_(1e-20, 1.0)
            out[r] = scores[r] - torch.log(-torch.log(u)).to(device=scores.device, dtype=scores.dtype)
        return out
