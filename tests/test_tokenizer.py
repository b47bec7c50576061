"""Tokenizer ids against OpenAI's original ``simple_tokenizer.py``.

``data/tokenizer_expected.json`` holds the BPE ids the ORIGINAL tokenizer (clip-anytorch
2.6.0 wheel, imported by path; script: ``data/gen_tokenizer_expected.py``) produced for each
text, so this test needs neither torch nor the network.
"""

import json
import os
import time

import numpy as np
import pytest

from ucofia_jax import tokenizer

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
