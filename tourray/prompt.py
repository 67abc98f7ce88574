"""Turning (system prompt, text) into token ids that know where they came from.

With a chat template the prompt is the template rendered for
`[system, user: <user_prompt>, assistant: <text>]` (or the text as the user turn), so the text is
teacher-forced exactly where the model would speak it. Without one the documented plain format is
`<bos?><system prompt>\\n\\n<text>` (just `<bos?><text>` with no system prompt).

Each token gets a segment (`system`, `template`, `text`) and, for text tokens, character offsets
into the text, found by rendering the template around sentinels and mapping tokenizer offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tourray.errors import UserError

_SYS, _TXT = "\ue000TOURRAY_SYSTEM\ue001", "\ue000TOURRAY_TEXT\ue001"
SEGMENTS = ("system", "template", "text")


@dataclass
class Encoded:
    input_ids: np.ndarray      # int64 [n]
    char_start: np.ndarray     # int32 [n], -1 outside the text
    char_end: np.ndarray       # int32 [n], -1 outside the text
    segment: np.ndarray        # int8 [n], index into SEGMENTS
    truncated: bool


class PromptFormat:
    """Encodes texts for one tokenizer, system prompt and template choice."""

    def __init__(self, tokenizer, system_prompt: str = "", text_role: str = "assistant",
                 user_prompt: str = "Tell me about this stop.", use_chat_template: bool = True):
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("the tokenizer must be a fast (Rust) tokenizer: character offsets need it")
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.template = self._render(text_role, user_prompt)

    def _render(self, text_role: str, user_prompt: str) -> str:
        if not self.chat:
            bos = self.tok.bos_token or ""
            return bos + (f"{_SYS}\n\n" if self.system_prompt else "") + _TXT
        msgs = [{"role": "system", "content": _SYS}] if self.system_prompt else []
        if text_role == "assistant":
            msgs += [{"role": "user", "content": user_prompt}, {"role": "assistant", "content": _TXT}]
        else:
            msgs += [{"role": "user", "content": _TXT}]
        out = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        for s in (_TXT, _SYS) if self.system_prompt else (_TXT,):
            if out.count(s) != 1:
                raise UserError("the tokenizer's chat template does not place the content verbatim; "
                                "pass --no-chat-template to use the plain format")
        return out

    def encode(self, text: str, max_length: int | None = None) -> Encoded:
        # Fill the sentinels in order of appearance, remembering where each value landed.
        pieces, spans, last = [], {}, 0
        for i, mark in sorted((self.template.find(m), m) for m in (_SYS, _TXT) if m in self.template):
            pieces.append(self.template[last:i])
            value = self.system_prompt if mark == _SYS else text
            start = sum(map(len, pieces))
            spans[mark] = (start, start + len(value))
            pieces.append(value)
            last = i + len(mark)
        pieces.append(self.template[last:])
        full = "".join(pieces)
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        n = len(ids)
        seg = np.full(n, SEGMENTS.index("template"), dtype=np.int8)
        cs = np.full(n, -1, dtype=np.int32)
        ce = np.full(n, -1, dtype=np.int32)
        real = offs[:, 1] > offs[:, 0]
        if _SYS in spans:
            a, b = spans[_SYS]
            seg[real & (offs[:, 0] < b) & (offs[:, 1] > a)] = SEGMENTS.index("system")
        a, b = spans[_TXT]
        in_text = real & (offs[:, 0] < b) & (offs[:, 1] > a)
        seg[in_text] = SEGMENTS.index("text")
        cs[in_text] = np.clip(offs[in_text, 0], a, b) - a
        ce[in_text] = np.clip(offs[in_text, 1], a, b) - a
        truncated = max_length is not None and n > max_length
        if truncated:
            ids, cs, ce, seg = ids[:max_length], cs[:max_length], ce[:max_length], seg[:max_length]
        return Encoded(ids, cs, ce, seg, truncated)
