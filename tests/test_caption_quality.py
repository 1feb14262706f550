"""Caption quality checks and alt-text hardening: pure functions, checked on captions whose
faults are known."""

from __future__ import annotations

import pytest

from captioning.prompts import ALT_TEXT_PROMPT, PAPER_PROMPT, strip_reserved, user_prompt
from captioning.quality import Checked, better, check, is_echo, is_repetition, tail_span, tokens
from shardkit.config import CaptionQualityConfig, ConfigError, parse_config

CFG = CaptionQualityConfig()
GOOD = ("The image shows a large red circle in the top left corner and a small blue square at the "
        "bottom right, on a plain white background. The style is flat and minimal.")


def _flags(text: str, finish: str = "stop", template: str = PAPER_PROMPT, alt: str = "") -> list[str]:
    return check(Checked(text, finish, template, alt), CFG)


def test_a_good_caption_has_no_flags():
    assert _flags(GOOD) == []
    # repeated words that are not a loop: "a red ... a red" once, lists of colours
    assert _flags("A red circle, a red square and a red star on a red background.") == []


@pytest.mark.parametrize("loop", [
    "a red circle, a red circle, a red circle, a red circle",
    "a red circle, a red circle, a red circle, a red",                # cut mid-unit by max tokens
    GOOD + " very very very very very very very very very",
    GOOD + " and the and the and the and the and the",
    GOOD + " " + " ".join(["the background is white and the circle is red."] * 3),  # a long unit
])
def test_repetition_loops_are_flagged(loop):
    assert is_repetition(loop, CFG)
    assert "repetition" in _flags(loop)


def test_repetition_needs_enough_repeats_and_words():
    assert not is_repetition("no no no", CFG)                  # 3 repeats but 3 words < 8
    assert not is_repetition("a b c d a b c d", CFG)           # 2 repeats < 3
    assert tail_span(tokens("x a b a b a b"), 2) == 6
    assert tail_span(tokens("a b c"), 1) == 1


def test_empty_and_length():
    assert _flags("") == ["empty"]
    assert _flags(" ... ") == ["empty"]
    assert _flags(GOOD, finish="length") == ["length"]


def test_prompt_echo():
    assert is_echo(PAPER_PROMPT + ".", PAPER_PROMPT, "", 6)
    assert is_echo("Sure. describe this image and its style in a very detailed manner: a cat", PAPER_PROMPT, "", 6)
    assert not is_echo(GOOD, PAPER_PROMPT, "", 6)
    assert not is_echo("A painting in a very detailed style of a cat.", PAPER_PROMPT, "", 6)
    alt = "red circle on white"
    # the alt-text prompt: its instruction part, or the alt text handed back as the caption
    assert is_echo("Given the caption of this image, a cat", ALT_TEXT_PROMPT, alt, 6)
    assert is_echo("Red circle on white.", ALT_TEXT_PROMPT, alt, 6)
    assert not is_echo("A red circle on a white background, drawn flat.", ALT_TEXT_PROMPT, alt, 6)
    assert _flags("Red circle on white.", template=ALT_TEXT_PROMPT, alt=alt) == ["echo"]


def test_only_configured_checks_run_and_retry_must_be_checked():
    cfg = CaptionQualityConfig(checks=["empty"], retry=["empty"])
    assert check(Checked("a a a a a a a a a a", "length", PAPER_PROMPT, ""), cfg) == []
    with pytest.raises(ConfigError, match="retry"):
        parse_config({"captioners": {"x": {"model": "m", "quality": {"checks": ["empty"], "retry": ["echo"]}}}})


def test_a_retry_is_kept_only_when_it_is_better():
    retry = ["empty", "repetition", "echo"]
    assert better(["repetition"], [], retry)
    assert better(["repetition", "length"], ["length"], retry)
    assert not better(["length"], ["length"], retry)           # a tie keeps the greedy caption
    assert not better([], ["length"], retry)


def test_reserved_strings_are_taken_out_of_alt_text():
    reserved = ["<image>", "</s>", "<s>", "<pad>"]
    assert strip_reserved("a <image> cat </s> on <s>mat", reserved) == ("a   cat   on  mat", ("<image>", "</s>", "<s>"))
    # a removal that joins two halves into a new reserved string is caught on the next pass
    text, removed = strip_reserved("<ima<image>ge> and <<pad>/s>", reserved)
    assert "<image>" not in text and "</s>" not in text and "<pad>" not in text
    assert set(removed) == {"<image>", "<pad>"}
    prompt = user_prompt(ALT_TEXT_PROMPT, 'A "cat" <image> on </s> a mat', 300, reserved)
    assert prompt.text == ALT_TEXT_PROMPT.replace("{}", "A 'cat' on a mat")
    assert prompt.alt_text == "A 'cat' on a mat" and prompt.removed == ("<image>", "</s>")
    # nothing left after cleaning: the paper's prompt, and the removal still recorded
    empty = user_prompt(ALT_TEXT_PROMPT, "<image> </s>", 300, reserved)
    assert empty.text == PAPER_PROMPT and set(empty.removed) == {"<image>", "</s>"}
    # a prompt without {} never sees the alt text
    assert user_prompt(PAPER_PROMPT, "<image>", 300, reserved).text == PAPER_PROMPT
