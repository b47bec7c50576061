"""CLIP byte-pair-encoding tokenizer, offline and identical to OpenAI's ``simple_tokenizer.py``.

The vocabulary ``assets/bpe_simple_vocab_16e6.txt.gz`` ships with the package (MIT, OpenAI
CLIP, see ``assets/LICENSE-CLIP-BPE``). The BPE is written out here rather than taken from
``transformers.CLIPTokenizerFast`` because the fast tokenizer normalises text differently
(no ftfy, NFC instead), and the original dataloaders' ids are the contract. Speed comes from
caching the BPE of each distinct word: captions reuse a small vocabulary, so ~200k captions
take seconds.

    ids, mask = tokenize(["a man is singing"], max_words=32)   # int32 [1, 32] each
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Sequence

import ftfy
import numpy as np
import regex

BPE_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz"
)
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# Same pattern as OpenAI's: special tokens, English contractions, letter runs, single
# digits, runs of other non-space characters.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode map (GPT-2 / CLIP), so BPE never sees spaces/control bytes."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clean_text(text: str) -> str:
    """OpenAI cleaning: ftfy fix, HTML unescape twice, collapse whitespace, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class SimpleTokenizer:
    """BPE encoder with the exact vocabulary and merge order of OpenAI CLIP."""

    def __init__(self, bpe_path: str = BPE_PATH):
        if not os.path.exists(bpe_path):
            raise FileNotFoundError(
                f"tokenizer.py: BPE vocabulary not found at {bpe_path}; "
                "reinstall the package (it ships as package data)"
            )
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
        # The first line is a version header; OpenAI keeps 49152 - 256 - 2 merges.
        merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(vocab)
        self._cache: dict[str, tuple[int, ...]] = {
            SOT_TOKEN: (self.sot_id,),
            EOT_TOKEN: (self.eot_id,),
        }

    def _bpe(self, token: str) -> list[str]:
        # token: a pre-tokenised word, already mapped through bytes_to_unicode.
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        if len(word) == 1:
            return [word[0]]
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        return list(word)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids = tuple(self.encoder[t] for t in self._bpe(mapped))
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT (OpenAI ``SimpleTokenizer.encode``)."""
        out: list[int] = []
        for word in _PATTERN.findall(clean_text(text)):
            out.extend(self._word_ids(word))
        return out


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts: Sequence[str], max_words: int) -> tuple[np.ndarray, np.ndarray]:
    """``[SOT] + bpe(text)[:max_words-2] + [EOT]``, zero padded, as the original dataloaders.

    Returns ``(input_ids, input_mask)``, int32 ``[len(texts), max_words]``; the mask is 1 on
    SOT, the BPE tokens and EOT.
    """
    if isinstance(texts, str):
        raise TypeError("tokenizer.py: tokenize() takes a list of strings, got a single str")
    if max_words < 2:
        raise ValueError(f"tokenizer.py: max_words must be >= 2 (SOT and EOT), got {max_words}")
    tok = get_tokenizer()
    ids = np.zeros((len(texts), max_words), np.int32)
    mask = np.zeros((len(texts), max_words), np.int32)
    for i, text in enumerate(texts):
        row = [tok.sot_id] + tok.encode(text)[: max_words - 2] + [tok.eot_id]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask
