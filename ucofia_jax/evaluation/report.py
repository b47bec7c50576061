"""A small visual report of an evaluation (the demo writes one): the metrics table and what
each metric means, recall@K curves, a heatmap of every test text against every test video
(each row as ranks, so the ground-truth diagonal shows whatever the scale of the scores),
example text queries with a strip of frames of each clip they retrieve, and the commands
that search the run's videos. Output: ``WORKDIR/report/{recall_at_k,similarity,examples}.png``
and ``WORKDIR/report/index.html`` (self-contained: images inlined).
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
# Heatmap colours: ranks 0 (best) .. RANK_CLIP - 1 get their own shade, worse ranks share one,
# so the few videos a text ranks first stand out against the rest.
RANK_CLIP = 10
# The demo's layout (configs/demo.py: the synthetic clips under WORKDIR/data/raw/videos): the
# report's search commands name that folder when it is there, else a placeholder.
DEMO_VIDEOS = os.path.join("data", "raw", "videos")
METRIC_NOTES = (
    (
        "t2v / v2t",
        "text-to-video: each test caption ranks all test videos; video-to-text: "
        "each video ranks all captions",
    ),
    (
        "_sk",
        "the same after SK-norm (Sinkhorn normalisation of the score matrix, which evens "
        "out videos that match everything)",
    ),
    (
        "R@K",
        "recall at K: percent of queries whose true match is among the first K results "
        "(higher is better)",
    ),
    ("MdR / MnR", "median / mean rank of the true match (1 is best; lower is better)"),
)


def _subplots(*args, **kwargs):
    # Figure objects need no pyplot state machine and no GUI backend (headless runs).
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(*args, **kwargs)


def recall_curve(sim: np.ndarray, text_video: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Text-to-video recall@K (percent) for every K (optimistic ties: one rank per query)."""
    gt = sim[np.arange(sim.shape[0]), text_video]
    ranks = np.sum(sim > gt[:, None], axis=1)
    return np.array([100.0 * np.mean(ranks < k) for k in ks])


def row_ranks(sim: np.ndarray) -> np.ndarray:
    """[T, V] -> the rank of each video in its text's row (0 = best; ties by column order)."""
    order = np.argsort(-np.asarray(sim, np.float64), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[1])[None, :], axis=1)
    return ranks


def heatmap_rows(sim: np.ndarray, text_video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every test text's row of ranks (``row_ranks``), rows sorted by their ground-truth
    video, and that video per row: the ground truth then runs down the diagonal."""
    order = np.argsort(np.asarray(text_video), kind="stable")
    return row_ranks(sim)[order], np.asarray(text_video)[order]


def frame_strip(frames: np.ndarray) -> np.ndarray:
    """'f s s 3' frames of one clip -> one 's (f*s) 3' image, left to right in time."""
    frames = np.asarray(frames)
    return np.concatenate(list(frames), axis=1)


def search_commands(workdir: str) -> list:
    """The commands that index this run's videos and search them (README, Search)."""
    videos = os.path.join(workdir, DEMO_VIDEOS)
    videos = videos if os.path.isdir(videos) else "YOUR_VIDEO_FOLDER"
    index = os.path.join(workdir, "videos.ucofia")
    cli = ".venv/bin/python -m ucofia_jax.search"
    return [
        f"{cli} index --videos {videos} --index {index} --workdir {workdir}",
        f'{cli} query --index {index} "a red circle moves left" --top 5',
        f"{cli} serve --index {index} --port 8080",
    ]


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _examples(sim: np.ndarray, num_examples: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The example queries (a fixed spread of test texts) and the top videos of each."""
    nt = sim.shape[0]
    idx = np.linspace(0, nt - 1, min(num_examples, nt)).astype(int)
    best = np.stack([np.argsort(-sim[t], kind="stable")[:top] for t in idx])
    return idx, best


def drawn_frame_strips(
    sim: np.ndarray,
    text_video: np.ndarray,
    video_batches: Iterable[Dict[str, np.ndarray]],
    num_examples: int = NUM_EXAMPLES,
    top: int = TOP,
) -> Dict[int, np.ndarray]:
    """{video index: strip of its frames} (``frame_strip``) of the clips ``write_report``
    draws. Every process calls it:
    ``video_batches`` are this process's rows of the test videos (``eval_video_batches``,
    with ``video_index``, ``valid`` and ``frames``), so with several processes each holds
    about half of the drawn clips, and the few drawn strips are gathered from all of them.
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
        # Padding rows too: a process's last batches may hold no valid row at all.
        strips = np.stack([frame_strip(f) for f in np.asarray(b["frames"])])[valid]
        if frames is None:
            frames = np.zeros((len(want),) + strips.shape[1:], np.uint8)
        pos = np.searchsorted(want, vids)
        hit = (pos < len(want)) & (want[np.minimum(pos, len(want) - 1)] == vids)
        frames[pos[hit]] = strips[hit]
        held[pos[hit]] = 1
    if frames is None:
        raise ValueError("drawn_frame_strips: no test video batches on this process")
    all_frames = np.asarray(distributed.process_allgather(frames, tiled=False))  # [P, K, ...]
    all_held = np.asarray(distributed.process_allgather(held, tiled=False))  # [P, K]
    missing = want[~all_held.any(axis=0)]
    if len(missing):
        raise ValueError(f"drawn_frame_strips: videos {missing.tolist()} are in no process's rows")
    owner = np.argmax(all_held, axis=0)
    return {int(v): all_frames[owner[k], k] for k, v in enumerate(want)}


def write_report(
    workdir: str,
    results: Dict[str, Any],
    sim: np.ndarray,
    text_video: np.ndarray,
    texts: Sequence[str],
    strips: Union[np.ndarray, Mapping[int, np.ndarray]],
    video_ids: Optional[Sequence[str]] = None,
    num_examples: int = NUM_EXAMPLES,
    top: int = TOP,
    title: str = "UCoFiA demo",
) -> str:
    """Writes the PNGs and index.html; returns the HTML path.

    ``sim`` [T, V] test similarities, ``text_video`` [T] ground-truth video of each text,
    ``texts`` the T captions, ``strips`` uint8 [V, S, W, 3] or {video index: image} holding
    at least the drawn clips (:func:`drawn_frame_strips`, which gathers them over processes).
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

    # Every text x every video, each row as ranks (rows in ground-truth order).
    ranks, _ = heatmap_rows(sim, text_video)
    clip = min(RANK_CLIP, nv)
    fig, ax = _subplots(figsize=(5, 4.5))
    im = ax.imshow(
        np.minimum(ranks, clip - 1), cmap="viridis_r", vmin=0, vmax=clip - 1, aspect="auto"
    )
    ax.set_xlabel(f"video (all {nv})"), ax.set_ylabel(f"text (all {nt}, sorted by its video)")
    ax.set_title(f"rank of each video for each text\n(0 = best; {clip - 1}+ share a colour)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    p_heat = _save(fig, os.path.join(out, "similarity.png"))

    # Example queries: a fixed spread of test texts, a strip of frames of each top clip.
    idx, best_of = _examples(sim, num_examples, top)
    fig, axes = _subplots(
        len(idx), top + 1, figsize=(3.2 * (top + 1), 1.5 * len(idx) + 0.5), squeeze=False
    )
    for r, t in enumerate(idx):
        best = best_of[r]
        axes[r, 0].imshow(_strip(strips, text_video[t]))
        axes[r, 0].set_title("ground truth", fontsize=8)
        axes[r, 0].set_ylabel(
            "\n".join(_wrap(texts[t], 28)), fontsize=7, rotation=0, ha="right", va="center"
        )
        for c, v in enumerate(best):
            ok = v == text_video[t]
            axes[r, c + 1].imshow(_strip(strips, v))
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
    notes = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in METRIC_NOTES)
    commands = html.escape("\n".join(search_commands(workdir)))
    doc = (
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>step {results.get('step')}: {nt} test texts x "
        f"{nv} test videos; chance R@1 = {chance_r1:.1f}%</p>"
        "<table border=1 cellpadding=4><tr><th>direction</th>"
        + "".join(f"<th>{q}</th>" for q in metrics_lib.KEYS)
        + f"</tr>{table}</table><ul id='metrics'>{notes}</ul>{imgs}"
        "<h2>Search these videos</h2><p>Index the run's videos, then search them by text "
        "(README, Search your videos):</p>"
        f"<pre id='search-commands'>{commands}</pre>"
        "</body></html>"
    )
    path = os.path.join(out, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
    return path


def _strip(strips, video: int) -> np.ndarray:
    try:
        return strips[int(video)]
    except (KeyError, IndexError):
        raise ValueError(
            f"write_report: no frame strip for test video {int(video)} (it draws the ground "
            "truth and top clips of its example queries; pass drawn_frame_strips(...) or all V)"
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
