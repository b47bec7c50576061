"""Two-stage scoring, coarse to fine (pure functions of arrays, plus the model's scorer).

1. **Shortlist**: the top-K videos of each text by the video-sentence similarity
   (``sentence . vector``: one stored vector per video, an exact matmul here).
2. **Re-rank**: the full UCoFiA score (mean of the three levels, ISA, the evaluation's
   level-3 kernel; SK-norm off) of the text with its K candidates only.

With K >= the number of videos the result is the exhaustive full-score ranking.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

FetchFn = Callable[[np.ndarray], Dict[str, np.ndarray]]  # row offsets -> stored features
ScoreFn = Callable[[object, Dict[str, np.ndarray]], np.ndarray]  # (text[1], video) -> [1, V]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest of a 1-d array, best first; ties broken by index."""
    k = min(int(k), scores.shape[0])
    if k <= 0:
        return np.zeros((0,), np.int64)
    if k < scores.shape[0]:
        part = np.argpartition(-scores, k - 1)[:k]
    else:
        part = np.arange(scores.shape[0])
    order = np.lexsort((part, -scores[part]))
    return part[order]


def shortlist(sentences: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """[T, K] row indices of each text's K best videos by sentence . vector."""
    sims = np.asarray(sentences, np.float32) @ np.asarray(vectors, np.float32).T
    return np.stack([top_k(row, k) for row in sims]) if len(sims) else np.zeros((0, 0), int)


def rerank(
    candidates: np.ndarray, full_scores: np.ndarray, top: int
) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the ``top`` best of ``candidates`` by ``full_scores`` (same order)."""
    order = top_k(np.asarray(full_scores, np.float64), top)
    return candidates[order], np.asarray(full_scores)[order]


def two_stage(
    text_features,
    sentences: np.ndarray,
    vectors: np.ndarray,
    *,
    k: int,
    top: int,
    fetch: FetchFn,
    score: ScoreFn,
    text_row: Callable[[object, int], object],
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per text: (row indices, full scores), best first. ``fetch`` loads the candidates'
    stored features, ``score`` scores one text against them, ``text_row`` slices text i."""
    out = []
    cands = shortlist(sentences, vectors, max(k, top))
    for i in range(cands.shape[0]):
        rows = cands[i]
        if len(rows) == 0:
            out.append((rows, np.zeros((0,), np.float32)))
            continue
        feats = fetch(rows)
        full = np.asarray(score(text_row(text_features, i), feats))[0]
        out.append(rerank(rows, full, top))
    return out


def overlap_at(a: np.ndarray, b: np.ndarray, n: int = 10) -> float:
    """|top-n of a & top-n of b| / n (row index lists, best first)."""
    n = min(n, len(a), len(b))
    if n == 0:
        return 1.0
    return len(set(a[:n].tolist()) & set(b[:n].tolist())) / n
