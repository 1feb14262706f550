"""Prompts: the paper's, or one that carries the sample's own alt text (PixArt's released
script), rendered through the processor's chat template."""

from __future__ import annotations

import re

from shardkit.config import ALT_TEXT_PROMPT, PAPER_PROMPT

PLACEHOLDER = "{}"
__all__ = ["ALT_TEXT_PROMPT", "PAPER_PROMPT", "user_prompt", "conversation"]


def user_prompt(template: str, alt_text: str, max_chars: int) -> str:
    """The prompt for one sample. `{}` takes the alt text (whitespace collapsed, cut to
    max_chars); a sample without alt text gets the paper's prompt, since an empty quote
    would only confuse the model."""
    if PLACEHOLDER not in template:
        return template
    cleaned = re.sub(r"\s+", " ", alt_text).strip()[:max_chars].strip()
    if not cleaned:
        return PAPER_PROMPT
    # plain replace, not str.format: alt text is full of braces and quotes
    return template.replace(PLACEHOLDER, cleaned.replace('"', "'"), 1)


def conversation(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
