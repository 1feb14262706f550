"""Per-caption quality checks: the failure modes of dense captioning at scale.

Greedy decoding of a 7B VLM over millions of images produces a few percent of captions that
are no use as training text: nothing at all, a caption cut at the token limit, a phrase
repeated until the limit, or the instruction read back. Each check is a pure function of
the caption and its prompt, cheap beside generation, so every caption is checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardkit.config import CaptionQualityConfig

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")
PLACEHOLDER = "{}"


@dataclass(frozen=True)
class Checked:
    """What a caption is checked against."""
    text: str
    finish_reason: str
    """"stop" (the model ended it) or "length" (cut at max_new_tokens)."""
    template: str
    """The captioner's prompt template; with `{}` the alt text went in its place."""
    alt_text: str


def tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: a loop of 'a red circle,' is a loop whatever
    the spacing around its comma."""
    return _TOKEN.findall(text.lower())


def is_empty(text: str) -> bool:
    return not any(ch.isalnum() for ch in text)


def tail_span(words: list[str], period: int) -> int:
    """How many words at the end repeat with this period: a unit of `period` words over and
    over, possibly cut mid-unit, as a loop stopped by max_new_tokens is."""
    j = len(words) - 1
    while j - period >= 0 and words[j] == words[j - period]:
        j -= 1
    return min(len(words), (len(words) - 1 - j) + period)


def is_repetition(text: str, cfg: CaptionQualityConfig) -> bool:
    words = tokens(text)
    for period in range(1, min(cfg.repetition_max_period, len(words)) + 1):
        span = tail_span(words, period)
        if span >= cfg.repetition_min_repeats * period and span >= cfg.repetition_min_words:
            return True
    return False


def _windows(words: list[str], size: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + size]) for i in range(len(words) - size + 1)}


def is_echo(text: str, template: str, alt_text: str, min_words: int) -> bool:
    """The caption repeats a run of `min_words` words of the instruction (the template
    without the alt text), or is the alt text itself."""
    caption = _WORD.findall(text.lower())
    if not caption:
        return False
    alt = _WORD.findall(alt_text.lower())
    if PLACEHOLDER in template and len(alt) >= 3 and caption == alt:
        return True
    instruction = [w for piece in template.split(PLACEHOLDER) for w in [_WORD.findall(piece.lower())]]
    windows = set().union(*(_windows(piece, min_words) for piece in instruction))
    return bool(windows & _windows(caption, min_words))


def check(caption: Checked, cfg: CaptionQualityConfig) -> list[str]:
    """The flags of one caption, in the config's order; [] is a clean caption."""
    tests = {
        "empty": lambda: is_empty(caption.text),
        "length": lambda: caption.finish_reason == "length",
        "repetition": lambda: is_repetition(caption.text, cfg),
        "echo": lambda: is_echo(caption.text, caption.template, caption.alt_text, cfg.echo_min_words),
    }
    return [flag for flag in cfg.checks if tests[flag]()]


def better(first: list[str], second: list[str], retry: list[str]) -> bool:
    """Whether a retry's flags beat the first attempt's: fewer retry-worthy flags, then
    fewer flags. Ties keep the first (greedy) caption."""
    def rank(flags: list[str]) -> tuple[int, int]:
        return sum(f in retry for f in flags), len(flags)

    return rank(second) < rank(first)
