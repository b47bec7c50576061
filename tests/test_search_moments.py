"""Moments: a file longer than the model's window is stored as overlapping windows, decoded
in one streaming pass whose memory does not grow with the file's length.

* `window_starts` by hand.
* `MomentStream` equals `decode_clip`: a short file's one moment is ``decode_clip(path)``, each
  window [s, s + window) of a long file is ``decode_clip(path, start=s,
  end=last_window_second(s, window))`` (the training rule applied to the window), frame for
  frame. Wrong variants this catches: sampling the window with its end second included, and
  shifting every window's start by one stride.
* Peak RSS of decoding a Matroska file (no declared frame count) of 4L seconds exceeds that
  of L seconds by less than `RSS_SLACK_MB`, for `decode_clip` and `MomentStream`; the old
  decoder (one kept frame per second) grew by ~1 MB per second of this 640x480 video.
* ``index`` of a long video made of 12 known clips: its rows are the windows of
  `window_starts`, cover the file, carry start / end / duration, and each window's stored
  thumbnail is a strip of 4 frames.
* A caption finds its own time range: the long video of 12 clips against an oracle (each
  window's frames written alone, same scores exactly). Wrong variants this catches (run by
  hand): rows written with start / end one stride late, hits reporting start / end one
  stride late, non-maximum suppression keeping the lowest-scored window, and windows
  sampled with their end second included (the next clip's first frame).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
from _search_fixtures import make_clips, save_workdir, search_config
from PIL import Image

from data_pipeline import synthetic
from data_pipeline import video as video_lib
from data_pipeline.sampling import FrameSampling
from ucofia_jax.search import decoding, indexer, scoring
from ucofia_jax.search.index import Index
from ucofia_jax.search.source import ModelSource, load_model
from ucofia_jax.search.store import Store

REPO = Path(__file__).resolve().parents[1]
SAMPLING = FrameSampling(
    max_frames=3, image_size=16, feature_framerate=1, slice_framepos=2, jpeg_quality=95
)
RSS_SLACK_MB = 25  # 4x the length may add at most this much peak RSS


def _ramp_video(path: Path, seconds: int, fps: int = 2, size: int = 32) -> str:
    """Frame i is a flat grey of level (7 i) mod 256, so a decoded frame names its index."""
    frames = (np.full((size, size, 3), (i * 7) % 256, np.uint8) for i in range(seconds * fps))
    return video_lib.write_video(str(path), frames, fps, crf=0)


@pytest.mark.parametrize(
    "duration,window,stride,want",
    [
        (25.0, 4.0, 2.0, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]),
        (24.0, 4.0, 2.0, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]),  # 20 + 4 reaches the end
        (4.5, 4.0, 2.0, [0, 2]),
        (10.0, 12.0, 6.0, [0]),
        (30.0, 12.0, 6.0, [0, 6, 12, 18]),
        (7.0, 3.0, 1.5, [0, 1.5, 3.0, 4.5]),
    ],
)
def test_window_starts_by_hand(duration, window, stride, want):
    assert video_lib.window_starts(duration, window, stride) == want


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_each_moment_is_decode_clip_of_its_window(tmp_path, ext):
    path = _ramp_video(tmp_path / f"long{ext}", 25)
    window, stride = 4.0, 2.0
    stream = video_lib.MomentStream(path, SAMPLING, window=window, stride=stride, previews=4)
    moments = list(stream)
    assert stream.duration == 25.0
    starts = video_lib.window_starts(25.0, window, stride)
    assert [m.start for m in moments] == starts
    assert [m.end for m in moments] == [min(s + window, 25.0) for s in starts]
    for m in moments:
        end = video_lib.last_window_second(m.start, window)
        frames, mask = video_lib.decode_clip(path, SAMPLING, start=m.start, end=end)
        np.testing.assert_array_equal(m.mask, mask)
        np.testing.assert_array_equal(m.frames, frames, err_msg=f"window at {m.start}")
        assert 1 <= len(m.previews) <= 4 and all(p.shape[0] == 160 for p in m.previews)

    short = _ramp_video(tmp_path / f"short{ext}", 3)
    (only,) = list(video_lib.MomentStream(short, SAMPLING, window=window, stride=stride))
    frames, mask = video_lib.decode_clip(short, SAMPLING)
    assert only.start is None and only.end is None
    np.testing.assert_array_equal(only.frames, frames)
    np.testing.assert_array_equal(only.mask, mask)


def test_a_broken_long_file_raises_after_its_windows(tmp_path):
    """The truncation rule needs the whole file: a consumer sees windows, then the error."""
    path = _ramp_video(tmp_path / "whole.mkv", 20)
    cut = tmp_path / "cut.mkv"
    data = Path(path).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(video_lib.VideoDecodeError) as e:
        for m in video_lib.MomentStream(str(cut), SAMPLING, window=4, stride=2):
            got.append(m)
    assert e.value.reason == "truncated" and got  # windows came before the verdict
    messages = list(
        decoding.decode_file(
            {"path": str(cut), "rel": "cut.mkv", "sampling": SAMPLING, "window": 4, "stride": 2}
        )
    )
    assert messages[-1]["kind"] == "skip" and messages[-1]["reason"] == "truncated"


_PEAK_RSS = textwrap.dedent(
    """
    import json, resource, sys
    from data_pipeline import video
    from data_pipeline.sampling import FrameSampling
    s = FrameSampling(**json.loads(sys.argv[3]))
    if sys.argv[1] == "clip":
        video.decode_clip(sys.argv[2], s)
    else:
        for _ in video.MomentStream(sys.argv[2], s, window=12, stride=6, previews=4):
            pass
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")]
    print(int(hwm[0]) // 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def _peak_rss_mb(what: str, path: str, sampling: FrameSampling) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, what, path, json.dumps(sampling.to_dict())],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_decode_memory_is_flat_in_the_length_of_a_matroska_file(tmp_path):
    """640x480 noise at 2 fps, no declared frame count: 60 s and 240 s."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    paths = {}
    for seconds in (60, 240):
        frames = (np.roll(base, 13 * i, axis=1) for i in range(2 * seconds))
        paths[seconds] = video_lib.write_video(
            str(tmp_path / f"v{seconds}.mkv"), frames, 2, options={"preset": "ultrafast"}
        )
        with av.open(paths[seconds]) as c:  # the premise: the container declares no count
            assert int(c.streams.video[0].frames or 0) == 0
    sampling = SAMPLING.replace(max_frames=12, image_size=224)
    for what in ("clip", "moments"):
        short, long = (_peak_rss_mb(what, paths[s], sampling) for s in (60, 240))
        assert long - short < RSS_SLACK_MB, (what, short, long)


@pytest.mark.slow
def test_index_stores_the_windows_of_a_long_file_made_of_known_clips(tmp_path):
    """12 demo-style clips (2 s each at 2 fps) end to end: 24 s; the tiny model's window is
    max_frames / feature_framerate = 2 s, stride 1 s."""
    config = search_config()
    model = load_model(ModelSource(workdir=save_workdir(tmp_path / "run", config)))
    make_clips(tmp_path / "parts", 12, seed=4)
    frames = []
    for i in range(12):
        with av.open(str(tmp_path / "parts" / f"video{i}.mp4")) as c:
            frames += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    folder = tmp_path / "videos"
    folder.mkdir()
    video_lib.write_video(str(folder / "long.mp4"), frames, 2)
    video_lib.write_video(str(folder / "short.mp4"), frames[:4], 2)
    summary = indexer.build_index(
        folder, tmp_path / "idx", model, workers=0, batch_size=4, progress=False
    )
    assert (summary.indexed, summary.total) == (2, 2)
    store = Store.open(tmp_path / "idx")
    assert store.meta["window"] == {"seconds": 2.0, "stride": 1.0}
    rows = sorted(store.table.to_arrow().to_pylist(), key=lambda r: (r["path"], r["start"] or 0))
    long = [r for r in rows if r["path"] == "long.mp4"]
    (short,) = [r for r in rows if r["path"] == "short.mp4"]
    assert short["start"] is None and short["end"] is None and short["duration"] == 2.0
    duration = len(frames) / 2
    assert [r["start"] for r in long] == video_lib.window_starts(duration, 2.0, 1.0)
    assert [r["end"] for r in long] == [min(r["start"] + 2.0, duration) for r in long]
    assert long[0]["start"] == 0.0 and long[-1]["end"] == duration == 24.0
    assert all(r["duration"] == duration for r in long)
    assert len({r["video_id"] for r in rows}) == len(rows)  # one key per row
    strip = Image.open(io.BytesIO(long[3]["thumbnail"]))
    assert strip.height == decoding.STRIP_HEIGHT and strip.width > strip.height  # side by side
    assert summary.rows == len(rows) == len(long) + 1


# Texts tried as queries besides the 12 captions (each may be some clip's best match): a
# colour and a shape, and a shape and a move, in the synthetic dataset's words.
EXTRA_QUERIES = tuple(f"a {c} {s}" for c in synthetic.COLOURS for s in synthetic.SHAPES) + tuple(
    f"a {s} moves {m}" for s in synthetic.SHAPES for m in synthetic.MOVES
)
MIN_CLIPS_COVERED = 4  # clips some query picks; fewer would make the guard too weak


def test_a_query_finds_its_own_clip_inside_a_long_video(tmp_path):
    """12 clips of L = 2 s (the tiny model's window max_frames / feature_framerate) in one
    long video, windows of L at a stride of L / 2; an oracle instead of a trained model.
    A window [t, t + L) samples the seconds of that half-open range: those frames, written
    alone as "part t" (lossless, from the same decoded frames as the long file; no selection
    noise, so features depend on frames alone), must score exactly what the long file's
    window at t scores. A text whose best part is an aligned one, t = k L (clip k alone),
    must then
    find in the long file a moment (per_file 1) overlapping clip k's [k L, (k + 1) L] with
    IoU >= 0.5."""
    config = search_config(noise_at_eval=False)
    model = load_model(ModelSource(workdir=save_workdir(tmp_path / "run", config)))
    captions = make_clips(tmp_path / "clips", 12, seed=4)
    fps, length, stride = 2, 2.0, 1.0
    frames = []
    for k in range(12):
        with av.open(str(tmp_path / "clips" / f"video{k}.mp4")) as c:
            frames += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    (tmp_path / "long").mkdir()
    video_lib.write_video(str(tmp_path / "long" / "long.mp4"), frames, fps, crf=0)
    window_starts = video_lib.window_starts(len(frames) / fps, length, stride)
    (tmp_path / "parts").mkdir()
    for t in window_starts:  # the frames of [t, t + L)
        part = frames[int(t * fps) : int((t + length) * fps)]
        video_lib.write_video(str(tmp_path / "parts" / f"{t:04.1f}.mp4"), part, fps, crf=0)
    build = dict(workers=0, batch_size=8, progress=False)
    indexer.build_index(tmp_path / "long", tmp_path / "idx_long", model, **build)
    # A part lasts L (the last one less): each is a whole-file row.
    indexer.build_index(tmp_path / "parts", tmp_path / "idx_parts", model, **build)
    long_index = Index.open(tmp_path / "idx_long", model)
    parts_index = Index.open(tmp_path / "idx_parts", model)
    assert len(parts_index) == len(long_index) == len(window_starts) == 23
    starts = long_index.store.read_columns(["start"]).column("start").to_pylist()  # row order

    texts = [captions[f"video{k}.mp4"] for k in range(12)] + list(EXTRA_QUERIES)
    alone, inside = [], []  # per text: {window start: score} of the parts / the long file
    for r in parts_index.rank(texts, shortlist=len(parts_index)):
        names = [parts_index.paths[row] for row in r.rows.tolist()]
        alone.append({float(n[:-4]): s for n, s in zip(names, r.scores.tolist())})
    for r in long_index.rank(texts, shortlist=len(long_index)):
        inside.append(dict(zip((starts[row] for row in r.rows.tolist()), r.scores.tolist())))
    for i, text in enumerate(texts):
        assert sorted(inside[i]) == window_starts
        got, want = (np.asarray([d[t] for t in window_starts]) for d in (inside[i], alone[i]))
        np.testing.assert_allclose(got, want, rtol=1e-3, err_msg=text)  # float16 tolerance
    query_of = {}  # clip number -> the first text whose best part is clip k's aligned one
    for i, scores in enumerate(alone):
        best = max(scores, key=scores.get)
        if best % length == 0:
            query_of.setdefault(int(best // length), i)
    assert len(query_of) >= MIN_CLIPS_COVERED, sorted(query_of)

    found = long_index.search([texts[i] for i in query_of.values()], per_file=1)
    for (k, i), hits in zip(query_of.items(), found):
        (best,) = hits  # one file, per_file 1: one moment
        truth = (k * length, (k + 1) * length)
        iou = scoring.temporal_iou(truth, (best.start, best.end))
        assert iou >= 0.5, (k, texts[i], truth, (best.start, best.end), best.score)
