"""Metrics vs hand-computed ranks (SPEC §10), including the original's tie quirk and the
multi-sentence protocol."""

import numpy as np
import pytest

from ucofia_jax.ops import metrics


def test_square_ranks_by_hand():
    # Row 0: gt 0.9 is the best -> rank 0. Row 1: 0.5 behind 0.8, 0.7 -> rank 2.
    # Row 2: 0.3 behind 0.4 -> rank 1.
    x = np.array([[0.9, 0.1, 0.2], [0.8, 0.5, 0.7], [0.1, 0.4, 0.3]])
    np.testing.assert_array_equal(metrics.diagonal_ranks(x), [0, 2, 1])
    m = metrics.compute_metrics(x)
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["R@5"] == 100.0 and m["R@10"] == 100.0
    assert m["MdR"] == 2.0  # median(0, 2, 1) + 1
    assert m["MnR"] == 2.0  # mean(0, 2, 1) + 1
    # Columns as queries: [.9 .8 .1] -> 0; [.1 .5 .4] -> 0; [.2 .7 .3] -> 1.
    v2t = metrics.compute_metrics(x.T)
    np.testing.assert_array_equal(metrics.diagonal_ranks(x.T), [0, 0, 1])
    assert v2t["R@1"] == pytest.approx(200 / 3)


def test_tie_quirk_of_the_original():
    # Row 0's gt ties with two other entries: np.where yields 3 matches (ranks 0, 1, 2), so
    # 4 "ranks" in all for 2 rows: R@1 = 2/4 (row 0's first tie + row 1), not 2/2.
    x = np.array([[0.5, 0.5, 0.5], [0.1, 0.9, 0.2], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(metrics.diagonal_ranks(x), [0, 1, 2, 0, 0])
    m = metrics.compute_metrics(x)
    assert m["R@1"] == pytest.approx(3 / 5 * 100)
    assert m["MnR"] == pytest.approx(np.mean([0, 1, 2, 0, 0]) + 1)
    opt = metrics.compute_metrics(x, ties="optimistic")
    assert opt["R@1"] == 100.0


def test_multi_sentence_by_hand():
    # 3 videos; captions: t0, t1 -> v0; t2 -> v1; t3, t4, t5 -> v2.
    text_video = np.array([0, 0, 1, 2, 2, 2])
    sim = np.array(
        [
            [0.9, 0.1, 0.0],  # t0: v0 first                -> rank 0
            [0.2, 0.8, 0.1],  # t1: v0 behind v1            -> rank 1
            [0.3, 0.2, 0.1],  # t2: v1 behind v0            -> rank 1
            [0.5, 0.6, 0.4],  # t3: v2 behind v1, v0        -> rank 2
            [0.0, 0.0, 0.7],  # t4                          -> rank 0
            [0.1, 0.3, 0.2],  # t5: v2 behind v1            -> rank 1
        ]
    )
    t2v = metrics.text_to_video_multi(sim, text_video)
    ranks = np.array([0, 1, 1, 2, 0, 1])
    assert t2v["R@1"] == pytest.approx(np.mean(ranks == 0) * 100)
    assert t2v["MnR"] == pytest.approx(ranks.mean() + 1)
    assert t2v["MdR"] == 2.0  # lower median of sorted [0,0,1,1,1,2] is 1 -> +1
    # v2t: per (query video, caption video) the max over the captions:
    # video-of-captions v0: max(t0, t1) = [0.9, 0.8, 0.1]; v1: t2 = [0.3, 0.2, 0.1];
    # v2: max(t3, t4, t5) = [0.5, 0.6, 0.7]. As [query video, caption video]:
    per_video = np.array([[0.9, 0.3, 0.5], [0.8, 0.2, 0.6], [0.1, 0.1, 0.7]])
    v2t = metrics.video_to_text_multi(sim, text_video)
    assert v2t == metrics.compute_metrics(per_video)
    np.testing.assert_array_equal(metrics.diagonal_ranks(per_video), [0, 2, 0])
    both = metrics.retrieval_metrics(sim, text_video)
    assert both["t2v"] == t2v and both["v2t"] == v2t


def test_multi_sentence_with_one_caption_each_equals_square():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(7, 7))
    square = metrics.compute_metrics(sim)
    multi = metrics.text_to_video_multi(sim, np.arange(7))
    for k in ("R@1", "R@5", "R@10", "MnR"):
        assert multi[k] == pytest.approx(square[k])


def test_markdown_table():
    m = metrics.retrieval_metrics(np.eye(3))
    table = metrics.markdown_table(m)
    assert "| t2v | 100.0 |" in table and "| v2t |" in table
