"""LSMDC (CLIP4Clip layout; dataloader_lsmdc_retrieval.py).

  RAW/LSMDC16_annos_training.csv            (train)
  RAW/LSMDC16_annos_val.csv                 (val)
  RAW/LSMDC16_challenge_1000_publictect.csv (test)
      tab-separated, no header: clip_id, start_aligned, end_aligned, start_extracted,
      end_extracted, sentence
  RAW/videos/<clip_id>.avi or RAW/videos/<movie>/<clip_id>.avi  (<movie> = clip id without
      its last ``_``-separated part, the layout of the LSMDC download)

Each clip is its own pre-cut video file, so records decode the whole file
(start = end = None); the timestamps are positions in the movie, only checked to be present.
One caption per clip; a clip id repeated in the csv keeps the last row (as the original dict)
and the earlier row is reported as a duplicate. Each line is parsed on its own (tab-separated,
no quoting: LSMDC sentences contain unbalanced quotes).
"""

from __future__ import annotations

import os

from data_pipeline.datasets import _common as C
from data_pipeline.records import DatasetSpec

NAME = "lsmdc"
SPLITS = ("train", "val", "test")
SPEC = DatasetSpec(
    build_splits=("train", "val", "test"),
    files={
        "train": ("LSMDC16_annos_training.csv",),
        "val": ("LSMDC16_annos_val.csv",),
        "test": ("LSMDC16_challenge_1000_publictect.csv",),
    },
    source="the LSMDC 2016 release (requires registration with MPII)",
)
FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}


def _row(where, row):
    """A csv row: one clip and its caption (the timestamps are not used)."""
    if len(row) != 6:
        return C.Unreadable(f"{len(row)} tab-separated fields, expected 6")
    clip_id = row[0].strip()
    if not clip_id or C.has_bad_text(clip_id):
        return C.Unreadable("bad clip id")
    return clip_id, [(where, row[5])]


def _replaced(clip_id, where):
    """The detail for the earlier row of a repeated clip id; ``where`` is ``path:line``."""
    line = where.rsplit(":", 1)[1]
    return f"clip id {clip_id} again at line {line}, which replaces this row"


def videos(root, split, report, strict):
    """Every clip of the split's csv with its caption (the last row of a repeated clip id)."""
    path = C.require_file(root, FILES[split], NAME)
    rows = C.read_csv_rows(path, report, strict, delimiter="\t")
    items = [(f"{path}:{i}", row) for i, row in rows if any(x.strip() for x in row)]
    return list(C.group_captions(items, _row, report, strict, last_wins=_replaced).items())


def _file_names(clip_id):
    movie = clip_id.rsplit("_", 1)[0]
    return [clip_id, os.path.join(movie, clip_id)]


read_split = C.make_read_split(NAME, SPLITS, videos, file_names=_file_names)
