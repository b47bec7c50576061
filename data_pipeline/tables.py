"""The ids/captions sidecar of a built split: ``<version dir>/ucofia-tables-<split>.json``.

The pipeline needs every split's video ids and captions at start-up; reading them from the
records means reading every frame byte, so the build writes them once next to the records.
This module imports neither TensorFlow nor JAX: the build command imports it, and its
spawned decode workers import the build command's module again.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2


@dataclasses.dataclass
class Tables:
    """A split's video ids and captions; the texts of video v are
    ``texts[text_offsets[v]:text_offsets[v + 1]]``."""

    video_ids: list[str]
    texts: list[str]
    text_offsets: np.ndarray  # [V + 1]


def tables_path(version_dir: str, split: str) -> str:
    return os.path.join(os.fspath(version_dir), f"ucofia-tables-{split}.json")


def load_tables(source, version_dir: str, split: str, *, write: bool = True) -> Tables:
    """The split's ids and captions from its sidecar JSON, or by reading the records (then saved).

    Reading the records means reading every frame byte (ArrayRecord reads whole records):
    minutes for ActivityNet's 64-frame clips. The build writes the sidecar once; a dataset
    built otherwise gets it on first use (when its directory is writable).
    """
    path = tables_path(version_dir, split)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if d.get("num_records") == len(source):
                caps = d["captions"]
                return Tables(
                    list(d["video_ids"]),
                    [c for cs in caps for c in cs],
                    np.cumsum([0] + [len(cs) for cs in caps]).astype(np.int64),
                )
        except (OSError, ValueError, KeyError):
            pass  # stale or damaged: rebuilt below
    tables = read_tables(source)
    if write:
        caps = [
            tables.texts[tables.text_offsets[i] : tables.text_offsets[i + 1]]
            for i in range(len(tables.video_ids))
        ]
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(
                    {"num_records": len(source), "video_ids": tables.video_ids, "captions": caps},
                    f,
                    ensure_ascii=False,
                )
            os.replace(tmp, path)
        except OSError:
            pass  # read-only data_dir: fine, only slower next time
    return tables


def read_tables(source) -> Tables:
    """Video ids and captions of every record, without decoding frames."""
    video_ids, texts, offsets = [], [], [0]
    n = len(source)
    step = 256
    for lo in range(0, n, step):
        raws = source.__getitems__(list(range(lo, min(lo + step, n))))
        for raw in raws:
            feats = tf_example_pb2.Example.FromString(raw).features.feature
            video_ids.append(feats["video_id"].bytes_list.value[0].decode("utf-8"))
            caps = [c.decode("utf-8") for c in feats["captions"].bytes_list.value]
            texts.extend(caps)
            offsets.append(offsets[-1] + len(caps))
    return Tables(video_ids, texts, np.asarray(offsets, np.int64))
