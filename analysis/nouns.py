"""Noun statistics of captions (the paper's Table 1): mergeable counts and what they give.

Counting is done per shard and the partial counts merge exactly (sums of counters), so the
result does not depend on how the captions were split among tasks or workers.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

log = logging.getLogger(__name__)

# POS tags and lemmas need only these; the parser and NER are most of en_core_web_sm's time
NEEDED_COMPONENTS = ("tok2vec", "tagger", "attribute_ruler", "lemmatizer")


@functools.lru_cache(maxsize=4)
def load_nlp(candidates: tuple[str, ...], full: bool = False):  # -> spacy.Language
    """The first spaCy model that loads, with only the components POS and lemmas need
    (cached per process: Ray reuses workers, so a model loads once per worker)."""
    import spacy

    errors = []
    for name in candidates:
        try:
            nlp = spacy.load(name)
        except OSError as exc:
            errors.append(f"{name}: {str(exc)[:80]}")
            continue
        if not full:
            for pipe in list(nlp.pipe_names):
                if pipe not in NEEDED_COMPONENTS:
                    nlp.remove_pipe(pipe)
        log.debug("spaCy model %s with %s", name, nlp.pipe_names)
        return nlp
    raise OSError("no spaCy model could be loaded: " + "; ".join(errors))


@dataclass
class NounCounts:
    """Everything the report needs, as sums, so two counts merge by adding."""

    images: int = 0
    captions: int = 0
    """Images whose caption is not empty."""
    words: int = 0
    nouns: Counter = field(default_factory=Counter)
    """Lemma (lower-cased) -> occurrences."""
    per_caption: Counter = field(default_factory=Counter)
    """Number of nouns in a caption -> images with that many (empty captions count 0)."""
    problems: Counter = field(default_factory=Counter)
    """missing_field, not_utf8, cut_long: handled, and reported."""
    flagged: int = 0
    """Dense captions the captioning stage's quality checks marked (counted unless excluded)."""
    flags: Counter = field(default_factory=Counter)
    """Quality flag -> marked captions with it."""
    excluded: int = 0
    """Marked captions left out of every other count (analysis.nouns.exclude_flagged)."""

    def merge(self, other: "NounCounts") -> "NounCounts":
        self.images += other.images
        self.captions += other.captions
        self.words += other.words
        self.nouns.update(other.nouns)
        self.per_caption.update(other.per_caption)
        self.problems.update(other.problems)
        self.flagged += other.flagged
        self.flags.update(other.flags)
        self.excluded += other.excluded
        return self

    @property
    def total_nouns(self) -> int:
        return sum(self.nouns.values())

    def statistics(self, valid_threshold: int, top: int) -> dict:
        distinct = len(self.nouns)
        valid = sum(1 for count in self.nouns.values() if count > valid_threshold)
        return {
            "images": self.images,
            "captions": self.captions,
            "DN": distinct,
            "VN": valid,
            "VN/DN %": round(100 * valid / distinct, 2) if distinct else 0.0,
            "total_nouns": self.total_nouns,
            "average_nouns_per_image": round(self.total_nouns / self.images, 3) if self.images else 0.0,
            "words_per_caption": round(self.words / self.captions, 2) if self.captions else 0.0,
            "valid_threshold": valid_threshold,
            "top_nouns": self.nouns.most_common(top),
            "problems": dict(self.problems),
            "flagged": {"captions": self.flagged, "by_flag": dict(sorted(self.flags.items())), "excluded": self.excluded},
        }


def count_texts(texts: Iterable[str | None], nlp, include_propn: bool, batch_size: int, max_chars: int) -> NounCounts:  # noqa: ANN001
    """Count nouns by lemma in each text; None stands for an image without the caption field
    (counted as an image with no nouns)."""
    counts = NounCounts()
    tags = {"NOUN", "PROPN"} if include_propn else {"NOUN"}
    wanted: list[str] = []
    for text in texts:
        counts.images += 1
        if text is None:
            counts.problems["missing_field"] += 1
            counts.per_caption[0] += 1
            continue
        if len(text) > max_chars:
            counts.problems["cut_long"] += 1
            text = text[:max_chars]
        if not text.strip():
            counts.per_caption[0] += 1
            continue
        counts.captions += 1
        wanted.append(text)
    for doc in nlp.pipe(wanted, batch_size=batch_size):
        # a lemma without a letter ("|", "-", "2") is tagging noise, not a concept
        found = [t.lemma_.lower() for t in doc if t.pos_ in tags and any(ch.isalpha() for ch in t.lemma_)]
        counts.words += sum(1 for t in doc if not (t.is_punct or t.is_space))
        counts.nouns.update(found)
        counts.per_caption[len(found)] += 1
    return counts


def decode_caption(data: bytes | None, counts: NounCounts) -> str | None:
    """Captions are UTF-8 by the shard format; anything else is read with replacement
    characters and counted, not allowed to fail the task."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        counts.problems["not_utf8"] += 1
        return data.decode("utf-8", errors="replace")
