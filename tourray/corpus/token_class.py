"""A class for every text token, so that "factual tokens" are a SQL filter (`token_class IN
('number', 'proper')`), the seeds' measure of whether a pruned tour guide still knows its facts.

The rule works on words of the text, not on tokens, so that every piece of a word split by the
tokenizer gets the word's class:

- a word is a maximal run of letters and digits, with inner apostrophes, hyphens, commas, points
  and colons kept when a letter or digit follows (`Xi'an`, `1,056,006`, `3.5`, `10:30`);
- `number`: the word holds a digit (years, counts, dates, measurements);
- `proper`: the word starts with an upper-case letter and does not start a sentence, i.e. what comes
  before it (skipping spaces, tabs, quotes, brackets and dashes, so a bullet's first word starts one)
  is not the start of the text, a line break, or one of `.`, `!`, `?`, `:`;
- `word`: any other word;
- `punct`: a token that overlaps no word (punctuation, spaces, symbols).

A token takes the class of the first word its character span overlaps. Tokens outside the text
(system prompt, chat template) have no class (null).
"""

from __future__ import annotations

import re

import numpy as np

CLASSES = ("number", "proper", "word", "punct")
_WORD = re.compile(r"[^\W_]+(?:['’\-.,:][^\W_]+)*")
_SENTENCE_END = set(".!?:\n\r")
_SKIP_BACK = set(" \t\"'“”‘’«»([{—–-")


def word_classes(text: str) -> tuple[np.ndarray, list[str]]:
    """Per character of `text`, the index of the word it belongs to (-1 outside words), and each
    word's class."""
    owner = np.full(len(text), -1, np.int32)
    classes = []
    for i, m in enumerate(_WORD.finditer(text)):
        a, b = m.span()
        owner[a:b] = i
        w = m.group()
        if any(c.isdigit() for c in w):
            classes.append("number")
        elif w[0].isupper() and not _starts_sentence(text, a):
            classes.append("proper")
        else:
            classes.append("word")
    return owner, classes


def _starts_sentence(text: str, start: int) -> bool:
    j = start - 1
    while j >= 0 and text[j] in _SKIP_BACK:
        j -= 1
    return j < 0 or text[j] in _SENTENCE_END


def classify(text: str, char_start: np.ndarray, char_end: np.ndarray) -> list[str | None]:
    """The class of each token given its [char_start, char_end) span in `text` (-1: not a text token)."""
    owner, classes = word_classes(text)
    out: list[str | None] = []
    for a, b in zip(char_start.tolist(), char_end.tolist()):
        if a < 0:
            out.append(None)
            continue
        hit = owner[a:b]
        hit = hit[hit >= 0]
        out.append(classes[hit[0]] if len(hit) else "punct")
    return out
