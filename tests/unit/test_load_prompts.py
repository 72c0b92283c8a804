"""Exact-length, never-repeated prompts: token ids and fitted text."""

from __future__ import annotations

import random

import pytest

from locustfiles._prompts import ID_WORDS, PromptError, TextPrompts, TokenPrompts, fit_text_length

_RNG = random.Random(1)
TEXT_TOKENS = [_RNG.randrange(1000, 9000) for _ in range(3000)]


@pytest.mark.parametrize("length", [1, 9, 128, 2560, 10_000])
def test_token_prompts_have_the_exact_length_and_only_text_tokens(length):
    prompts = TokenPrompts(TEXT_TOKENS, length, random.Random(0))
    for _ in range(5):
        prompt = prompts.next()
        assert len(prompt) == length
        assert set(prompt) <= set(TEXT_TOKENS)


def test_token_prompts_never_share_a_leading_sequence():
    users = [TokenPrompts(TEXT_TOKENS, 128, random.Random(seed)) for seed in range(4)]
    prompts = [u.next() for _ in range(500) for u in users]
    heads = {tuple(p[: users[0].prefix_len]) for p in prompts}
    assert len(heads) == len(prompts)
    assert users[0].prefix_len == 8  # 64 bits in base 256


def test_token_prompts_need_real_text():
    with pytest.raises(PromptError, match="distinct tokens"):
        TokenPrompts([1, 2, 3] * 100, 128, random.Random(0))


def fake_server_count(prompts: TextPrompts, template_tokens: int = 11):
    """A tokenizer stand-in: a chat template, one token per word, two for long words (like real BPE)."""

    def count(n_words: int, pad: int) -> int:
        text = prompts.compose(random.getrandbits(48), n_words, pad)
        return template_tokens + sum(2 if len(w) > 8 else 1 for w in text.split())

    return count


@pytest.mark.parametrize("target", [40, 128, 300, 2560])
def test_text_fit_reaches_the_exact_count(target):
    prompts = TextPrompts(open_text(), random.Random(0))
    count = fake_server_count(prompts)
    n_words, pad = fit_text_length(count, target)
    assert count(n_words, pad) == target


def test_text_fit_reports_prompts_that_cannot_be_that_short():
    prompts = TextPrompts(open_text(), random.Random(0))
    with pytest.raises(PromptError, match="shortest text prompt"):
        fit_text_length(fake_server_count(prompts, template_tokens=50), 20)


def test_text_prompts_differ_in_their_leading_words():
    prompts = TextPrompts(open_text(), random.Random(0), n_words=50, pad=2)
    texts = [prompts.next() for _ in range(200)]
    assert len({t.split("\n\n")[0] for t in texts}) == 200
    assert all(w in ID_WORDS for w in texts[0].split("\n\n")[0].split())
    assert texts[0].endswith(" the the")


def open_text() -> str:
    from bench.plan import DEFAULT_PROMPT_TEXT

    return DEFAULT_PROMPT_TEXT.read_text(encoding="utf-8")
