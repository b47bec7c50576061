"""The evaluation report (ucofia_jax/evaluation/report.py): the example clips' frame strips
with the test set split over processes (each process holds only its rows of the test videos,
not in video order, so the drawn strips are gathered; two processes are simulated by two
threads meeting in a fake allgather); the heatmap of every test item as per-row ranks; the
metric notes and the search commands in the page."""

import threading

import numpy as np
import pytest

from ucofia_jax.evaluation import report

NV, S = 12, 4


def _frames_of(video: int) -> np.ndarray:
    return np.full((S, S, 3), 10 * video + 1, np.uint8)  # a frame that names its video


def _batches(rows: np.ndarray, batch: int, padding_batches: int = 0):
    """One process's eval batches: these video rows, 2 frames each, padded with invalid rows;
    then ``padding_batches`` batches of invalid rows only (a process whose share ran out
    while another's had not, as the multi-process evaluation gives)."""
    for lo in range(0, len(rows), batch):
        part = rows[lo : lo + batch]
        pad = batch - len(part)
        vids = np.concatenate([part, np.full(pad, part[0])]).astype(np.int32)
        frames = np.stack([np.stack([_frames_of(v), _frames_of(v) + 1]) for v in vids])
        valid = np.r_[np.ones(len(part)), np.zeros(pad)].astype(np.int32)
        yield {"video_index": vids, "frames": frames, "valid": valid}
    for _ in range(padding_batches):
        vids = np.full(batch, rows[0], np.int32)
        frames = np.stack([np.stack([_frames_of(v), _frames_of(v) + 1]) for v in vids])
        yield {"video_index": vids, "frames": frames, "valid": np.zeros(batch, np.int32)}


class _TwoProcesses:
    """process_allgather(x, tiled=False) across two threads: stacks both threads' values."""

    def __init__(self):
        self.barrier = threading.Barrier(2)
        self.slots = [None, None]
        self.local = threading.local()

    def allgather(self, x, tiled=True):
        assert not tiled
        i = self.local.index
        self.slots[i] = np.asarray(x)
        self.barrier.wait()
        out = np.stack(self.slots)
        self.barrier.wait()  # both read before the next call overwrites
        return out


def _sim(seed=0):
    rng = np.random.default_rng(seed)
    sim = rng.normal(size=(2 * NV, NV))
    text_video = np.repeat(np.arange(NV), 2)
    return sim, text_video


def _strip_of(video: int) -> np.ndarray:
    """The strip _batches' two frames of ``video`` make: side by side, in time order."""
    return np.concatenate([_frames_of(video), _frames_of(video) + 1], axis=1)


def test_drawn_strips_are_gathered_from_both_processes(monkeypatch):
    sim, text_video = _sim()
    fake = _TwoProcesses()
    monkeypatch.setattr(report.distributed, "process_allgather", fake.allgather)
    # Interleaved halves, as shard_plan gives each process every other block of rows.
    rows = [np.array([0, 1, 4, 5, 8, 9]), np.array([2, 3, 6, 7, 10, 11])]
    out, errors = [None, None], []

    def process(i):
        fake.local.index = i
        try:
            batches = _batches(rows[i], 4, padding_batches=i)  # process 1 ends with padding
            out[i] = report.drawn_frame_strips(sim, text_video, batches)
        except Exception as e:  # noqa: BLE001 -- surfaced by the assertion below
            errors.append(e)
            fake.barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    idx, best = report._examples(sim, report.NUM_EXAMPLES, report.TOP)
    drawn = set(text_video[idx].tolist()) | set(best.reshape(-1).tolist())
    assert set(out[0]) == set(out[1]) == drawn
    assert any(v in rows[1] for v in drawn) and any(v in rows[0] for v in drawn)
    for v in drawn:  # each the strip of its own video, whichever process held it
        assert out[0][v].shape == (S, 2 * S, 3)
        np.testing.assert_array_equal(out[0][v], _strip_of(v))
        np.testing.assert_array_equal(out[1][v], _strip_of(v))


def test_write_report_from_drawn_strips(tmp_path):
    sim, text_video = _sim(1)
    frames = report.drawn_frame_strips(sim, text_video, _batches(np.arange(NV), 5))
    texts = [f"caption {t}" for t in range(len(text_video))]
    res = {"step": 3, "t2v": dict.fromkeys(("R@1", "R@5", "R@10", "MdR", "MnR"), 1.0)}
    path = report.write_report(str(tmp_path), res, sim, text_video, texts, frames)
    assert (tmp_path / "report" / "examples.png").stat().st_size > 0 and path.endswith(".html")
    # Frames that leave out a drawn clip are refused, naming the video.
    missing = dict(frames)
    gone = next(iter(missing))
    del missing[gone]
    with pytest.raises(ValueError, match=f"no frame strip for test video {gone}"):
        report.write_report(str(tmp_path), res, sim, text_video, texts, missing)


def test_row_ranks_against_a_sort_per_row():
    sim = np.array([[0.1, 0.9, 0.5], [3.0, -1.0, 2.0]])
    np.testing.assert_array_equal(report.row_ranks(sim), [[2, 0, 1], [0, 2, 1]])
    sim, _ = _sim(2)
    ranks = report.row_ranks(sim)
    for row, r in zip(sim, ranks):  # rank k holds the k-th largest score
        np.testing.assert_array_equal(row[np.argsort(r)], np.sort(row)[::-1])


def test_heatmap_holds_every_test_item_with_the_truth_on_the_diagonal():
    """Rows of all T texts, each over all V videos (more than the 40 x 40 corner the report
    once drew), sorted by ground truth: with a score that ranks each text's own video first,
    the ground-truth cells are all rank 0, whatever each row's scale (rows scaled 1e-3 ..
    1e3)."""
    nv = 50
    rng = np.random.default_rng(3)
    text_video = rng.permutation(np.repeat(np.arange(nv), 2))
    sim = rng.normal(size=(2 * nv, nv))
    sim[np.arange(2 * nv), text_video] += 10.0
    sim *= np.logspace(-3, 3, 2 * nv)[:, None]
    ranks, truth = report.heatmap_rows(sim, text_video)
    assert ranks.shape == (2 * nv, nv)
    np.testing.assert_array_equal(truth, np.repeat(np.arange(nv), 2))
    assert (ranks[np.arange(2 * nv), truth] == 0).all()
    assert sorted(ranks[5].tolist()) == list(range(nv))


def test_page_explains_the_metrics_and_ends_with_the_search_commands(tmp_path):
    sim, text_video = _sim(4)
    strips = {v: _strip_of(v) for v in range(NV)}
    texts = [f"caption {t}" for t in range(len(text_video))]
    res = {"step": 3, "t2v": dict.fromkeys(("R@1", "R@5", "R@10", "MdR", "MnR"), 1.0)}
    workdir = tmp_path / "run"
    (workdir / "data" / "raw" / "videos").mkdir(parents=True)  # the demo's layout
    page = open(report.write_report(str(workdir), res, sim, text_video, texts, strips)).read()
    for term in ("R@K", "MdR / MnR", "t2v / v2t", "SK-norm"):
        assert term in page, term
    commands = report.search_commands(str(workdir))
    assert page.rstrip().endswith("</pre></body></html>")
    for line in commands:
        assert line.replace('"', "&quot;") in page
    assert commands[0] == (
        f".venv/bin/python -m ucofia_jax.search index --videos {workdir}/data/raw/videos "
        f"--index {workdir}/videos.ucofia --workdir {workdir}"
    )
    other = report.search_commands(str(tmp_path / "no_videos_here"))
    assert "--videos YOUR_VIDEO_FOLDER" in other[0]
