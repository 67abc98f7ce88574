"""Turning (system prompt, text) into token ids that know where they came from.

With a chat template the prompt is the template rendered for
`[system, user: <user_prompt>, assistant: <text>]` (or the text as the user turn), so the text is
teacher-forced exactly where the model would speak it. Without one the documented plain format is
`<bos?><system prompt>\\n\\n<text>` (just `<bos?><text>` with no system prompt).

Each token gets a segment (`system`, `template`, `text`) and, for text tokens, character offsets
into the text, found by rendering the template around sentinels and mapping tokenizer offsets.
Templates that `| trim` their content (Llama 3, Gemma) are detected by rendering sentinels padded
with whitespace; the values are then stripped the same way, so the ids are exactly
`apply_chat_template`'s and the offsets still index the untrimmed text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tourray.errors import UserError

_SYS, _TXT = "\ue000TOURRAY_SYSTEM\ue001", "\ue000TOURRAY_TEXT\ue001"
_PAD = " \n"  # whitespace a trimming template removes around its content
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
        self.trim = {_SYS: (False, False), _TXT: (False, False)}  # (strips left, strips right) per value
        self.template = self._render(text_role, user_prompt)
        if self.chat:
            padded = self._render(text_role, user_prompt, pad=_PAD)
            for m in self.trim:
                if m in padded:
                    i, j = padded.index(m), padded.index(m) + len(m)
                    self.trim[m] = (padded[max(0, i - len(_PAD)):i] != _PAD, padded[j:j + len(_PAD)] != _PAD)

    def _render(self, text_role: str, user_prompt: str, pad: str = "") -> str:
        if not self.chat:
            bos = self.tok.bos_token or ""
            return bos + (f"{_SYS}\n\n" if self.system_prompt else "") + _TXT
        sys_, txt = pad + _SYS + pad, pad + _TXT + pad
        msgs = [{"role": "system", "content": sys_}] if self.system_prompt else []
        if text_role == "assistant":
            msgs += [{"role": "user", "content": user_prompt}, {"role": "assistant", "content": txt}]
        else:
            msgs += [{"role": "user", "content": txt}]
        out = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        for s in (_TXT, _SYS) if self.system_prompt else (_TXT,):
            if out.count(s) != 1:
                raise UserError("the tokenizer's chat template does not place the content verbatim; "
                                "pass --no-chat-template to use the plain format")
        return out

    def _value(self, mark: str, value: str) -> tuple[str, int]:
        """The value as the template renders it (stripped where it trims) and how many leading
        characters of the original were dropped."""
        left, right = self.trim[mark]
        out = value.lstrip() if left else value
        lead = len(value) - len(out)
        return (out.rstrip() if right else out), lead

    def encode(self, text: str, max_length: int | None = None) -> Encoded:
        # Fill the sentinels in order of appearance, remembering where each value landed.
        pieces, spans, last = [], {}, 0
        for i, mark in sorted((self.template.find(m), m) for m in (_SYS, _TXT) if m in self.template):
            pieces.append(self.template[last:i])
            value, lead = self._value(mark, self.system_prompt if mark == _SYS else text)
            start = sum(map(len, pieces))
            spans[mark] = (start, start + len(value), lead)
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
            a, b, _ = spans[_SYS]
            seg[real & (offs[:, 0] < b) & (offs[:, 1] > a)] = SEGMENTS.index("system")
        a, b, lead = spans[_TXT]
        in_text = real & (offs[:, 0] < b) & (offs[:, 1] > a)
        seg[in_text] = SEGMENTS.index("text")
        cs[in_text] = np.clip(offs[in_text, 0], a, b) - a + lead
        ce[in_text] = np.clip(offs[in_text, 1], a, b) - a + lead
        truncated = max_length is not None and n > max_length
        if truncated:
            ids, cs, ce, seg = ids[:max_length], cs[:max_length], ce[:max_length], seg[:max_length]
        return Encoded(ids, cs, ce, seg, truncated)


def right_padded(seqs):
    """A teacher-forced batch: token-id sequences (arrays or lists) as `ids` [B, T] (int64, zeros
    after each sequence) and the attention `mask` [B, T]."""
    import torch

    ids = torch.zeros((len(seqs), max(len(x) for x in seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask
