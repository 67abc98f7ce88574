"""The next-token rules (`tourray.model.decoding`): the repetition penalty equals transformers' on each
row's own tokens, no-repeat n-grams look at the generated text only, seeded sampling draws from the
filtered softmax with one random stream per prompt; every rule gives a prompt the same tokens alone
and in any batch; `tourray generate`'s flags and their refusals."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import chatty_copy, one_torch_thread
from tourray.errors import UserError
from tourray.model.decoding import TOUR_DECODING, Decoding, NoRepeatGeneratedNgram, RepetitionPenalty, SeededSample, logits_processors

PROMPTS = ["Tell me about the Opera House.", "Hi", "When was the Bell Tower in Xi'an built, and why was it moved?", "x"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def gen(llama_model, tmp_path_factory):
    """A Generator over a copy of the Llama fixture with larger random weights (it talks)."""
    from tourray.model.generate import Generator

    out = chatty_copy(llama_model, tmp_path_factory.mktemp("chatty-decoding"), 4)
    return Generator(str(out), "You are a guide.")


def test_defaults_are_plain_greedy_and_tour_decoding_is_not():
    assert Decoding().plain_greedy and len(logits_processors(Decoding(), [0], 3)) == 0
    assert not TOUR_DECODING.plain_greedy and TOUR_DECODING.sample is False
    assert TOUR_DECODING.describe() == "greedy, repetition penalty 1.1, no repeated 4-grams"
    assert Decoding(sample=True, seed=3).describe().startswith("sampling (temperature 0.7, top-k all, top-p 0.9, seed 3)")
    assert set(TOUR_DECODING.record()) == {"repetition_penalty", "no_repeat_ngram_size", "sample"}


def test_repetition_penalty_equals_transformers_on_each_rows_own_tokens():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    rows = [torch.randint(0, 50, (n,)) for n in (7, 3, 5)]
    width = 7
    pad = 49
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    scores = torch.randn(3, 50)
    got = RepetitionPenalty(1.3, [width - len(r) for r in rows])(ids, scores.clone())
    for i, r in enumerate(rows):
        want = RepetitionPenaltyLogitsProcessor(1.3)(r[None], scores[i:i + 1].clone())[0]
        torch.testing.assert_close(got[i], want)
    assert got[1, pad] == scores[1, pad] or pad in rows[1].tolist()  # padding is not penalised


def test_no_repeat_ngram_bans_only_repeats_of_the_generated_text():
    width = 4
    prompt = [5, 6, 7, 8]                        # the prompt's 2-grams (5,6) (6,7) (7,8) are allowed again
    gen = [1, 2, 3, 1, 2, 1]                      # generated: 2-grams 1->2, 2->3, 3->1; last token 1
    ids = torch.tensor([prompt + gen])
    out = NoRepeatGeneratedNgram(2, width)(ids, torch.zeros(1, 10))
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [2]  # only 1 -> 2 again
    out = NoRepeatGeneratedNgram(3, width)(ids, torch.zeros(1, 10))  # (2, 1) -> was never followed: nothing
    assert not torch.isinf(out).any()
    ids = torch.tensor([prompt + [5, 6]])
    assert not torch.isinf(NoRepeatGeneratedNgram(2, width)(ids, torch.zeros(1, 10))).any()  # 6 -> 7 was the prompt's


def test_seeded_sampling_draws_from_the_filtered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 6000
    counts = torch.zeros(6)
    proc = SeededSample(1.0, 0, 1.0, [123])
    for _ in range(n):
        counts[int(proc(None, logits.clone()).argmax())] += 1
    p = logits.softmax(-1)[0]
    for k in range(6):  # within 5 standard errors of the softmax
        assert abs(counts[k] / n - p[k]) < 5 * math.sqrt(p[k] * (1 - p[k]) / n) + 1e-3, (k, counts, p)
    drawn = {int(SeededSample(1.0, 2, 1.0, [s])(None, logits.clone()).argmax()) for s in range(200)}
    assert drawn == {0, 1}  # top-k 2
    drawn = {int(SeededSample(1.0, 0, 0.6, [s])(None, logits.clone()).argmax()) for s in range(200)}
    assert drawn == {0, 1}  # top-p 0.6: p0 = 0.57 < 0.6, so the second token is kept too
    a = [int(SeededSample(0.8, 0, 0.9, [7])(None, logits.clone()).argmax()) for _ in range(1)]
    assert a == [int(SeededSample(0.8, 0, 0.9, [7])(None, logits.clone()).argmax())]


@pytest.mark.parametrize("dec", [TOUR_DECODING, Decoding(no_repeat_ngram_size=2), Decoding(repetition_penalty=1.5),
                                 Decoding(sample=True, seed=11, temperature=1.0), Decoding(sample=True, top_k=5, top_p=0.8, seed=2)],
                         ids=["tour", "ngram2", "penalty", "sample", "sample-topk-topp"])
def test_batched_equals_one_at_a_time(gen, dec):
    alone = [gen([p], 12, batch_size=1, decoding=dec)[0] for p in PROMPTS]
    assert len({tuple(r["token_ids"]) for r in alone}) == len(PROMPTS)
    assert gen(PROMPTS, 12, batch_size=4, decoding=dec) == alone
    if dec.no_repeat_ngram_size:
        n = dec.no_repeat_ngram_size
        for r in alone:
            grams = [tuple(r["token_ids"][i:i + n]) for i in range(len(r["token_ids"]) - n + 1)]
            assert len(grams) == len(set(grams))


def test_the_decodings_change_the_text_and_the_seed_decides(gen, llama_model):
    from tourray.model.generate import Generator

    looping = Generator(str(llama_model))  # the fixture's own weights: greedy repeats tokens
    greedy = looping(PROMPTS[:1], 12)[0]["token_ids"]
    bigrams = list(zip(greedy, greedy[1:]))
    assert len(set(bigrams)) < len(bigrams)
    for dec in (Decoding(no_repeat_ngram_size=2), Decoding(repetition_penalty=3.0), TOUR_DECODING):
        assert looping(PROMPTS[:1], 12, decoding=dec)[0]["token_ids"] != greedy, dec
    s1 = gen(PROMPTS[:2], 16, decoding=Decoding(sample=True, seed=1))
    assert s1 == gen(PROMPTS[:2], 16, decoding=Decoding(sample=True, seed=1)) != gen(PROMPTS[:2], 16, decoding=Decoding(sample=True, seed=2))
    per_prompt = gen(PROMPTS[:2], 16, decoding=Decoding(sample=True), seeds=[1, 1])
    assert per_prompt == s1


def test_generate_flags_and_their_refusals(gen, tmp_path, capsys):
    from tourray.cli import main

    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    model = gen.model.name_or_path
    base = ["-q", "generate", "--model", model, "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "8"]
    assert main(base + ["--sample", "--seed", "4", "--top-k", "20", "--out", str(tmp_path / "o.jsonl")]) == 0
    import json

    row = json.loads((tmp_path / "o.jsonl").read_text())
    want = gen.__class__(model)([PROMPTS[0]], 8, decoding=Decoding(sample=True, seed=4, top_k=20))[0]
    assert row["token_ids"] == want["token_ids"]
    for flags, words in ((["--repetition-penalty", "0.5"], "--repetition-penalty"), (["--temperature", "0"], "--temperature"),
                         (["--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size"), (["--top-p", "1.5"], "--top-p")):
        capsys.readouterr()
        assert main(base + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, err
    with pytest.raises(SystemExit):
        main(base + ["--seed", "x"])
    with pytest.raises(UserError, match="--max-new-tokens"):
        gen(PROMPTS, 0, decoding=TOUR_DECODING)
