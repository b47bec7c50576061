"""CLIP byte-pair-encoding tokenizer, offline, giving the ids of OpenAI CLIP's tokenizer.

The vocabulary ``assets/bpe_simple_vocab_16e6.txt.gz`` ships with the package (MIT, OpenAI
CLIP, see ``assets/LICENSE-CLIP-BPE``). The BPE is done here rather than by
``transformers.CLIPTokenizerFast`` because the fast tokenizer normalises text differently
(no ftfy, NFC instead), and the original dataloaders' ids are the contract. Speed comes from
caching the pieces of each distinct word: captions reuse a small vocabulary, so ~200k captions
take seconds.

    ids, mask = tokenize(["a man is singing"], max_words=32)   # int32 [1, 32] each
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import os
from typing import Sequence

import numpy as np
import regex

# The vocabulary is package data of ``ucofia_jax`` (setup.py), one level above this module.
BPE_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "assets",
    "bpe_simple_vocab_16e6.txt.gz",
)
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# The vocabulary file holds a version line and then more merges than CLIP uses: its
# 49408-entry vocabulary is 2 * 256 byte symbols + NUM_MERGES merges + SOT + EOT.
NUM_MERGES = 49152 - 256 - 2
# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single
# digits, runs of other non-space characters.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
# Latin-1 bytes that print as a visible glyph stand for themselves in the BPE alphabet;
# these are the inclusive ranges (space, DEL, the C0/C1 controls, NBSP and the soft hyphen
# are left out).
_VISIBLE_BYTE_RANGES = ((0x21, 0x7E), (0xA1, 0xAC), (0xAE, 0xFF))


@functools.lru_cache(maxsize=None)
def byte_symbols() -> dict[int, str]:
    """One visible character per byte value, so the merges never see whitespace or controls.

    Visible latin-1 bytes keep their own character; every other byte, taken in increasing
    order, gets the next unused code point from 256 up (so the space byte is ``chr(288)``).
    """
    visible = set()
    for lo, hi in _VISIBLE_BYTE_RANGES:
        visible.update(range(lo, hi + 1))
    spare = itertools.count(256)
    return {byte: chr(byte if byte in visible else next(spare)) for byte in range(256)}


def merge_symbols(symbols: Sequence[str], merge_rank: dict[str, int]) -> list[str]:
    """Applies ranked merges to a word's symbols until no adjacent pair has a rank.

    ``merge_rank`` is keyed by the pair as the vocabulary file writes it, ``"left right"``
    (no symbol holds a space: the byte alphabet maps it to a visible glyph).

    Each round picks the adjacent pair with the lowest rank and joins every occurrence of
    it, scanning left to right so that overlapping occurrences (``a a a``) join leftmost
    first. Joined symbols take part in later rounds.
    """
    pieces = list(symbols)
    while len(pieces) > 1:
        ranked = [
            (merge_rank[key], pair)
            for pair in zip(pieces, pieces[1:])
            if (key := f"{pair[0]} {pair[1]}") in merge_rank
        ]
        if not ranked:
            break
        _, (left, right) = min(ranked)
        pos = 0
        while pos < len(pieces) - 1:
            if pieces[pos] == left and pieces[pos + 1] == right:
                # The joined symbol stays at `pos`; stepping past it keeps matches disjoint.
                pieces[pos : pos + 2] = [left + right]
            pos += 1
    return pieces


def ftfy_leaves_unchanged(text: str) -> bool:
    """Whether ``ftfy.fix_text(text) == text`` is known without running it: printable ASCII
    without '&'. ftfy's fixes act on mojibake and other non-ASCII characters, HTML entities,
    control characters and line breaks, none of which such text holds
    (tests/test_tokenizer.py checks this against ftfy on random text)."""
    return text.isascii() and text.isprintable() and "&" not in text


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy fix, HTML unescape twice, collapse whitespace, lower case."""
    if not ftfy_leaves_unchanged(text):
        # Imported here: ftfy's character tables take ~0.1 s to load, a twentieth of a
        # search query's start, and plain ASCII captions never need them.
        import ftfy  # noqa: PLC0415

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class SimpleTokenizer:
    """BPE encoder with the vocabulary and merge ranks of OpenAI CLIP."""

    def __init__(self, bpe_path: str = BPE_PATH):
        if not os.path.exists(bpe_path):
            raise FileNotFoundError(
                f"tokenizer.py: BPE vocabulary not found at {bpe_path}; "
                "reinstall the package (it ships as package data)"
            )
        with gzip.open(bpe_path) as f:
            text = f.read().decode("utf-8")
        # Rows "left right" after a version line; only the first NUM_MERGES are CLIP's. Built
        # with whole-string operations: this runs in every search query's process.
        merges = text.split("\n", NUM_MERGES + 1)[1 : 1 + NUM_MERGES]
        joined = "\n".join(merges).replace(" ", "").split("\n")
        self.byte_symbols = byte_symbols()
        # Base symbols in code-point order: the visible bytes first, then the remapped ones.
        base = sorted(self.byte_symbols.values())
        vocab = base + [s + END_OF_WORD for s in base] + joined + [SOT_TOKEN, EOT_TOKEN]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.merge_rank = dict(zip(merges, range(len(merges))))
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(vocab)
        # Keyed by the pre-tokenised word. The special tokens are seeded so that, spelled out
        # in a caption, they give their own ids as in CLIP rather than their characters' BPE.
        self._cache: dict[str, tuple[int, ...]] = {
            SOT_TOKEN: (self.sot_id,),
            EOT_TOKEN: (self.eot_id,),
        }

    def word_pieces(self, word: str) -> list[str]:
        """The vocabulary entries one pre-tokenised word splits into."""
        symbols = [self.byte_symbols[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        return merge_symbols(symbols, self.merge_rank)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(self.encoder[piece] for piece in self.word_pieces(word))
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT (as CLIP's ``SimpleTokenizer.encode``)."""
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
