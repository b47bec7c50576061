"""A small visual report of an evaluation (the demo writes one): metrics table, recall@K
curves, a similarity heatmap and example text queries with the first frames of the clips
they retrieve. Output: ``WORKDIR/report/{recall_at_k,similarity,examples}.png`` and
``WORKDIR/report/index.html`` (self-contained: images inlined).
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.figure import Figure

from ucofia_jax.ops import metrics as metrics_lib
from ucofia_jax.runtime import distributed

NUM_EXAMPLES = 4  # example text queries drawn
TOP = 3  # retrieved clips shown per query


def _subplots(*args, **kwargs):
    # Figure objects need no pyplot state machine and no GUI backend (headless runs).
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


def recall_curve(sim: np.ndarray, text_video: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Text-to-video recall@K (percent) for every K (optimistic ties: one rank per query)."""
    gt = sim[np.arange(sim.shape[0]), text_video]
    ranks = np.sum(sim > gt[:, None], axis=1)
    return np.array([100.0 * np.mean(ranks < k) for k in ks])


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _examples(sim: np.ndarray, num_examples: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The example queries (a fixed spread of test texts) and the top videos of each."""
    nt = sim.shape[0]
    idx = np.linspace(0, nt - 1, min(num_examples, nt)).astype(int)
    best = np.stack([np.argsort(-sim[t], kind="stable")[:top] for t in idx])
    return idx, best


def drawn_first_frames(
    sim: np.ndarray,
    text_video: np.ndarray,
    video_batches: Iterable[Dict[str, np.ndarray]],
    num_examples: int = NUM_EXAMPLES,
    top: int = TOP,
) -> Dict[int, np.ndarray]:
    """{video index: first frame} of the clips ``write_report`` draws. Every process calls it:
    ``video_batches`` are this process's rows of the test videos (``eval_video_batches``,
    with ``video_index``, ``valid`` and ``frames``), so with several processes each holds
    about half of the drawn clips, and the few drawn frames are gathered from all of them.
    The drawn set is process 0's (every process has the same ``sim``; one choice is safer)."""
    sim = np.asarray(sim, np.float64)
    idx, best = _examples(sim, num_examples, top)
    drawn = np.concatenate([np.asarray(text_video)[idx], best.reshape(-1)]).astype(np.int64)
    drawn = np.asarray(distributed.process_allgather(drawn, tiled=False))[0]
    want = np.unique(drawn)
    frames, held = None, np.zeros(len(want), np.int32)
    for b in video_batches:
        valid = np.asarray(b["valid"], bool)
        vids = np.asarray(b["video_index"])[valid]
        first = np.asarray(b["frames"])[valid, 0]
        if frames is None:
            frames = np.zeros((len(want),) + np.asarray(b["frames"]).shape[2:], np.uint8)
        pos = np.searchsorted(want, vids)
        hit = (pos < len(want)) & (want[np.minimum(pos, len(want) - 1)] == vids)
        frames[pos[hit]] = first[hit]
        held[pos[hit]] = 1
    if frames is None:
        raise ValueError("drawn_first_frames: no test video batches on this process")
    all_frames = np.asarray(distributed.process_allgather(frames, tiled=False))  # [P, K, ...]
    all_held = np.asarray(distributed.process_allgather(held, tiled=False))  # [P, K]
    missing = want[~all_held.any(axis=0)]
    if len(missing):
        raise ValueError(f"drawn_first_frames: videos {missing.tolist()} are in no process's rows")
    owner = np.argmax(all_held, axis=0)
    return {int(v): all_frames[owner[k], k] for k, v in enumerate(want)}


def write_report(
    workdir: str,
    results: Dict[str, Any],
    sim: np.ndarray,
    text_video: np.ndarray,
    texts: Sequence[str],
    first_frames: Union[np.ndarray, Mapping[int, np.ndarray]],
    video_ids: Optional[Sequence[str]] = None,
    num_examples: int = NUM_EXAMPLES,
    top: int = TOP,
    title: str = "UCoFiA demo",
) -> str:
    """Writes the PNGs and index.html; returns the HTML path.

    ``sim`` [T, V] test similarities, ``text_video`` [T] ground-truth video of each text,
    ``texts`` the T captions, ``first_frames`` uint8 [V, S, S, 3] or {video index: frame}
    holding at least the drawn clips (:func:`drawn_first_frames`, which gathers them over
    processes).
    """
    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    sim = np.asarray(sim, np.float64)
    text_video = np.asarray(text_video)
    nt, nv = sim.shape
    chance_r1 = 100.0 / nv

    # Recall@K curve vs chance.
    ks = np.arange(1, min(nv, 50) + 1)
    fig, ax = _subplots(figsize=(5, 3.5))
    ax.plot(ks, recall_curve(sim, text_video, ks), label="text-to-video")
    if nt == nv and np.array_equal(text_video, np.arange(nt)):
        ax.plot(ks, recall_curve(sim.T, np.arange(nv), ks), label="video-to-text", alpha=0.8)
    ax.plot(ks, 100.0 * ks / nv, "--", color="gray", label="chance")
    ax.set_xlabel("K"), ax.set_ylabel("recall@K (%)"), ax.set_ylim(0, 100)
    ax.legend(), ax.grid(alpha=0.3), ax.set_title(f"{nt} texts x {nv} videos")
    p_recall = _save(fig, os.path.join(out, "recall_at_k.png"))

    # Similarity heatmap (first 40 x 40; rows/cols in ground-truth order).
    n = min(40, nt, nv)
    order = np.argsort(text_video, kind="stable")[:n]
    fig, ax = _subplots(figsize=(4.5, 4))
    im = ax.imshow(sim[order][:, :n], cmap="viridis")
    ax.set_xlabel("video"), ax.set_ylabel("text (sorted by its video)")
    ax.set_title("similarity (diagonal = ground truth)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    p_heat = _save(fig, os.path.join(out, "similarity.png"))

    # Example queries: a fixed spread of test texts, top clips' first frames.
    idx, best_of = _examples(sim, num_examples, top)
    fig, axes = _subplots(
        len(idx), top + 1, figsize=(2.2 * (top + 1), 2.3 * len(idx)), squeeze=False
    )
    for r, t in enumerate(idx):
        best = best_of[r]
        axes[r, 0].imshow(_frame(first_frames, text_video[t]))
        axes[r, 0].set_title("ground truth", fontsize=8)
        axes[r, 0].set_ylabel(
            "\n".join(_wrap(texts[t], 28)), fontsize=7, rotation=0, ha="right", va="center"
        )
        for c, v in enumerate(best):
            ok = v == text_video[t]
            axes[r, c + 1].imshow(_frame(first_frames, v))
            axes[r, c + 1].set_title(
                f"#{c + 1} {'(correct)' if ok else ''}",
                fontsize=8,
                color="green" if ok else "black",
            )
        for a in axes[r]:
            a.set_xticks([]), a.set_yticks([])
    p_ex = _save(fig, os.path.join(out, "examples.png"))

    rows = {k: results[k] for k in ("t2v", "v2t", "t2v_sk", "v2t_sk") if k in results}
    table = "".join(
        f"<tr><td>{k}</td>" + "".join(f"<td>{m[q]:.1f}</td>" for q in metrics_lib.KEYS) + "</tr>"
        for k, m in rows.items()
    )
    imgs = "".join(
        f'<p><img src="data:image/png;base64,{_b64(p)}"></p>' for p in (p_recall, p_heat, p_ex)
    )
    doc = (
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>step {results.get('step')}: {nt} test texts x "
        f"{nv} test videos; chance R@1 = {chance_r1:.1f}%</p>"
        "<table border=1 cellpadding=4><tr><th>direction</th>"
        + "".join(f"<th>{q}</th>" for q in metrics_lib.KEYS)
        + f"</tr>{table}</table>{imgs}"
        "</body></html>"
    )
    path = os.path.join(out, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
    return path


def _frame(first_frames, video: int) -> np.ndarray:
    try:
        return first_frames[int(video)]
    except (KeyError, IndexError):
        raise ValueError(
            f"write_report: no first frame for test video {int(video)} (it draws the ground truth "
            "and top clips of its example queries; pass drawn_first_frames(...) or all V frames)"
        ) from None


def _b64(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


def _wrap(text: str, width: int):
    words, line, out = text.split(), "", []
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            out.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    if line:
        out.append(line)
    return out[:5]
