"""The tour prompt: (plus code, place, interest tags, style) -> the user turn a tour guide answers.

One format, used by the server (`tourray serve`), the teacher's batch job (`tourray tours generate`)
and the pre-generated examples, so a model answers the page exactly what it was (or will be) trained
on. The system prompt (`samples/system_prompt.md` by default) and the chat template come from the
model's `PromptFormat` (`tourray.model.generate.generation_prompt`), as for `tourray generate`: the
server's text for a prompt is `tourray generate`'s for the same user turn and decoding.

Tags are kept in `TAGS` order whatever order they were given in, so one input is one prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from tourray.errors import UserError

#: Interest tags the models accept: id -> how the prompt says it.
TAGS: dict[str, str] = {
    "history": "history",
    "architecture": "architecture",
    "art": "art and museums",
    "engineering": "engineering",
    "people": "the people behind it",
    "religion": "religion and ritual",
    "food": "food and markets",
    "nature": "nature and views",
    "culture": "local life and customs",
    "kids": "things children enjoy",
}

#: Styles: id -> (what the prompt asks for, a label for the page, default max_new_tokens).
STYLES: dict[str, tuple[str, str, int]] = {
    "brief": ("Answer in two or three sentences.", "Brief: two or three sentences", 80),
    "stimulate": ("Start with a question or a surprising detail that makes me curious, then answer it in a few "
                  "sentences.", "Stimulate: a question, then the answer", 120),
    "detailed": ("Speak for about a minute: what I am looking at, its story, and one thing to notice before "
                 "moving on.", "Detailed: about a minute", 240),
}

#: What `tourray tours generate` asks about when no tag list file is given: one tag set per line.
DEFAULT_TAG_SETS: tuple[tuple[str, ...], ...] = (
    ("history",), ("architecture",), ("history", "people"), ("art",), ("engineering",), ("food", "culture"),
    ("nature",), ("religion",), ("kids",))

#: Bounds of max_new_tokens for a request.
MAX_NEW_TOKENS = (1, 512)


@dataclass(frozen=True)
class TourInput:
    """One question to the guide: where (plus code and a readable place), what about, how."""

    plus_code: str
    place: str
    tags: tuple[str, ...]
    style: str

    def user_text(self) -> str:
        return tour_prompt(self.plus_code, self.place, self.tags, self.style)


def check_tags(tags, field: str = "tags") -> tuple[str, ...]:
    """Tags in `TAGS` order, or a UserError naming the field and the unknown tag."""
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise UserError(f"{field}: must be a list of tags, not {tags!r}")
    unknown = [t for t in tags if t not in TAGS]
    if unknown:
        raise UserError(f"{field}: unknown tag(s) {', '.join(map(repr, unknown))}; known: {', '.join(TAGS)}")
    return tuple(t for t in TAGS if t in set(tags))


def check_style(style, field: str = "style") -> str:
    if style not in STYLES:
        raise UserError(f"{field}: unknown style {style!r}; known: {', '.join(STYLES)}")
    return style


def tour_prompt(plus_code: str, place: str, tags, style: str) -> str:
    """The user turn, one line (so `tourray generate --prompts FILE`, one prompt per line, can ask it too), e.g.

        I'm at Sydney Opera House, Sydney, Australia (plus code 4RRH46V8+74). I'm interested in
        architecture and history. Tell me about this stop. Answer in two or three sentences.
    """
    tags = check_tags(list(tags))
    style = check_style(style)
    lines = [f"I'm at {place} (plus code {plus_code})."]
    if tags:
        said = [TAGS[t] for t in tags]
        lines.append("I'm interested in " + (said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]) + ".")
    lines.append("Tell me about this stop. " + STYLES[style][0])
    return " ".join(lines)


def default_max_new_tokens(style: str) -> int:
    return STYLES[check_style(style)][2]


def read_tag_sets(path: str) -> tuple[tuple[str, ...], ...]:
    """A tag list file: one tag set per line, tags comma-separated (`history,people`); blank lines and
    `#` comments skipped; an empty line after `-` (a lone `-`) asks for no tags. Errors name file and line."""
    from pathlib import Path

    from tourray.corpus.texts import read_user_file

    p = Path(path)
    text = read_user_file(p, "--tags")
    sets = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tags = [] if line == "-" else [t.strip() for t in line.split(",") if t.strip()]
        try:
            sets.append(check_tags(tags, field=f"--tags: {p} line {n}"))
        except UserError as e:
            raise UserError(str(e)) from None
    if not sets:
        raise UserError(f"--tags: {p} has no tag sets (one per line, comma-separated)")
    return tuple(dict.fromkeys(sets))
