"""PromptFormat: segments, character offsets and truncation, plain and chat-templated."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import TEXTS
from tourray.errors import UserError
from tourray.model.prompt import SEGMENTS, PromptFormat

TEXT = TEXTS["train/sydney__opera-house.txt"]
ZH = TEXTS["train/xian__city-wall.txt"]


@pytest.fixture(scope="module")
def plain_tok(qwen3_model):
    tok = AutoTokenizer.from_pretrained(qwen3_model)
    assert not getattr(tok, "chat_template", None)
    return tok


@pytest.fixture(scope="module")
def chat_tok(llama_model):
    tok = AutoTokenizer.from_pretrained(llama_model)
    assert tok.chat_template
    return tok


def segs(enc):
    return [SEGMENTS[s] for s in enc.segment]


def check_offsets(enc, text):
    """Text tokens: offsets inside the text, non-empty and in order; everything else -1."""
    is_text = np.array(segs(enc)) == "text"
    cs, ce = enc.char_start[is_text], enc.char_end[is_text]
    assert is_text.any()
    assert np.all(enc.char_start[~is_text] == -1) and np.all(enc.char_end[~is_text] == -1)
    assert np.all((0 <= cs) & (cs < ce) & (ce <= len(text)))
    assert np.all(np.diff(cs) >= 0) and np.all(np.diff(ce) >= 0)
    # text tokens are one contiguous run (the text is not interrupted by template tokens)
    idx = np.flatnonzero(is_text)
    assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
    return cs, ce


def test_plain_format_without_system_prompt(plain_tok):
    enc = PromptFormat(plain_tok).encode(TEXT)
    assert enc.input_ids[0] == plain_tok.bos_token_id and segs(enc)[0] == "template"
    assert set(segs(enc)) == {"template", "text"}
    cs, ce = check_offsets(enc, TEXT)
    assert "".join(TEXT[a:b] for a, b in zip(cs, ce)) == TEXT  # ASCII: spans tile the text
    assert plain_tok.decode(enc.input_ids[1:]) == TEXT
    assert not enc.truncated
    assert enc.input_ids.dtype == np.int64 and len({len(enc.input_ids), len(enc.segment), len(enc.char_start)}) == 1


def test_plain_format_with_system_prompt(plain_tok):
    fmt = PromptFormat(plain_tok, system_prompt="You are a tour guide.")
    assert not fmt.chat
    enc = fmt.encode(TEXT)
    assert plain_tok.decode(enc.input_ids) == "<|bos|>You are a tour guide.\n\n" + TEXT
    s = segs(enc)
    assert s[0] == "template" and s[1] == "system" and s[-1] == "text"
    assert s.index("text") > max(i for i, x in enumerate(s) if x == "system")
    check_offsets(enc, TEXT)


def test_chat_template_segments_and_offsets(chat_tok):
    fmt = PromptFormat(chat_tok, system_prompt="You are a tour guide.")
    assert fmt.chat
    enc = fmt.encode(TEXT)
    s = segs(enc)
    assert set(s) == {"system", "template", "text"}
    # order: template (system header), system, template (user turn, assistant header), text, template (end)
    first = {seg: s.index(seg) for seg in SEGMENTS}
    assert first["template"] < first["system"] < first["text"]
    assert s[-1] == "template"  # the closing <|endoftext|> of the assistant turn
    cs, ce = check_offsets(enc, TEXT)
    assert "".join(TEXT[a:b] for a, b in zip(cs, ce)) == TEXT
    assert "Tell me about this stop." in chat_tok.decode(enc.input_ids[np.array(s) == "template"])


def test_chat_user_role_and_cjk_offsets(chat_tok):
    enc = PromptFormat(chat_tok, text_role="user").encode(ZH)
    assert "Tell me about" not in chat_tok.decode(enc.input_ids)
    cs, ce = check_offsets(enc, ZH)
    covered = np.zeros(len(ZH), bool)
    for a, b in zip(cs, ce):
        covered[a:b] = True
    assert covered.all()  # byte-level BPE may split a character, but every character is covered


def test_no_chat_template_flag_uses_plain_format(chat_tok):
    enc = PromptFormat(chat_tok, use_chat_template=False).encode(TEXT)
    assert chat_tok.decode(enc.input_ids) == "<|bos|>" + TEXT


def test_truncation(plain_tok):
    fmt = PromptFormat(plain_tok)
    full = fmt.encode(TEXT)
    n = len(full.input_ids)
    cut = fmt.encode(TEXT, max_length=8)
    assert cut.truncated and len(cut.input_ids) == len(cut.segment) == len(cut.char_end) == 8
    assert np.array_equal(cut.input_ids, full.input_ids[:8])
    assert np.array_equal(cut.char_start, full.char_start[:8])
    exact = fmt.encode(TEXT, max_length=n)
    assert not exact.truncated and len(exact.input_ids) == n


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(UserError, match="fast"):
        PromptFormat(Slow())


def test_template_that_rewrites_content_is_refused(llama_model):
    tok = AutoTokenizer.from_pretrained(llama_model)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | lower }}\n{% endfor %}"
    with pytest.raises(UserError, match="--no-chat-template"):
        PromptFormat(tok)


LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def _template_ids(tok, system, text, role):
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += ([{"role": "user", "content": "Tell me about this stop."}, {"role": "assistant", "content": text}]
             if role == "assistant" else [{"role": "user", "content": text}])
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _check_template(tok, system, text, role):
    enc = PromptFormat(tok, system_prompt=system, text_role=role).encode(text)
    assert list(enc.input_ids) == _template_ids(tok, system, text, role)
    cs, ce = check_offsets(enc, text)
    covered = np.zeros(len(text), bool)
    for a, b in zip(cs, ce):
        covered[a:b] = True
    # every character the template keeps is covered by a text token, and nothing else is
    kept = np.zeros(len(text), bool)
    lead = len(text) - len(text.lstrip())
    kept[lead:lead + len(text.strip())] = True
    return enc, covered, kept


@pytest.mark.parametrize("template", ["llama3", "gemma"])
@pytest.mark.parametrize("role", ["assistant", "user"])
@pytest.mark.parametrize("text", [TEXT, ZH, "  \n Padded on both sides.\n\n"])
def test_trimming_templates_match_apply_chat_template(llama_model, template, role, text):
    """`| trim` templates drop the corpus file's trailing newline (and leading blanks): the ids must be
    exactly apply_chat_template's, the offsets still index the original text."""
    tok = AutoTokenizer.from_pretrained(llama_model)
    tok.chat_template = LLAMA3_TEMPLATE if template == "llama3" else GEMMA_TEMPLATE
    system = " You are a tour guide.\n" if template == "llama3" else ""
    enc, covered, kept = _check_template(tok, system, text, role)
    assert np.array_equal(covered, kept)


@pytest.mark.parametrize("role", ["assistant", "user"])
def test_smollm2_template_matches_apply_chat_template(smollm2_model, role):
    """SmolLM2's template keeps the content verbatim (trailing newline included): ids as the template's."""
    tok = AutoTokenizer.from_pretrained(smollm2_model)
    assert tok.chat_template
    enc = PromptFormat(tok, system_prompt="You are a tour guide.", text_role=role).encode(TEXT)
    assert list(enc.input_ids) == _template_ids(tok, "You are a tour guide.", TEXT, role)
    cs, ce = check_offsets(enc, TEXT)
    assert "".join(TEXT[a:b] for a, b in zip(cs, ce)) == TEXT
