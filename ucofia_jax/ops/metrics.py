"""Retrieval metrics exactly as the original (CLIP4Clip metrics.py, SPEC §10), in NumPy.

Output keys: ``R@1``, ``R@5``, ``R@10`` (percent), ``MdR``, ``MnR`` (1-based ranks).

* :func:`compute_metrics` -- one query per row, ground truth on the diagonal. The original
  finds the rank with ``np.where(sort(-x) - diag == 0)``, so a row whose ground-truth score
  ties with other entries contributes one "rank" per tied entry (and the denominator grows):
  the tie quirk is reproduced on purpose; ``ties='optimistic'`` gives the usual one rank per
  row (the best tied position) instead.
* :func:`text_to_video_multi` / :func:`video_to_text_multi` -- MSVD / VATEX: several
  captions per video. t2v ranks the video of every caption (``tensor_text_to_video_metrics``);
  v2t takes, per video, the max over each video's captions (``tensor_video_to_text_sim``)
  then :func:`compute_metrics`. The original's torch.median is the *lower* median.
* Paragraph datasets (ActivityNet, DiDeMo) are one text per video: :func:`compute_metrics`.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

KEYS = ("R@1", "R@5", "R@10", "MdR", "MnR")


def _summary(ranks0: np.ndarray, lower_median: bool = False) -> Dict[str, float]:
    """0-based ranks -> the five numbers."""
    ranks0 = np.asarray(ranks0)
    n = len(ranks0)
    if n == 0:
        raise ValueError("no ranks to summarise (empty similarity matrix?)")
    if lower_median:
        med = float(np.sort(ranks0)[(n - 1) // 2]) + 1.0  # torch.median
    else:
        med = float(np.median(ranks0)) + 1.0
    return {
        "R@1": float(np.sum(ranks0 == 0)) * 100.0 / n,
        "R@5": float(np.sum(ranks0 < 5)) * 100.0 / n,
        "R@10": float(np.sum(ranks0 < 10)) * 100.0 / n,
        "MdR": med,
        "MnR": float(np.mean(ranks0)) + 1.0,
    }


def diagonal_ranks(x: np.ndarray, ties: str = "original") -> np.ndarray:
    """0-based rank of ``x[i, i]`` in row i (descending). ``ties``: 'original' = one entry per
    tied position (the original's quirk), 'optimistic' = one rank per row, the best position."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"compute_metrics needs a square [queries, items] matrix, got {x.shape}")
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, None]
    rows, cols = np.where(sx - d == 0)
    if ties == "original":
        return cols
    if ties == "optimistic":
        first = np.full(x.shape[0], -1)
        for r, c in zip(rows[::-1], cols[::-1]):
            first[r] = c
        return first
    raise ValueError(f"ties must be 'original' or 'optimistic', got {ties!r}")


def compute_metrics(x: np.ndarray, ties: str = "original") -> Dict[str, float]:
    """Rows are queries, the ground truth of row i is column i."""
    return _summary(diagonal_ranks(x, ties))


def group_texts(text_video: Sequence[int], num_videos: int) -> np.ndarray:
    """[num_videos, max_captions] text row indices per video, -1 padded, in text order."""
    text_video = np.asarray(text_video)
    groups = [np.nonzero(text_video == v)[0] for v in range(num_videos)]
    if any(len(g) == 0 for g in groups):
        empty = [v for v, g in enumerate(groups) if len(g) == 0][:5]
        raise ValueError(f"videos without a caption (first: {empty}); every test video needs one")
    width = max(len(g) for g in groups)
    out = np.full((num_videos, width), -1, np.int64)
    for v, g in enumerate(groups):
        out[v, : len(g)] = g
    return out


def stack_by_video(sim: np.ndarray, text_video: Sequence[int]) -> np.ndarray:
    """[texts, videos] -> [videos, max_captions, videos], -inf padded (the original's reshape)."""
    sim = np.asarray(sim, np.float64)
    groups = group_texts(text_video, sim.shape[1])
    out = np.full(groups.shape + (sim.shape[1],), -np.inf)
    valid = groups >= 0
    out[valid] = sim[groups[valid]]
    return out


def text_to_video_multi(sim: np.ndarray, text_video: Sequence[int]) -> Dict[str, float]:
    """Rank of the ground-truth video for every caption (``tensor_text_to_video_metrics``)."""
    sim = np.asarray(sim, np.float64)
    text_video = np.asarray(text_video)
    # Double argsort = rank of every column; stable, so ties go to the lower video index.
    order = np.argsort(-sim, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(sim.shape[1])[None, :], axis=1)
    gt = ranks[np.arange(sim.shape[0]), text_video]
    valid = np.isfinite(sim[np.arange(sim.shape[0]), text_video])
    return _summary(gt[valid], lower_median=True)


def video_to_text_multi(
    sim: np.ndarray, text_video: Sequence[int], ties: str = "original"
) -> Dict[str, float]:
    """Per (video query, video of the captions): max over that video's captions, then the
    diagonal ranks (``tensor_video_to_text_sim`` + ``compute_metrics``)."""
    stacked = stack_by_video(sim, text_video)  # [v_text, c, v]
    stacked[np.isnan(stacked)] = -np.inf
    per_video = stacked.max(axis=1).T  # [v query, v of the captions]
    return compute_metrics(per_video, ties)


def retrieval_metrics(
    sim: np.ndarray, text_video: Sequence[int] | None = None, ties: str = "original"
) -> Dict[str, Dict[str, float]]:
    """{'t2v': ..., 'v2t': ...} for a [texts, videos] matrix.

    ``text_video[t]`` = the test video of text t. With one text per video in video order (or
    ``None``) this is the square protocol (MSR-VTT 1k-A, paragraphs); otherwise multi-sentence.
    """
    sim = np.asarray(sim, np.float64)
    nt, nv = sim.shape
    if text_video is None:
        text_video = np.arange(nt)
    text_video = np.asarray(text_video)
    if text_video.shape != (nt,):
        raise ValueError(f"text_video has shape {text_video.shape}, expected ({nt},)")
    if nt == nv and np.array_equal(text_video, np.arange(nt)):
        return {"t2v": compute_metrics(sim, ties), "v2t": compute_metrics(sim.T, ties)}
    return {
        "t2v": text_to_video_multi(sim, text_video),
        "v2t": video_to_text_multi(sim, text_video, ties),
    }


def markdown_table(results: Dict[str, Dict[str, float]]) -> str:
    """| direction | R@1 | R@5 | R@10 | MdR | MnR | for every dict of metrics in ``results``."""
    lines = ["| direction | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name, m in results.items():
        if isinstance(m, dict) and all(k in m for k in KEYS):
            lines.append(f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in KEYS) + " |")
    return "\n".join(lines) + "\n"
