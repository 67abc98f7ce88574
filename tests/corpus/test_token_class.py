"""Token classes: the documented word rule, and every captured text token classed by it."""

from __future__ import annotations

import numpy as np

from tourray.corpus.token_class import classify, word_classes
from tourray.corpus.token_class import _WORD


def words(text):
    _, classes = word_classes(text)
    return [(m.group(), c) for m, c in zip(_WORD.finditer(text), classes)]


def test_word_rule():
    text = ("The Sydney Opera House opened in 1973. Its 1,056,006 tiles came from Sweden.\n"
            "Locals call it \"the Coathanger\". \"Xi'an's Bell Tower\" rose in 1384; at 10:30 it rings.")
    got = dict(words(text))
    assert got["The"] == "word" and got["Its"] == "word" and got["Locals"] == "word"  # sentence / line starts
    assert got["Sydney"] == got["Opera"] == got["Sweden"] == got["Coathanger"] == "proper"
    assert got["1973"] == got["1,056,006"] == got["1384"] == got["10:30"] == "number"
    assert got["Xi'an's"] == "word"  # opens a sentence behind a quote
    assert got["Bell"] == "proper" and got["opened"] == "word"


def test_tokens_take_their_words_class():
    text = "In Sydney, 1973."
    # tokens: "In" " Syd" "ney" "," " 19" "73" "." and one template token (-1)
    spans = [(0, 2), (2, 6), (6, 9), (9, 10), (10, 13), (13, 15), (15, 16), (-1, -1)]
    cs, ce = (np.array(x) for x in zip(*spans))
    assert classify(text, cs, ce) == ["word", "proper", "proper", "punct", "number", "number", "punct", None]
