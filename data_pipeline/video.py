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

import os

import av
import numpy as np
from PIL import Image

from data_pipeline.records import DataError
from data_pipeline.sampling import FrameSampling

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


def _candidates(fps: int, *, start, end, feature_framerate: int):
    """Increasing frame indices the sampling rule may take, for a file of unknown length."""
    interval = max(fps // feature_framerate, 1)
    inds = list(range(0, fps, interval))[:feature_framerate]
    sec = 0 if start is None else start
    while end is None or sec <= end:
        for i in inds:
            yield int(sec * fps) + i
        sec += 1


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
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "missing file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file", "0 bytes")
    if (start is not None and start < 0) or (end is not None and end < 0):
        raise VideoDecodeError(path, "empty window", f"negative start/end {start}/{end}")
    if start is not None and end is not None and start > end:
        raise VideoDecodeError(path, "empty window", f"start {start} > end {end}")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(path, "unreadable container", str(e)) from e
    with container:
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
        declared = int(stream.frames or 0)

        # Which frames to keep while decoding. With an explicit end the window is short and its
        # candidates (1 per second) are kept. Without one, the final indices depend on the frame
        # count; when the container declares it they are predicted and only those (<= max_frames)
        # are kept, so an hour-long video does not hold one decoded frame per second in memory.
        # Should the decoded count differ from the declared one, a second pass fetches the frames.
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
        elif declared > 0:
            want = set(
                _final_indices(
                    declared, fps, start, end, feature_framerate, max_frames, slice_framepos
                ).tolist()
            )
        else:
            want = _candidates(fps, start=start, end=end, feature_framerate=feature_framerate)
        n, reached_end, kept, times = _decode_pass(container, stream, path, want, stop_after)
        if n == 0:
            raise VideoDecodeError(path, "no frames", "nothing decodes")
        if reached_end and declared > 0 and n < max(declared - 2, 0.95 * declared):
            raise VideoDecodeError(path, "truncated", f"decoded {n} of {declared} declared frames")
        if reached_end and declared == 0:
            _check_duration(path, container, stream, times, _stream_fps(stream))
        if n < fps:
            raise VideoDecodeError(path, "shorter than one second", f"{n} frames at {fps} fps")

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
    """Decodes in order, keeping frames whose index is in `want` (a set or an increasing
    iterator); returns (frames decoded, whether the end of the file was reached, {index: frame},
    (time of the first frame, time of the last) in seconds, None where unknown)."""
    if isinstance(want, set):
        is_wanted = want.__contains__
    else:
        nxt = [next(want, None)]

        def is_wanted(i):
            if nxt[0] is not None and i == nxt[0]:
                nxt[0] = next(want, None)
                return True
            return False

    kept: dict[int, av.VideoFrame] = {}
    n = 0
    first = last = None
    try:
        for frame in container.decode(stream):
            if is_wanted(n):
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
