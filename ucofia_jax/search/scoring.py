"""Two-stage scoring, coarse to fine, and what turns scores into hits (pure functions of
arrays, plus the model's scorer passed in).

1. **Shortlist**: the top-K rows of each text by the model's own coarse score, the
   video-sentence level ``scale (sentence Wg) . (video Wg1)``, computed as one dot product
   of a query vector (``SearchModel.shortlist_query``: ``scale sentence Wg Wg1^T``) with the
   stored ``vector`` column: an exact matmul here, or LanceDB's vector index (store.py).
2. **Re-rank**: the full UCoFiA score (mean of the three levels, ISA, the evaluation's
   level-3 kernel; SK-norm off) of the text with its K candidates only.
3. **Hits**: windows of one file that overlap are merged by non-maximum suppression on
   their temporal IoU, at most ``per_file`` hits per file, then the ``top`` best.
4. **Confidence**: how far a hit's score stands above the query's background (see
   ``confidence``); ``no_good_match`` when the best hit does not.

With K >= the number of rows the ranking is the exhaustive full-score ranking.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

FetchFn = Callable[[np.ndarray], Dict[str, np.ndarray]]  # row offsets -> stored features
ScoreFn = Callable[[object, Dict[str, np.ndarray]], np.ndarray]  # (text[1], video) -> [1, V]

# Two windows of one file whose temporal IoU exceeds this are one moment (the lower one is
# suppressed). Windows at the default stride (half the window) overlap with IoU 1/3.
NMS_IOU = 0.3


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


def coarse_scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """[T, N] coarse scores: query vectors (``shortlist_query``) . stored vectors."""
    return np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T


def shortlist(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """[T, K] row indices of each text's K best rows by the coarse score."""
    sims = coarse_scores(queries, vectors)
    return np.stack([top_k(row, k) for row in sims]) if len(sims) else np.zeros((0, 0), int)


def rerank(
    candidates: np.ndarray, full_scores: np.ndarray, top: int
) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the ``top`` best of ``candidates`` by ``full_scores`` (same order)."""
    order = top_k(np.asarray(full_scores, np.float64), top)
    return candidates[order], np.asarray(full_scores)[order]


def rerank_candidates(
    text_features,
    candidates: Sequence[np.ndarray],
    *,
    top: int,
    fetch: FetchFn,
    score: ScoreFn,
    text_row: Callable[[object, int], object],
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per text i: (rows, full scores) of the ``top`` best of ``candidates[i]``, best first.
    ``fetch`` loads the candidates' stored features, ``score`` scores one text against them,
    ``text_row`` slices text i out of ``text_features``."""
    out = []
    for i, rows in enumerate(candidates):
        rows = np.asarray(rows, np.int64)
        if len(rows) == 0:
            out.append((rows, np.zeros((0,), np.float32)))
            continue
        full = np.asarray(score(text_row(text_features, i), fetch(rows)))[0]
        out.append(rerank(rows, full, top))
    return out


def two_stage(
    text_features,
    queries: np.ndarray,
    vectors: np.ndarray,
    *,
    k: int,
    top: int,
    fetch: FetchFn,
    score: ScoreFn,
    text_row: Callable[[object, int], object],
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per text: (row indices, full scores), best first, of the exact coarse shortlist of
    ``max(k, top)`` rows re-ranked by the full score (see ``rerank_candidates``)."""
    cands = shortlist(queries, vectors, max(k, top))
    return rerank_candidates(
        text_features, list(cands), top=top, fetch=fetch, score=score, text_row=text_row
    )


def overlap_at(a: np.ndarray, b: np.ndarray, n: int = 10) -> float:
    """|top-n of a & top-n of b| / n (row index lists, best first)."""
    n = min(n, len(a), len(b))
    if n == 0:
        return 1.0
    return len(set(a[:n].tolist()) & set(b[:n].tolist())) / n


# ---------------------------------------------------------------------- moments -> hits
def temporal_iou(
    a: Tuple[Optional[float], Optional[float]], b: Tuple[Optional[float], Optional[float]]
) -> float:
    """Intersection over union of two time ranges (start, end) in seconds. A range with a
    missing bound is the whole file, which every range of that file lies in: IoU 1."""
    if None in a or None in b:
        return 1.0
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 1.0


def select_hits(
    scores: np.ndarray,
    files: Sequence[str],
    starts: Sequence[Optional[float]],
    ends: Sequence[Optional[float]],
    *,
    top: int,
    per_file: int,
    iou: float = NMS_IOU,
) -> np.ndarray:
    """Positions (into the given arrays) of the hits to show, best first: greedy
    non-maximum suppression per file (a candidate whose IoU with a kept window of the same
    file exceeds ``iou`` is dropped), at most ``per_file`` per file, at most ``top``."""
    if per_file < 1:
        raise ValueError(f"per_file must be at least 1, got {per_file}")
    kept: Dict[str, List[int]] = {}
    out: List[int] = []
    for j in top_k(np.asarray(scores, np.float64), len(scores)).tolist():
        if len(out) >= top:
            break
        same = kept.setdefault(files[j], [])
        if len(same) >= per_file:
            continue
        span = (starts[j], ends[j])
        if any(temporal_iou(span, (starts[m], ends[m])) > iou for m in same):
            continue
        same.append(j)
        out.append(j)
    return np.asarray(out, np.int64)


# ---------------------------------------------------------------------- confidence
# The confidence of a hit is a logistic function of how many standard deviations its coarse
# score (the shortlist's, the model's video-sentence level) stands above the query's coarse
# scores on a fixed sample of the collection (``background_rows``: every row of a collection
# up to BACKGROUND_SIZE). CONFIDENCE_MIDPOINT is the standard score at which it is 0.5, the
# line between a match and "no good match"; CONFIDENCE_WIDTH sets how fast it saturates.
# Both come from the demo measurement (docs/search.md, benchmarks/search_confidence.py).
CONFIDENCE_MIDPOINT = 1.95
CONFIDENCE_WIDTH = 0.2
BACKGROUND_SIZE = 4096


def background_rows(n_rows: int, size: int = BACKGROUND_SIZE, seed: int = 0) -> np.ndarray:
    """A fixed (seeded) sample of ``size`` row positions out of ``n_rows``, sorted; every
    row when there are no more. Fixed so that the same index gives the same confidences."""
    if n_rows <= size:
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size, replace=False)).astype(np.int64)


def standard_scores(scores: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(scores - mean) / std of the background scores (std floored at 1e-6: a collection
    whose rows all score alike gives a large z only to a clearly higher score)."""
    bg = np.asarray(background, np.float64)
    if bg.size == 0:
        return np.zeros(np.shape(scores), np.float64)
    return (np.asarray(scores, np.float64) - bg.mean()) / max(float(bg.std()), 1e-6)


def confidence(
    z: np.ndarray, midpoint: float = CONFIDENCE_MIDPOINT, width: float = CONFIDENCE_WIDTH
) -> np.ndarray:
    """Confidence in [0, 1] from standard scores: logistic((z - midpoint) / width);
    increasing in z, 0.5 at the midpoint."""
    x = (np.asarray(z, np.float64) - midpoint) / width
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # the logistic, without overflow for large |x|


def is_no_good_match(confidences: Sequence[float]) -> bool:
    """True when there are no hits or the best hit's confidence is below one half (its
    score is within CONFIDENCE_MIDPOINT standard deviations of the background)."""
    return len(confidences) == 0 or max(confidences) < 0.5
