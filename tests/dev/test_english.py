"""The English check of the verification protocol and the real-model tests:
it passes what real models write and fails what random weights write."""

from __future__ import annotations

import pytest

from encrypted_vllm.dev.english import COMMON_SHARE, common_share, looks_like_english
from tests.jobs import greedy_text

ENGLISH = [
    "I'm here to help you with anything you need. Whether it's a math problem, a creative "
    "idea, or just a problem to solve, I'm here to help.",
    "The sea is a vast, mysterious, and awe-inspiring realm that exists beyond the horizon.",
    "The primary colors are:\n\nRed: YELLOW\nBlue: WHITE",  # wrong, and still English
    "I’m sure that’s a great question, and here’s what I think.",
]
NOT_ENGLISH = [
    '99\ufffdd9 worldd9 worldd9\ufffd3"\ufffd"',  # the tiny model's answer to "Sanity check."
    "99d9 worldd9 worldd9 3 d9 worldd9",  # the same without U+FFFD
    "pathologist pathologist pathologist pathologist",
    "the the the the the the the the",  # common, but too few different words to judge
    "",
]


@pytest.mark.parametrize("text", ENGLISH)
def test_real_answers_read_as_english(text):
    assert looks_like_english(text)
    assert common_share(text) >= COMMON_SHARE + 0.04  # with a margin


@pytest.mark.parametrize("text", NOT_ENGLISH)
def test_noise_does_not(text):
    assert not looks_like_english(text)


async def test_the_tiny_random_models_greedy_answers_do_not(engine, hf_tokenizer):
    for prompt in ("Sanity check.", "Write one sentence about the sea."):
        ids = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        text = await greedy_text(engine, ids, 64)
        assert not looks_like_english(text), text
