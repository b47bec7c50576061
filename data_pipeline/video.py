"""Video decoding with PyAV: the original frame sampling, resize + center crop, uint8 RGB.

Frame sampling follows CLIP4Clip's ``rawvideo_util.py`` (which UCoFiA inherits) exactly,
except that frames are counted by decoding rather than by OpenCV's seek:

* ``fps = int(average frame rate)`` (OpenCV's ``int(CAP_PROP_FPS)``: 29.97 -> 29);
* ``total_duration = ceil(num_frames / fps)`` seconds;
* window ``[start_sec, end_sec]`` = ``[0, total_duration]`` without start, else
  ``[start, min(end, total_duration)]``; both ends inclusive (``np.arange(start, end + 1)``);
* ``interval = max(fps // feature_framerate, 1)``, ``inds = arange(0, fps, interval)[:feature_framerate]``;
* for each ``sec`` in the window and each ``ind``: frame ``int(sec * fps) + ind``; the original
  stops at the first index past the end of the file, and as the indices increase this is the
  same as dropping indices ``>= num_frames``.

Then (the dataloaders' ``_get_rawvideo``) when more than ``max_frames`` frames were taken:
``slice_framepos`` 0 keeps the head, 1 the tail, 2 ``np.linspace(0, n - 1, max_frames,
dtype=int)``; fewer frames are zero-padded and ``frame_mask`` marks the real ones.

Per frame: torchvision ``Resize(S, BICUBIC)`` (shorter side to S, longer ``int(S * long /
short)``, PIL bicubic) then ``CenterCrop(S)``; CLIP mean/std normalisation happens on device.

Broken input raises `VideoDecodeError` instead of returning zeros (the PyTorch peers turn a
missing video into zeros and later into NaN losses). The rules, checked in this order:

* ``missing file``: the path does not exist (or is not a file);
* ``empty file``: zero bytes;
* ``unreadable container``: FFmpeg cannot open it or it has no video stream;
* ``corrupt stream``: FFmpeg reports an error while demuxing/decoding;
* ``no frames``: nothing decodes;
* ``truncated``: the container declares ``N`` frames and fewer than
  ``max(N - 2, 0.95 * N)`` decode (a small tolerance: edit lists and B-frame delays make real
  files lose a frame or two without being broken). Checked only when decoding reaches the end
  of the file (not when an explicit ``end`` stops it early) and only for containers that
  declare a count (mp4/mov/avi; not webm/mkv). Where no count is declared (Matroska/WebM),
  the decoded span (last frame time - first + one frame) is compared with the declared
  duration (the video stream's, else its ``DURATION`` tag, else the container's): shorter by
  more than ``max(1 s, 10 %)`` is truncated (a .mkv cut in half still declares the full
  duration in its header);
* ``bad frame rate``: integer fps below 1, or below ``feature_framerate`` (the original
  asserts there);
* ``shorter than one second``: fewer decoded frames than the integer fps, i.e.
  ``num_frames / int(fps) < 1`` -- less than one sampling period of the original 1 fps rule,
  so the clip would be represented by a single frame of an unknown part of the scene;
* ``empty window``: ``start``/``end`` select no frame (e.g. start beyond the end of the file).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import av
import numpy as np
from PIL import Image

from data_pipeline.sampling import FrameSampling
from ucofia_jax.errors import DataError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")


class VideoDecodeError(DataError):
    """A video file that cannot give frames; `reason` is one of the categories in the module doc."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def frame_indices(
    num_frames: int,
    fps: int,
    *,
    start: float | None = None,
    end: float | None = None,
    feature_framerate: int,
) -> np.ndarray:
    """Indices of the frames the original takes from a file of `num_frames` frames at int `fps`."""
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    total_duration = (num_frames + fps - 1) // fps
    if start is None and end is None:
        start_sec, end_sec = 0, total_duration
    else:
        start_sec = 0 if start is None else start
        end_sec = total_duration if end is None else min(end, total_duration)
    interval = max(fps // feature_framerate, 1) if feature_framerate > 0 else 1
    sample_fp = feature_framerate if feature_framerate > 0 else fps
    inds = np.arange(0, fps, interval)[:sample_fp]
    out = [int(sec * fps) + int(i) for sec in np.arange(start_sec, end_sec + 1) for i in inds]
    out = np.asarray(out, dtype=np.int64)
    return out[out < num_frames]


def subsample(n: int, max_frames: int, slice_framepos: int) -> np.ndarray:
    """Positions (into the `n` sampled frames) that are kept, per the original `slice_framepos`."""
    if n <= max_frames:
        return np.arange(n)
    if slice_framepos == 0:
        return np.arange(max_frames)
    if slice_framepos == 1:
        return np.arange(n - max_frames, n)
    if slice_framepos == 2:
        return np.linspace(0, n - 1, num=max_frames, dtype=int)
    raise ValueError(f"slice_framepos must be 0, 1 or 2, got {slice_framepos}")


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """torchvision ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL image -> uint8 HWC."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    # torchvision rounds with Python's round (half to even); keep it for pixel parity.
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _expected_frames(container, stream, path: str) -> int:
    """How many frames a file without a declared count should hold: its declared duration
    times the average frame rate, else the number of video packets (demuxed, not decoded, in
    a container of its own so the caller's stays at the start)."""
    duration = _declared_duration(container, stream)
    if duration:
        return max(int(round(duration * _stream_fps(stream))), 1)
    try:
        with av.open(path) as counting:
            video_stream = counting.streams.video[0]
            count = sum(1 for packet in counting.demux(video_stream) if packet.size)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(path, "corrupt stream", f"while counting packets: {e}") from e
    return max(count, 1)


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return 0.0


def decode_clip(
    path: str,
    sampling: FrameSampling,
    *,
    start: float | None = None,
    end: float | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a clip to ``frames`` uint8 [max_frames, S, S, 3] and ``frame_mask`` int32
    [max_frames], S = ``image_size``, per `sampling` (its ``jpeg_quality`` is the builder's).

    `threads` is the FFmpeg decoder thread count; 1 by default because the builders
    parallelise over processes.
    Raises:
      VideoDecodeError: for any of the broken-input rules in the module docstring.
    """
    max_frames, image_size = sampling.max_frames, sampling.image_size
    feature_framerate, slice_framepos = sampling.feature_framerate, sampling.slice_framepos
    path = str(path)
    if (start is not None and start < 0) or (end is not None and end < 0):
        raise VideoDecodeError(path, "empty window", f"negative start/end {start}/{end}")
    if start is not None and end is not None and start > end:
        raise VideoDecodeError(path, "empty window", f"start {start} > end {end}")
    container, stream, fps = _open_checked(path, feature_framerate, threads)
    with container:
        declared = int(stream.frames or 0)

        # Which frames to keep while decoding. With an explicit end the window is short and its
        # candidates (1 per second) are kept. Without one, the final indices depend on the frame
        # count; it is predicted (declared, else estimated) and only the predicted frames
        # (<= max_frames) are kept, so an hour-long video does not hold one decoded frame per
        # second in memory. Should the decoded count differ, a second pass fetches the frames.
        stop_after = None
        if end is not None:
            want = set(
                frame_indices(
                    10**12, fps, start=start, end=end, feature_framerate=feature_framerate
                ).tolist()
            )
            # No need to decode past the window (DiDeMo: 31 s of long videos), but at least one
            # second so that the duration rule still applies.
            stop_after = max(max(want, default=0), fps - 1)
        else:
            # Matroska/WebM declare no count: predict it from the declared duration (or, with
            # none, from a demux-only count of the packets). A wrong prediction costs the
            # second pass below, never memory: only the <= max_frames predicted frames are kept.
            expected = declared if declared > 0 else _expected_frames(container, stream, path)
            want = set(
                _final_indices(
                    expected, fps, start, end, feature_framerate, max_frames, slice_framepos
                ).tolist()
            )
        n, reached_end, kept, times = _decode_pass(container, stream, path, want, stop_after)
        _check_decoded(path, container, stream, n, reached_end, times, fps)

    idx = _final_indices(n, fps, start, end, feature_framerate, max_frames, slice_framepos)
    if len(idx) == 0:
        raise VideoDecodeError(
            path, "empty window", f"start {start} end {end}, video {n} frames at {fps} fps"
        )
    if any(int(i) not in kept for i in idx):
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_count = max(int(threads), 1)
            _, _, kept, _ = _decode_pass(container, stream, path, set(idx.tolist()), int(idx[-1]))
        if any(int(i) not in kept for i in idx):
            raise VideoDecodeError(
                path, "corrupt stream", "frame count differs between two decodes"
            )
    frames = np.zeros((max_frames, image_size, image_size, 3), np.uint8)
    mask = np.zeros((max_frames,), np.int32)
    for j, i in enumerate(idx):
        frames[j] = resize_center_crop(kept[int(i)].to_image(), image_size)
        mask[j] = 1
    return frames, mask


def _open_checked(path: str, feature_framerate: int, threads: int):
    """(container, its first video stream, integer fps) after the file, container and frame
    rate rules of the module doc; the caller closes the container."""
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "missing file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file", "0 bytes")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(path, "unreadable container", str(e)) from e
    try:
        if not container.streams.video:
            raise VideoDecodeError(path, "unreadable container", "no video stream")
        stream = container.streams.video[0]
        stream.thread_count = max(int(threads), 1)
        fps = int(_stream_fps(stream))
        if fps < 1:
            raise VideoDecodeError(path, "bad frame rate", f"fps {_stream_fps(stream):.3f} < 1")
        if feature_framerate > fps:
            raise VideoDecodeError(
                path, "bad frame rate", f"feature_framerate {feature_framerate} > video fps {fps}"
            )
    except VideoDecodeError:
        container.close()
        raise
    return container, stream, fps


def _check_decoded(path, container, stream, n: int, reached_end: bool, times, fps: int) -> None:
    """The rules that need the decode: no frames, truncated, shorter than one second."""
    declared = int(stream.frames or 0)
    if n == 0:
        raise VideoDecodeError(path, "no frames", "nothing decodes")
    if reached_end and declared > 0 and n < max(declared - 2, 0.95 * declared):
        raise VideoDecodeError(path, "truncated", f"decoded {n} of {declared} declared frames")
    if reached_end and declared == 0:
        _check_duration(path, container, stream, times, _stream_fps(stream))
    if n < fps:
        raise VideoDecodeError(path, "shorter than one second", f"{n} frames at {fps} fps")


def _final_indices(n, fps, start, end, feature_framerate, max_frames, slice_framepos):
    idx = frame_indices(n, fps, start=start, end=end, feature_framerate=feature_framerate)
    return idx[subsample(len(idx), max_frames, slice_framepos)]


def _declared_duration(container, stream) -> float | None:
    """Seconds the file says its video lasts: the stream's duration, its ``DURATION`` tag
    (Matroska writes one per track), else the container's (which may include audio)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION") or (stream.metadata or {}).get("duration")
    if tag:
        try:
            h, m, s = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
        except ValueError:
            pass  # a malformed tag: fall back to the container
    if container.duration:
        return container.duration / av.time_base
    return None


def _check_duration(path, container, stream, times, fps: float) -> None:
    """Raises ``truncated`` when the decoded span falls short of the declared duration."""
    declared = _declared_duration(container, stream)
    first, last = times
    if declared is None or first is None or last is None or fps <= 0:
        return
    span = last - first + 1.0 / fps
    if span < declared - max(1.0, 0.1 * declared):
        raise VideoDecodeError(
            path,
            "truncated",
            f"decoded {span:.2f} s of the {declared:.2f} s the container declares",
        )


def _decode_pass(container, stream, path, want, stop_after):
    """Decodes in order, keeping frames whose index is in the set `want`; returns (frames
    decoded, whether the end of the file was reached, {index: frame}, (time of the first
    frame, time of the last) in seconds, None where unknown)."""
    kept: dict[int, av.VideoFrame] = {}
    n = 0
    first = last = None
    try:
        for frame in container.decode(stream):
            if n in want:
                kept[n] = frame
            t = frame.time
            if t is not None:  # min/max: decoders may emit timestamps out of order
                first = t if first is None else min(first, t)
                last = t if last is None else max(last, t)
            n += 1
            if stop_after is not None and n > stop_after:
                return n, False, kept, (first, last)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(path, "corrupt stream", f"after {n} frames: {e}") from e
    return n, True, kept, (first, last)


@dataclasses.dataclass(frozen=True)
class Moment:
    """One stored item of a file: the whole file (``start`` = ``end`` = None) or one window
    [``start``, ``end``] (seconds from the start of the file). ``frames`` / ``mask`` as
    `decode_clip` returns them; ``previews``: up to `MomentStream`'s ``previews`` of the
    sampled frames, evenly spread, as uint8 RGB arrays ``preview_height`` pixels high."""

    start: float | None
    end: float | None
    frames: np.ndarray
    mask: np.ndarray
    previews: tuple


def last_window_second(start: float, window: float) -> float:
    """The last second the sampling rule takes from the window [start, start + window).

    Half-open, unlike `decode_clip`'s inclusive ``end`` (the datasets' rule for annotated
    segments): a window of ``max_frames / feature_framerate`` seconds then samples exactly as
    many seconds as a clip of that length, and windows that tile a file made of clips of that
    length sample each clip alone (an inclusive end would add the next clip's first second)."""
    return start + math.ceil(window - 1e-9) - 1


def window_starts(duration: float, window: float, stride: float) -> list[float]:
    """Starts (seconds) of the windows that cover a file of ``duration`` seconds longer than
    ``window``: 0, stride, 2 stride, ... up to the first window that reaches the end."""
    count = math.ceil(max(duration - window, 0.0) / stride - 1e-9) + 1
    return [k * stride for k in range(count)]


class MomentStream:
    """Decodes a file ONCE, in order, into `Moment` s, holding only the frames that windows
    still open may sample (memory flat in the file's length).

    A file of at most ``window`` seconds (in the sampling rule's time: frame i is at second
    i / int(fps)) gives one whole-file moment, exactly `decode_clip` (path, sampling)'s frames.
    A longer one gives the windows of `window_starts` ([start, start + window) clipped to the
    file), each sampled by `decode_clip`'s rule with that start and the end
    `last_window_second` (`frame_indices` then `subsample`). Windows are yielded as soon as decoding passes their last candidate frame;
    the broken-input rules that need the whole file (truncated, ...) are checked at its end,
    so a consumer must drop what it got from a file whose iteration raises.
    ``duration`` (seconds, by the decoded frame count and the stream's average rate) is set
    once the iteration has finished.
    """

    def __init__(
        self,
        path: str,
        sampling: FrameSampling,
        *,
        window: float,
        stride: float,
        previews: int = 0,
        preview_height: int = 160,
        threads: int = 1,
    ):
        if not (window > 0 and stride > 0):
            raise ValueError(f"window and stride must be > 0 seconds, got {window}, {stride}")
        self.path, self.sampling = str(path), sampling
        self.window, self.stride = float(window), float(stride)
        self.previews, self.preview_height = int(previews), int(preview_height)
        self.threads = threads
        self.duration: float | None = None

    def _candidates(self, fps: int, start: float | None, end: float | None) -> np.ndarray:
        """Frame indices the rule may take from [start, end] of a file of unknown length."""
        if start is None:  # the whole file, were it no longer than the window
            start, end = 0, math.ceil(self.window)
        return frame_indices(
            10**15, fps, start=start, end=end, feature_framerate=self.sampling.feature_framerate
        )

    def _moment(self, kept, candidates, n, fps, real, start, end) -> Moment:
        s = self.sampling
        idx = candidates[candidates < n]
        idx = idx[subsample(len(idx), s.max_frames, s.slice_framepos)]
        frames = np.zeros((s.max_frames, s.image_size, s.image_size, 3), np.uint8)
        mask = np.zeros((s.max_frames,), np.int32)
        for j, i in enumerate(idx):
            frames[j], mask[j] = kept[int(i)][0], 1
        previews = ()
        if self.previews > 0 and len(idx):
            pick = np.unique(np.linspace(0, len(idx) - 1, self.previews).round().astype(int))
            previews = tuple(kept[int(idx[p])][1] for p in pick)
        if start is not None:  # rule seconds -> seconds of the file (29.97 fps: int fps 29)
            start, end = start * real, min(end, n / fps) * real
        return Moment(start, end, frames, mask, previews)

    def _keep(self, frame) -> tuple:
        crop = resize_center_crop(frame.to_image(), self.sampling.image_size)
        preview = None
        if self.previews > 0:
            height = self.preview_height
            width = max(2, int(round(frame.width * height / max(frame.height, 1))))
            preview = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
        return crop, preview

    def __iter__(self) -> Iterator[Moment]:
        container, stream, fps = _open_checked(self.path, self.sampling.feature_framerate, 1)
        stream.thread_count = max(int(self.threads), 1)
        real = fps / _stream_fps(stream)  # seconds of the file per second of the rule
        whole = self._candidates(fps, None, None)  # dropped once the file outgrows the window
        whole_set = set(whole.tolist())
        long_after = self.window * fps  # frames: more than this and the file is windowed
        opened: dict[int, np.ndarray] = {}  # window number -> its candidate indices
        next_window, emitted = 0, 0
        kept: dict[int, tuple] = {}
        wanted: set[int] = set(whole_set)
        n = 0
        first = last = None
        with container:
            try:
                for frame in container.decode(stream):
                    # Open the windows that start at or before this frame.
                    while int(next_window * self.stride * fps) <= n:
                        start = next_window * self.stride
                        cands = self._candidates(fps, start, last_window_second(start, self.window))
                        opened[next_window] = cands
                        wanted.update(cands.tolist())
                        next_window += 1
                    if n in wanted:
                        kept[n] = self._keep(frame)
                    t = frame.time
                    if t is not None:  # min/max: decoders may emit timestamps out of order
                        first = t if first is None else min(first, t)
                        last = t if last is None else max(last, t)
                    n += 1
                    if n > long_after and whole_set:
                        whole_set = set()  # the file is long: no whole-file moment
                        wanted = set().union(*(c.tolist() for c in opened.values()))
                    # Yield the windows decoded to their end (their candidates, and the
                    # frames up to start + window, so that `end` is known to be in the file).
                    while (
                        not whole_set
                        and emitted in opened
                        and n > opened[emitted][-1]
                        and n >= math.ceil((emitted * self.stride + self.window) * fps)
                    ):
                        start = emitted * self.stride
                        yield self._moment(
                            kept, opened.pop(emitted), n, fps, real, start, start + self.window
                        )
                        emitted += 1
                        wanted = set().union(*(c.tolist() for c in opened.values()))
                        for i in [i for i in kept if i not in wanted]:
                            del kept[i]
            except av.error.FFmpegError as e:
                raise VideoDecodeError(self.path, "corrupt stream", f"after {n} frames: {e}") from e
            _check_decoded(self.path, container, stream, n, True, (first, last), fps)
            self.duration = n / _stream_fps(stream)
        if whole_set:  # no longer than the window: one moment of the whole file
            idx = frame_indices(n, fps, feature_framerate=self.sampling.feature_framerate)
            yield self._moment(kept, idx, n, fps, real, None, None)
            return
        for k in range(emitted, len(window_starts(n / fps, self.window, self.stride))):
            start = k * self.stride
            cands = opened.pop(k, None)
            if cands is None:  # a window that starts past the frames decoded: none
                break
            yield self._moment(kept, cands, n, fps, real, start, start + self.window)


def find_video(video_dir: str, video_id: str) -> str | None:
    """The first of ``<video_dir>/<video_id>{.mp4,.webm,.mkv,.avi}`` that exists, else None."""
    for ext in VIDEO_EXTENSIONS:
        p = os.path.join(video_dir, video_id + ext)
        if os.path.isfile(p):
            return p
    return None


def write_video(
    path: str,
    frames,
    fps: int,
    *,
    codec: str = "libx264",
    crf: int = 23,
    options: dict | None = None,
    container_options: dict | None = None,
) -> str:
    """Encodes uint8 RGB frames [T, H, W, 3] (any iterable) to `path`; H and W must be even.

    yuv420p is used because it is what real datasets contain and what every decoder reads.
    """
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    h, w = first.shape[:2]
    opts = {"crf": str(crf), "preset": "veryfast"} if codec.startswith("libx264") else {}
    opts.update(options or {})
    with av.open(str(path), mode="w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=int(fps), options=opts)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for img in _chain(first, frames):
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            ):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _chain(first, rest):
    yield first
    yield from rest
