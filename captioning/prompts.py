"""Prompts: the paper's, or one that carries the sample's own alt text (PixArt's released
script), rendered through the processor's chat template.

Alt text is hostile input: web captions contain `<image>`, `</s>` and chat markers, which a
tokenizer turns into special tokens. An extra `<image>` makes the processor's image-token
count disagree with the images; an `</s>` ends the prompt early. So the model's reserved
strings are taken out of the alt text before it is templated, and the sample records which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from shardkit.config import ALT_TEXT_PROMPT, PAPER_PROMPT

PLACEHOLDER = "{}"
__all__ = ["ALT_TEXT_PROMPT", "PAPER_PROMPT", "Prompt", "user_prompt", "strip_reserved", "conversation"]


@dataclass(frozen=True)
class Prompt:
    text: str
    alt_text: str
    """The alt text as it went into the prompt (cleaned, cut), or "" if none did."""
    removed: tuple[str, ...] = ()
    """Reserved strings taken out of the alt text, in order of first removal."""


def strip_reserved(text: str, reserved: Iterable[str]) -> tuple[str, tuple[str, ...]]:
    """`text` with every occurrence of the reserved strings replaced by a space. Repeated until
    none is left, since a removal can join two halves into a new one ("<ima<image>ge>"), and
    longest first, so "</s>" is not half-removed as "<s" + ">"."""
    ordered = sorted({r for r in reserved if r}, key=len, reverse=True)
    removed: list[str] = []
    changed = True
    while changed:
        changed = False
        for token in ordered:
            if token in text:
                text = text.replace(token, " ")
                changed = True
                if token not in removed:
                    removed.append(token)
    return text, tuple(removed)


def user_prompt(template: str, alt_text: str, max_chars: int, reserved: Iterable[str] = ()) -> Prompt:
    """The prompt for one sample. `{}` takes the alt text (reserved strings removed,
    whitespace collapsed, cut to max_chars); a sample without alt text gets the paper's
    prompt, since an empty quote would only confuse the model."""
    if PLACEHOLDER not in template:
        return Prompt(template, "")
    safe, removed = strip_reserved(alt_text, reserved)
    cleaned = re.sub(r"\s+", " ", safe).strip()[:max_chars].strip().replace('"', "'")
    if not cleaned:
        return Prompt(PAPER_PROMPT, "", removed)
    # plain replace, not str.format: alt text is full of braces and quotes
    return Prompt(template.replace(PLACEHOLDER, cleaned, 1), cleaned, removed)


def conversation(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
