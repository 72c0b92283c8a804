"""Prompts of an exact token length that no other request used, cut from real text.

Token-id prompts (llama-server's /completion, and OpenAI completions on servers that take token ids): a unique
leading sequence of tokens (a random 64-bit request id written in base-N with N distinct tokens of the text),
then a window of the text's tokens as the server under test tokenized it. A different first token per request
means no prompt-cache prefix can be reused.

Text prompts (chat, and servers that only take text): a unique leading run of common words (a random 48-bit id,
6 bits per word), then whole words of the text, padded with single-token filler words. How many words give the
exact length is fitted once against the server's reported usage (`fit_text_length`); each request's count is
verified again from its own usage. Servers whose streams report no usage but that tokenize on request
(llama-cpp-python's /extras/tokenize/count) get a pool of prompts each counted by that tokenizer before any step
(`CountedTextPrompts`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

ID_BITS = 64
TEXT_ID_BITS = 48
# 64 short, frequent English words: one token each (with their leading space) in the common BPE and
# SentencePiece vocabularies, so the unique prefix has the same length whichever words a request draws.
_ID_WORDS_TEXT = (
    "the of and to in is it that was for on are with as his they be at one have this from or had by but not "
    "what all were we when your can said there use an each which she do how their if will up other about out "
    "many then them these so some her would make like him into time has"
)
ID_WORDS = tuple(_ID_WORDS_TEXT.split())
FILLER_WORD = " the"
_BODY_STRIDE = 97  # tokens or words the body window moves per request, so consecutive bodies differ too


class PromptError(ValueError):
    """Prompts of the asked length cannot be built from this text on this server."""


class TokenPrompts:
    """Token-id prompts of exactly `length` tokens for one user."""

    def __init__(self, text_tokens: Sequence[int], length: int, rng: random.Random) -> None:
        distinct = sorted(set(text_tokens))
        if len(distinct) < 16:
            raise PromptError(f"the prompt text tokenizes to only {len(distinct)} distinct tokens; need at least 16")
        if length < 1:
            raise PromptError(f"prompt length must be at least 1, got {length}")
        self.tokens = list(text_tokens)
        self.length = length
        self.rng = rng
        self.alphabet = distinct[:256]
        self.prefix_len = min(length, math.ceil(ID_BITS / math.log2(len(self.alphabet))))
        self._offset = rng.randrange(len(self.tokens))

    def next(self) -> list[int]:
        prompt = _digits(self.rng.getrandbits(ID_BITS), self.alphabet, self.prefix_len)
        prompt += _cyclic(self.tokens, self._offset, self.length - self.prefix_len)
        self._offset = (self._offset + _BODY_STRIDE) % len(self.tokens)
        return prompt


class TextPrompts:
    """Text prompts for one user: `n_words` words of the text plus `pad` filler words after a unique id."""

    def __init__(self, text: str, rng: random.Random, *, n_words: int = 0, pad: int = 0, offset: int = 0) -> None:
        self.words = text.split()
        if len(self.words) < 16:
            raise PromptError(f"the prompt text has only {len(self.words)} words; need at least 16")
        self.rng = rng
        self.n_words = n_words
        self.pad = pad
        self.offset = offset

    def compose(self, request_id: int, n_words: int, pad: int) -> str:
        n_id_words = math.ceil(TEXT_ID_BITS / math.log2(len(ID_WORDS)))
        prefix = " ".join(_digits(request_id, ID_WORDS, n_id_words))
        body = " ".join(_cyclic(self.words, self.offset, n_words))
        return f"{prefix}\n\n{body}{FILLER_WORD * pad}"

    def next(self) -> str:
        return self.compose(self.rng.getrandbits(TEXT_ID_BITS), self.n_words, self.pad)


class CountedTextPrompts:
    """A pool of text prompts, each counted by the server's own tokenizer to be exactly `length` tokens, used in
    turn (consecutive prompts always differ from their first word on)."""

    def __init__(
        self, prompts: TextPrompts, length: int, count: Callable[[str], int], *, size: int, n_words: int, pad: int
    ) -> None:
        self.pool: list[str] = []
        for _ in range(max(size, 2)):
            request_id = prompts.rng.getrandbits(TEXT_ID_BITS)
            text = prompts.compose(request_id, n_words, pad)
            got = count(text)
            if got != length and pad + length - got >= 0:  # a different id may tokenize a token longer or shorter
                text = prompts.compose(request_id, n_words, pad + length - got)
                got = count(text)
            if got != length:
                raise PromptError(
                    f"the server's tokenizer counts a prompt as {got} tokens; cannot make one of {length} exactly"
                )
            self.pool.append(text)
        self._next = 0

    def next(self) -> str:
        text = self.pool[self._next % len(self.pool)]
        self._next += 1
        return text


def fit_text_length(count: Callable[[int, int], int], target: int, *, max_probes: int = 12) -> tuple[int, int]:
    """(n_words, pad) whose prompt the server counts as exactly `target` tokens.

    `count(n_words, pad)` asks the server (a 1-token request) how many prompt tokens it counted. Words are at
    least one token each and never merge across a space, so dropping k words drops at least k tokens; the rest
    is made up with filler words of one token each.
    """
    probes = 0

    def probe(n: int, pad: int) -> int:
        nonlocal probes
        if probes >= max_probes:
            raise PromptError(f"could not fit a text prompt of {target} tokens in {max_probes} probe requests")
        probes += 1
        return count(n, pad)

    n = max(1, int(target * 0.6))
    c = probe(n, 0)
    while c > target or target - c > 8:
        if c > target:
            if n == 1:
                raise PromptError(f"the shortest text prompt is {c} tokens, more than the {target} asked")
            n = max(1, n - (c - target))
        else:
            # Grow by the observed tokens-per-word rate, staying a little short so the last step is padding.
            n += max(1, int((target - c) * n / max(c, 1) * 0.9))
        c = probe(n, 0)
    pad = target - c
    for _ in range(2):
        if pad == 0:
            return n, 0
        got = probe(n, pad)
        if got == target:
            return n, pad
        pad += target - got
        if pad < 0:
            break
    raise PromptError(f"filler words do not add one token each on this server; cannot fit {target} tokens exactly")


def _digits(value: int, alphabet: Sequence, width: int) -> list:
    base = len(alphabet)
    out = []
    for _ in range(width):
        value, digit = divmod(value, base)
        out.append(alphabet[digit])
    return out


def _cyclic(items: Sequence, start: int, count: int) -> list:
    if count <= 0:
        return []
    n = len(items)
    out = list(items[start : start + count])
    while len(out) < count:
        out.extend(items[: count - len(out)])
    return out[:count] if n else []
