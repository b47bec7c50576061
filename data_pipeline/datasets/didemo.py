"""DiDeMo, paragraph-to-video (CLIP4Clip layout; dataloader_didemo_retrieval.py).

  RAW/{train,val,test}_list.txt    one video id per line; ids are file names
                                   (e.g. ``12090392@N02_13482799053_87ef417396.mov``)
  RAW/{train,val,test}_data.json   [{"video": id, "description": str, "times": [[s, e], ...]}, ...]
  RAW/videos/<id>   (the exact name, or the id with/without its extension plus .mp4/.webm/...)

One record per listed video: the paragraph = its descriptions in file order joined by a space;
the clip is 0-31 s as in the original ("videos were truncated to 30 s for annotation").
"""

from __future__ import annotations

import collections
import os

from data_pipeline.datasets import _common as C
from data_pipeline.records import ClipRecord, DatasetSpec, SkipReport, skip_or_raise

NAME = "didemo"
SPLITS = ("train", "val", "test")
SPEC = DatasetSpec(
    build_splits=("train", "val", "test"),
    files={s: (f"{s}_list.txt", f"{s}_data.json") for s in ("train", "val", "test")},
    max_frames=64,
    source="the DiDeMo release (LocalizingMoments) + its videos",
)
START, END = 0.0, 31.0


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
    del expand_sentences  # paragraph-to-video
    video_dir = C.default_video_dir(root, video_dir)
    list_path = C.require_file(root, f"{split}_list.txt", NAME)
    data_path = C.require_file(root, f"{split}_data.json", NAME)
    data = C.load_json(data_path, report, strict)
    if not isinstance(data, list):
        raise C.DataError(f"{data_path}: expected a list of {{video, description, times}}")
    desc = collections.defaultdict(list)
    for j, itm in enumerate(data):
        where = f"{data_path}[{j}]"
        if (
            not isinstance(itm, dict)
            or not isinstance(itm.get("video"), str)
            or "description" not in itm
        ):
            skip_or_raise(report, strict, where, C.REASON_BAD_ROW, "needs video and description")
            continue
        cap = C.clean_caption(itm["description"], where, report, strict)
        if cap is not None:
            desc[itm["video"]].append(cap)
    items = []
    seen = C.FirstSeen(report, strict)
    for i, vid in C.read_lines(list_path, report, strict):
        if seen.repeat(vid, f"{list_path}:{i}"):
            continue
        if vid not in desc:
            skip_or_raise(
                report,
                strict,
                f"{list_path}:{i}",
                C.REASON_NO_ANNOTATION,
                f"video id {vid} has no description in {split}_data.json",
            )
            continue
        items.append((vid, [" ".join(desc[vid])], START, END))
    stem = lambda v: [v, os.path.splitext(v)[0]] if os.path.splitext(v)[1] else [v]
    return C.build_records(
        items,
        video_dir=video_dir,
        split=split,
        expand=False,
        report=report,
        strict=strict,
        names_fn=stem,
    )
