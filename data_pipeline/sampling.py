"""The frame sampling: which frames of a clip are kept, at what size, and how they are stored.

`FrameSampling` is one frozen value, built once from ``config.data``
(``FrameSampling.from_config(config.data)``) and handed to the decoder
(`video.decode_clip`), the builder (its config name and stored features), the input pipeline
and the search. It has no defaults of its own: they live in ``base_config()``'s ``data``
section, so a clip is decoded the same way wherever the config is the same. This module
imports nothing of the project: it reads any ``ConfigDict`` or mapping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# slice_framepos -> which of the sampled frames are kept when there are more than max_frames.
SLICE_FRAMEPOS = {0: "head", 1: "tail", 2: "uniform"}


@dataclasses.dataclass(frozen=True)
class FrameSampling:
    """How a clip becomes ``frames`` uint8 [max_frames, S, S, 3] + ``frame_mask`` [max_frames].

    Attributes:
      max_frames: frames kept per clip; fewer are zero-padded and masked out.
      image_size: S, the side of the square frames (resize the shorter side, center crop).
      feature_framerate: frames taken per second of video.
      slice_framepos: which frames are kept when more than `max_frames` were taken
        (`SLICE_FRAMEPOS`: 0 the first, 1 the last, 2 evenly spread).
      jpeg_quality: PIL JPEG quality of the frames the dataset stores; the search takes the
        same round trip, so that it sees the frames training and evaluation saw.
    """

    max_frames: int
    image_size: int
    feature_framerate: int
    slice_framepos: int
    jpeg_quality: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or int(value) != value:
                raise ValueError(f"config.data.{f.name} must be an integer, got {value!r}")
            object.__setattr__(self, f.name, int(value))  # 12.0 or np.int64 -> 12
        for name in ("max_frames", "image_size", "feature_framerate"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.data.{name} must be >= 1, got {getattr(self, name)}")
        if self.slice_framepos not in SLICE_FRAMEPOS:
            raise ValueError(
                f"config.data.slice_framepos must be one of {sorted(SLICE_FRAMEPOS)} "
                f"({SLICE_FRAMEPOS}), got {self.slice_framepos}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"config.data.jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, data_cfg: Mapping[str, Any]) -> FrameSampling:
        """From ``config.data`` (a ``ConfigDict`` or any mapping holding these keys)."""
        missing = [k for k in cls.field_names() if k not in data_cfg]
        if missing:
            raise ValueError(
                "config.data lacks the frame sampling key(s) "
                + ", ".join(f"config.data.{k}" for k in missing)
            )
        return cls(**{k: data_cfg[k] for k in cls.field_names()})

    def replace(self, **changes) -> FrameSampling:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def build_flags(self) -> str:
        """The ``python -m data_pipeline.build`` flags that build with this sampling."""
        return " ".join(f"--{k}={v}" for k, v in self.to_dict().items())
