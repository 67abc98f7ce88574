"""The shipped tour-guide corpus: index in sync, held-out sets really held out, sizes as promised."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from conftest import REPO
from tourray.corpus.texts import check_index, load_samples, read_index

SAMPLES = REPO / "samples"
EVAL_SETS = ("seen_cities", "unseen_similar", "unseen_different", "edge_cases")


def sentences(text: str) -> set[str]:
    parts = re.split(r"(?<=[.!?。！？])\s*", text)
    return {" ".join(p.split()).lower() for p in parts if len(p.split()) >= 4 or len(p) >= 12}


@pytest.fixture(scope="module")
def index():
    return read_index(SAMPLES)


def test_index_matches_files():
    assert check_index(SAMPLES) == []


def test_sizes_and_languages(index):
    splits = Counter(r["category"] for r in index.values())
    assert splits["train"] >= 200
    for s in EVAL_SETS:
        assert splits[s] >= 12, s
    train = [r for r in index.values() if r["split"] == "train"]
    assert sum(r["language"] == "zh" for r in train) >= 20
    cities = Counter(r["city"] for r in train)
    assert cities["sydney"] + cities["xian"] > len(train) / 2  # mostly Sydney and Xi'an
    assert {r["city"] for r in index.values() if r["category"] == "unseen_similar"} == {"melbourne", "beijing"}
    assert {r["city"] for r in index.values() if r["category"] == "unseen_different"} == {"new-york", "barcelona"}
    assert {r["city"] for r in index.values() if r["category"] == "edge_cases"} == {"reykjavik", "dubai"}
    assert {r["city"] for r in index.values() if r["category"] == "seen_cities"} == {"sydney", "xian"}


def test_lengths():
    for s in load_samples(SAMPLES)[0]:
        if re.search(r"[\u4e00-\u9fff]", s.text):
            n = len(re.findall(r"[\u4e00-\u9fff]", s.text))
            assert 150 <= n <= 400, (s.source, n)  # Chinese: characters
        else:
            assert 80 <= len(s.text.split()) <= 200, s.source  # English: words


def test_no_eval_sentence_in_train():
    train = set().union(*(sentences(s.text) for s in load_samples(SAMPLES / "train")[0]))
    for s in load_samples(SAMPLES / "eval")[0]:
        shared = sentences(s.text) & train
        assert not shared, (s.source, sorted(shared)[:2])


def test_system_prompt_present():
    text = (SAMPLES / "system_prompt.md").read_text(encoding="utf-8")
    assert "tour guide" in text and len(text.split()) > 50
