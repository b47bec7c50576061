"""What a decode worker does: the project's decoder (``data_pipeline.video``, the training /
evaluation sampling) plus JPEG thumbnails, and the worker processes that run it for ``index``.
Light imports only (no jax), as it runs in spawned worker processes.

* `decode_file` streams one file's messages: its moments (the whole file, or the windows of a
  file longer than the model's window; `data_pipeline.video.MomentStream`, one pass, memory
  flat in the file's length), then ``done`` with its duration, or ``skip`` with the reason.
* `DecodePool` runs `decode_file` in ``workers`` spawned processes. Job i goes to worker
  i % workers and messages come back in job order through a bounded queue per worker, so a
  worker runs at most `QUEUE_DEPTH` messages ahead and neither side holds a long file. Workers
  die with the process that started them (Linux: ``PR_SET_PDEATHSIG``; elsewhere a thread
  polls the parent id), so a killed ``index`` leaves no decoder behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, Dict, Iterator, List, Optional

import av
import numpy as np
from PIL import Image

from data_pipeline import video as video_lib

THUMBNAIL_SIZE = 256  # longer side, pixels (decode_one's single-frame thumbnail)
STRIP_FRAMES = 4  # frames in a stored row's thumbnail strip
STRIP_HEIGHT = 160  # pixels, each frame of the strip
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")
HASH_CHUNK = 1 << 20  # bytes read at a time by content_hash
QUEUE_DEPTH = 8  # messages (moments) a worker may run ahead of the encoder
PARENT_POLL_S = 0.5  # where PR_SET_PDEATHSIG is missing: how often a worker checks its parent


def content_hash(path: str) -> str:
    """32 hex digits of BLAKE2b over the file's bytes, read in chunks (flat memory): the
    identity of the content, whatever the file's name or time stamps."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def thumbnail_jpeg(path: str, size: int = THUMBNAIL_SIZE) -> bytes | None:
    """A JPEG of the video's first frame, longer side ``size``; None if none decodes."""
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                image = frame.to_image().convert("RGB")
                image.thumbnail((size, size), Image.BICUBIC)
                if max(image.size) < size // 2:  # tiny clips: enlarge so the page shows them
                    scale = size // max(image.size)
                    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
                out = io.BytesIO()
                image.save(out, format="JPEG", quality=85)
                return out.getvalue()
    except (av.error.FFmpegError, OSError, ValueError):
        return None
    return None


def strip_jpeg(previews) -> bytes | None:
    """The frames (uint8 RGB, one height) side by side, as one JPEG; None without frames."""
    if not previews:
        return None
    out = io.BytesIO()
    Image.fromarray(np.concatenate(list(previews), axis=1)).save(out, format="JPEG", quality=85)
    return out.getvalue()


def jpeg_round_trip(frames: np.ndarray, quality: int) -> np.ndarray:
    """Frames as the dataset stores them (data_pipeline/builder.py: each frame a PIL JPEG of
    ``quality``), decoded back: what training and evaluation feed the model."""
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"), np.uint8)
    return out


def decode_one(job: Dict[str, Any]) -> Dict[str, Any]:
    """``job``: {'path' (absolute), 'rel', 'sampling' (a `FrameSampling`)} -> {'rel', 'frames'
    (after the sampling's JPEG round trip), 'mask', 'thumbnail'} or {'rel', 'reason',
    'detail'}. The whole file as one clip (``encode_videos``)."""
    sampling = job["sampling"]
    try:
        frames, mask = video_lib.decode_clip(job["path"], sampling)
    except video_lib.VideoDecodeError as e:
        return {"rel": job["rel"], "reason": e.reason, "detail": e.detail}
    if int(np.sum(mask)) == 0:
        return {"rel": job["rel"], "reason": "no frames", "detail": "no frame sampled"}
    frames = jpeg_round_trip(frames, sampling.jpeg_quality)
    return {
        "rel": job["rel"],
        "frames": frames,
        "mask": mask,
        "thumbnail": thumbnail_jpeg(job["path"]),
    }


def decode_file(job: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """Messages for one file. ``job``: {'path' (absolute), 'rel', 'sampling', 'window',
    'stride' (seconds), 'content_hash' (None: computed here)}. Yields {'kind': 'moment',
    'rel', 'content_hash', 'start', 'end', 'frames' (after the JPEG round trip), 'mask',
    'thumbnail' (a strip)} per moment, then {'kind': 'done', 'rel', 'content_hash',
    'duration'}; or, at any point, {'kind': 'skip', 'rel', 'reason', 'detail'} and nothing
    more (the moments already yielded are then to be dropped)."""
    rel, sampling = job["rel"], job["sampling"]
    try:
        digest = job.get("content_hash") or content_hash(job["path"])
    except OSError as e:
        yield {"kind": "skip", "rel": rel, "reason": "unreadable file", "detail": str(e)}
        return
    moments = video_lib.MomentStream(
        job["path"],
        sampling,
        window=job["window"],
        stride=job["stride"],
        previews=STRIP_FRAMES,
        preview_height=STRIP_HEIGHT,
    )
    try:
        for m in moments:
            yield {
                "kind": "moment",
                "rel": rel,
                "content_hash": digest,
                "start": m.start,
                "end": m.end,
                "frames": jpeg_round_trip(m.frames, sampling.jpeg_quality),
                "mask": m.mask,
                "thumbnail": strip_jpeg(m.previews),
            }
    except video_lib.VideoDecodeError as e:
        yield {"kind": "skip", "rel": rel, "reason": e.reason, "detail": e.detail}
        return
    yield {"kind": "done", "rel": rel, "content_hash": digest, "duration": moments.duration}


def _die_with_parent(parent_pid: int) -> None:
    """Makes this worker end when the process that started it does (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    else:

        def watch():
            while os.getppid() == parent_pid:
                time.sleep(PARENT_POLL_S)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


def _worker_main(jobs, results, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the parent handles it (and ends the workers),
    # a worker must not print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (job := jobs.get()) is not None:
        try:
            for message in decode_file(job):
                results.put(message)
        except Exception:  # a bug, not input: the parent raises it with this traceback
            results.put({"kind": "crash", "rel": job["rel"], "detail": traceback.format_exc()})


class DecodePool:
    """`decode_file` in ``workers`` spawned processes (0: in this process); see the module
    doc. Use as a context manager; `messages` yields every job's messages in job order."""

    def __init__(self, workers: int, queue_depth: int = QUEUE_DEPTH):
        self.workers = max(int(workers), 0)
        self.queue_depth = queue_depth
        self._procs: List[Any] = []
        self._results: List[Any] = []
        self._jobs: List[Any] = []

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs jax
        for _ in range(self.workers):
            jobs, results = ctx.Queue(), ctx.Queue(maxsize=self.queue_depth)
            proc = ctx.Process(target=_worker_main, args=(jobs, results, os.getpid()), daemon=True)
            proc.start()
            self._procs.append(proc)
            self._jobs.append(jobs)
            self._results.append(results)

    def messages(self, jobs: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        if self.workers == 0 or not jobs:
            for job in jobs:
                yield from decode_file(job)
            return
        self._start()
        for i, job in enumerate(jobs):
            self._jobs[i % self.workers].put(job)
        for q in self._jobs:
            q.put(None)  # each worker ends after its last job
        for i, job in enumerate(jobs):
            w = i % self.workers
            while True:
                message = self._get(w)
                if message["kind"] == "crash":
                    raise RuntimeError(
                        f"decode worker failed on {job['path']}:\n{message['detail']}"
                    )
                yield message
                if message["kind"] in ("done", "skip"):
                    break

    def _get(self, w: int) -> Dict[str, Any]:
        while True:
            try:
                return self._results[w].get(timeout=1.0)
            except queue.Empty:
                proc = self._procs[w]
                if not proc.is_alive():
                    raise RuntimeError(
                        f"decode worker {w} died (exit code {proc.exitcode})"
                    ) from None

    def close(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()  # may be blocked on a full queue after an early stop
        for proc in self._procs:
            proc.join(timeout=5)
        for q in self._jobs + self._results:
            q.cancel_join_thread()  # nothing left to deliver; do not wait for a feeder
            q.close()
        self._procs, self._jobs, self._results = [], [], []


def window_of(sampling, window: Optional[float], stride: Optional[float]) -> tuple:
    """(window, stride) in seconds: the model's own window (``max_frames /
    feature_framerate``) and half of it where not given."""
    w = float(window) if window is not None else sampling.max_frames / sampling.feature_framerate
    s = float(stride) if stride is not None else w / 2
    return w, s
