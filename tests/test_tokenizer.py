"""Tokenizer ids against OpenAI's original ``simple_tokenizer.py``.

``data/tokenizer_expected.json`` holds the BPE ids the ORIGINAL tokenizer (clip-anytorch
2.6.0 wheel, imported by path; script: ``data/gen_tokenizer_expected.py``) produced for each
text, so this test needs neither torch nor the network.
"""

import html
import json
import os
import time

import ftfy
import numpy as np
import pytest

from ucofia_jax.models import tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data", "tokenizer_expected.json")


@pytest.fixture(scope="module")
def expected():
    with open(DATA) as f:
        return json.load(f)


def test_special_ids(expected):
    tok = tokenizer.get_tokenizer()
    assert (tok.sot_id, tok.eot_id) == (expected["sot"], expected["eot"]) == (49406, 49407)
    assert tok.vocab_size == 49408


def test_bpe_matches_original(expected):
    tok = tokenizer.get_tokenizer()
    for case in expected["cases"]:
        assert tok.encode(case["text"]) == case["bpe"], repr(case["text"])


@pytest.mark.parametrize("max_words", [2, 5, 32, 77])
def test_tokenize_layout(expected, max_words):
    texts = [c["text"] for c in expected["cases"]]
    ids, mask = tokenizer.tokenize(texts, max_words)
    assert ids.shape == mask.shape == (len(texts), max_words)
    assert ids.dtype == mask.dtype == np.int32
    for i, case in enumerate(expected["cases"]):
        row = [expected["sot"]] + case["bpe"][: max_words - 2] + [expected["eot"]]
        want = np.zeros(max_words, np.int32)
        want[: len(row)] = row
        np.testing.assert_array_equal(ids[i], want, err_msg=repr(case["text"]))
        np.testing.assert_array_equal(mask[i], (np.arange(max_words) < len(row)).astype(np.int32))
        # The sentence feature is read at argmax(ids): the appended EOT is the first maximum
        # unless the text itself spelled out a special token (kept as in the original).
        if expected["eot"] not in row[:-1]:
            assert int(np.argmax(ids[i])) == len(row) - 1


def test_truncation_keeps_eot(expected):
    long = [c for c in expected["cases"] if len(c["bpe"]) > 100][0]
    ids, mask = tokenizer.tokenize([long["text"]], 32)
    assert mask.sum() == 32 and ids[0, -1] == expected["eot"] and ids[0, 0] == expected["sot"]
    np.testing.assert_array_equal(ids[0, 1:-1], long["bpe"][:30])


def test_byte_symbols_are_a_bijection_fixing_visible_bytes():
    table = tokenizer.byte_symbols()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    # Written from the rule, not from the ranges in the module: a byte whose latin-1
    # character is visible (printable and not blank) is kept, the others are renumbered
    # from 256 up in byte order.
    hidden = [b for b in range(256) if not (chr(b).isprintable() and not chr(b).isspace())]
    assert len(hidden) == 68
    for b in range(256):
        if b in hidden:
            assert table[b] == chr(256 + hidden.index(b)), b
        else:
            assert table[b] == chr(b), b
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    # Known values: space, NUL, DEL, NBSP and the soft hyphen.
    assert (table[0x20], table[0x00], table[0x7F], table[0xA0], table[0xAD]) == (
        "\u0120",
        "\u0100",
        "\u0121",
        "\u0142",
        "\u0143",
    )


def test_vocabulary_layout():
    tok = tokenizer.get_tokenizer()
    enc = tok.encoder
    # 256 base symbols in code-point order, the same with the end-of-word marker, then the
    # merges in rank order, then the two special tokens.
    assert (enc["!"], enc["~"], enc["\xa1"], enc["\xff"], enc["\u0100"], enc["\u0143"]) == (
        0,
        93,
        94,
        187,
        188,
        255,
    )
    assert (enc["!</w>"], enc["a</w>"], enc["\u0143</w>"]) == (256, 320, 511)
    assert (enc["in"], enc["th"], enc["an"]) == (512, 513, 514)  # the first three merges
    assert len(enc) == tok.vocab_size == 49408
    assert tok.merge_rank["i n"] == 0 and len(tok.merge_rank) == 49408 - 512 - 2
    # The file lists more merges than CLIP uses; the first one past the cut must not apply.
    assert tok.word_pieces("jekyll") == ["jekyll</w>"]
    assert tok.word_pieces("habib") == ["ha", "bib</w>"]


def test_merge_symbols_rank_order():
    merge = tokenizer.merge_symbols
    # The lower rank wins wherever the pair sits, not the leftmost ranked pair.
    assert merge(["a", "b", "c"], {"b c": 0, "a b": 1}) == ["a", "bc"]
    assert merge(["a", "b", "c"], {"a b": 0, "b c": 1}) == ["ab", "c"]
    # Overlapping occurrences join from the left, every occurrence in one round.
    assert merge(["a", "a", "a"], {"a a": 0}) == ["aa", "a"]
    assert merge(["a", "a", "a", "a", "a"], {"a a": 0}) == ["aa", "aa", "a"]
    # Every occurrence of the chosen pair joins in the same round, before any pair that
    # only exists once it has joined: one occurrence at a time would give ["aba", "b"].
    assert merge(["a", "b", "a", "b"], {"ab a": 0, "a b": 1}) == ["ab", "ab"]
    # Joined symbols take part in later rounds; a pair without a rank never joins.
    ranks = {"a b": 0, "ab c": 1, "c d": 2}
    assert merge(["a", "b", "c", "d"], ranks) == ["abc", "d"]
    assert merge(["x"], {}) == ["x"]
    assert merge(["x", "y"], {}) == ["x", "y"]


@pytest.mark.parametrize(
    "word,pieces",
    [
        # Each differs from what a wrong merge order gives with CLIP's ranks: always taking the
        # leftmost ranked pair, taking the highest rank, or scanning right to left.
        ("aaaa", ["aaaa</w>"]),
        ("zzzzzz", ["zzzz", "zz</w>"]),
        ("woooow", ["woo", "oo", "w</w>"]),
        ("nananana", ["nan", "an", "ana</w>"]),
        ("bookkeeper", ["book", "keeper</w>"]),
        ("assesses", ["asse", "sses</w>"]),
    ],
)
def test_word_pieces_where_merge_order_matters(word, pieces):
    tok = tokenizer.get_tokenizer()
    assert tok.word_pieces(word) == pieces
    assert tok.encode(word) == [tok.encoder[p] for p in pieces]


def test_each_distinct_word_is_merged_once(monkeypatch):
    calls = []
    real = tokenizer.merge_symbols

    def counting(symbols, ranks):
        calls.append("".join(symbols))
        return real(symbols, ranks)

    monkeypatch.setattr(tokenizer, "merge_symbols", counting)
    tok = tokenizer.SimpleTokenizer()
    first = tok.encode("a man and a man")
    assert tok.encode("A MAN") == first[:2]
    assert calls == ["a</w>", "man</w>", "and</w>"]
    # Spelled-out special tokens map to their own ids without going through the merges.
    assert tok.encode("<|startoftext|> <|endoftext|>") == [tok.sot_id, tok.eot_id]
    assert len(calls) == 3


def test_errors():
    with pytest.raises(TypeError, match="tokenizer.py"):
        tokenizer.tokenize("a single string", 32)
    with pytest.raises(ValueError, match="max_words"):
        tokenizer.tokenize(["x"], 1)


def test_speed_many_captions():
    # Captions repeat words, so the per-word BPE cache makes this cheap; 200k captions at
    # this rate take a few tens of seconds at most.
    words = "a man woman is are singing dancing cooking in on the stage kitchen video".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 10)) for _ in range(5000)]
    t0 = time.perf_counter()
    ids, _ = tokenizer.tokenize(texts, 32)
    dt = time.perf_counter() - t0
    print(f"tokenize: {len(texts)} captions in {dt:.2f}s ({1e6 * dt / len(texts):.0f} us/caption)")
    assert ids.shape == (5000, 32)
    assert dt < 30


def _random_texts(n: int, alphabet: str, seed: int) -> list:
    rng = np.random.default_rng(seed)
    chars = np.asarray(list(alphabet))
    return ["".join(rng.choice(chars, rng.integers(1, 40))) for _ in range(n)]


def test_ftfy_shortcut_agrees_with_ftfy():
    # clean_text skips ftfy where ftfy_leaves_unchanged says it would change nothing; on
    # text the shortcut accepts, ftfy must indeed return it unchanged, and the cleaned
    # text must equal what running ftfy always gives (on text of every kind).
    printable = "".join(chr(c) for c in range(0x20, 0x7F))
    tricky = printable + "&;#\t\n\r\x00\x1b\x7f\u00e9\u00c3\u00a9\u201c\u201d\uff21\u2028"
    entity_soup = ["&amp;amp;amp;", "fish &amp; chips", "&lt;b&gt;", "caf\u00c3\u00a9", "a\r\nb"]
    texts = _random_texts(3000, printable, 0) + _random_texts(3000, tricky, 1) + entity_soup
    accepted = [t for t in texts if tokenizer.ftfy_leaves_unchanged(t)]
    assert len(accepted) > 1000  # the random printable text is mostly accepted
    assert all(ftfy.fix_text(t) == t for t in accepted)

    def always_ftfy(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return tokenizer._WHITESPACE.sub(" ", text).strip().lower()

    for t in texts:
        assert tokenizer.clean_text(t) == always_ftfy(t), repr(t)
