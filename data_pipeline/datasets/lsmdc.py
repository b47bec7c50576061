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
from data_pipeline.records import ClipRecord, DatasetSpec, SkipReport, skip_or_raise

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


def read_split(
    root: str,
    split: str,
    *,
    video_dir: str | None = None,
    expand_sentences: bool = False,
    strict: bool = False,
    report: SkipReport | None = None,
) -> list[ClipRecord]:
    C.check_split(split, SPLITS, NAME)
    del expand_sentences  # one caption per clip
    video_dir = C.default_video_dir(root, video_dir)
    path = C.require_file(root, FILES[split], NAME)
    captions: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    for i, row in C.read_csv_rows(path, report, strict, delimiter="\t"):
        where = f"{path}:{i}"
        if not any(x.strip() for x in row):
            continue
        if len(row) != 6:
            skip_or_raise(
                report,
                strict,
                where,
                C.REASON_BAD_ROW,
                f"{len(row)} tab-separated fields, expected 6",
            )
            continue
        clip_id = row[0].strip()
        if not clip_id or C.has_bad_text(clip_id):
            skip_or_raise(report, strict, where, C.REASON_BAD_ROW, "bad clip id")
            continue
        cap = C.clean_caption(row[5], where, report, strict)
        if cap is not None:
            if clip_id in line_of:
                skip_or_raise(
                    report,
                    strict,
                    f"{path}:{line_of[clip_id]}",
                    C.REASON_DUPLICATE,
                    f"clip id {clip_id} again at line {i}, which replaces this row",
                )
            captions[clip_id] = [cap]
            line_of[clip_id] = i

    def names(clip_id):
        movie = clip_id.rsplit("_", 1)[0]
        return [clip_id, os.path.join(movie, clip_id)]

    items = [(cid, caps, None, None) for cid, caps in captions.items()]
    return C.build_records(
        items,
        video_dir=video_dir,
        split=split,
        expand=False,
        report=report,
        strict=strict,
        names_fn=names,
    )
