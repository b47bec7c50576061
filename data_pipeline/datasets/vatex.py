"""VATEX (layout of the X-CLIP / CLIP2Video-style loaders; dataloader_vatex_retrieval.py).

  RAW/train_list.txt, RAW/test_list.txt   one video id per line (``val`` uses test_list.txt,
                                           as the original)
  RAW/ref_captions.json                   {video_id: [caption, ...]}
  RAW/videos/<video_id>.mp4

Every caption is a training sample (``expand_sentences=True``); evaluation is
multi-sentence (one record per video with all its captions, the default).
"""

from __future__ import annotations

from data_pipeline.datasets import _common as C
from data_pipeline.records import DatasetSpec

NAME = "vatex"
SPLITS = ("train", "val", "test")
SPEC = DatasetSpec(
    build_splits=("train", "test"),
    files={
        "*": ("ref_captions.json",),
        "train": ("train_list.txt",),
        "test": ("test_list.txt",),
    },
    source="VATEX English captions as ref_captions.json + train/test id lists + videos",
)
LISTS = {"train": "train_list.txt", "val": "test_list.txt", "test": "test_list.txt"}


def videos(root, split, report, strict):
    """The listed videos with all their captions in ref_captions.json."""
    list_path = C.require_file(root, LISTS[split], NAME)
    cap_path = C.require_file(root, "ref_captions.json", NAME)
    ann = C.load_json(cap_path, report, strict)
    if not isinstance(ann, dict):
        raise C.DataError(f"{cap_path}: expected an object {{video_id: [captions]}}")
    entries = C.listed_entries(list_path, ann, cap_path, report, strict)
    return list(C.group_captions(entries, C.each_caption, report, strict, keep_empty=True).items())


read_split = C.make_read_split(NAME, SPLITS, videos)
