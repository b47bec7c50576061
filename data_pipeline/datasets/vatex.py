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
from data_pipeline.records import ClipRecord, DatasetSpec, SkipReport

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
    video_dir = C.default_video_dir(root, video_dir)
    list_path = C.require_file(root, LISTS[split], NAME)
    cap_path = C.require_file(root, "ref_captions.json", NAME)
    ann = C.load_json(cap_path, report, strict)
    if not isinstance(ann, dict):
        raise C.DataError(f"{cap_path}: expected an object {{video_id: [captions]}}")
    items = []
    for vid, entry in C.listed_caption_entries(list_path, ann, cap_path, report, strict):
        caps = [
            C.clean_caption(c, f"{cap_path}[{vid}][{k}]", report, strict)
            for k, c in enumerate(entry)
        ]
        items.append((vid, [c for c in caps if c is not None], None, None))
    return C.build_records(
        items,
        video_dir=video_dir,
        split=split,
        expand=expand_sentences,
        report=report,
        strict=strict,
    )
