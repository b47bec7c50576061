"""DiDeMo, paragraph-to-video (CLIP4Clip layout; dataloader_didemo_retrieval.py).

  RAW/{train,val,test}_list.txt    one video id per line; ids are file names
                                   (e.g. ``12090392@N02_13482799053_87ef417396.mov``)
  RAW/{train,val,test}_data.json   [{"video": id, "description": str, "times": [[s, e], ...]}, ...]
  RAW/videos/<id>   (the exact name, or the id with/without its extension plus .mp4/.webm/...)

One record per listed video: the paragraph = its descriptions in file order joined by a space;
the clip is 0-31 s as in the original ("videos were truncated to 30 s for annotation").
"""

from __future__ import annotations

import os

from data_pipeline.datasets import _common as C
from data_pipeline.records import DatasetSpec

NAME = "didemo"
SPLITS = ("train", "val", "test")
SPEC = DatasetSpec(
    build_splits=("train", "val", "test"),
    files={s: (f"{s}_list.txt", f"{s}_data.json") for s in ("train", "val", "test")},
    max_frames=64,
    source="the DiDeMo release (LocalizingMoments) + its videos",
)
START, END = 0.0, 31.0


def _description(where, itm):
    """An item of the data json: one description of one video (its times are not used)."""
    if (
        not isinstance(itm, dict)
        or not isinstance(itm.get("video"), str)
        or "description" not in itm
    ):
        return C.Unreadable("needs video and description")
    return itm["video"], [(where, itm["description"])]


def videos(root, split, report, strict):
    """The listed videos with their descriptions in file order."""
    list_path = C.require_file(root, f"{split}_list.txt", NAME)
    data_path = C.require_file(root, f"{split}_data.json", NAME)
    data = C.load_json(data_path, report, strict)
    if not isinstance(data, list):
        raise C.DataError(f"{data_path}: expected a list of {{video, description, times}}")
    items = ((f"{data_path}[{j}]", itm) for j, itm in enumerate(data))
    descriptions = C.group_captions(items, _description, report, strict)
    lines = [(f"{list_path}:{i}", vid) for i, vid in C.read_lines(list_path, report, strict)]
    missing = f"has no description in {split}_data.json"
    listed = C.listed(lines, descriptions, missing, report, strict)
    return [(vid, descriptions[vid]) for vid in listed]


def _file_names(vid):
    """The id names the file; a converted copy may have another extension."""
    stem, ext = os.path.splitext(vid)
    return [vid, stem] if ext else [vid]


read_split = C.make_read_split(
    NAME, SPLITS, videos, file_names=_file_names, paragraph=True, clip=(START, END)
)
