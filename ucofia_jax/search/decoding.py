"""What a decode worker does for one file: the project's decoder (``data_pipeline.video``,
the training / evaluation sampling) plus a JPEG thumbnail. Light imports only (no jax), as it
runs in spawned worker processes."""

from __future__ import annotations

import io
from typing import Any, Dict

import av
import numpy as np
from PIL import Image

from data_pipeline import video as video_lib

THUMBNAIL_SIZE = 256  # longer side, pixels
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")


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
    'detail'}."""
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
