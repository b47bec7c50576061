"""ActivityNet Captions, paragraph-to-video (CLIP4Clip layout; dataloader_activitynet_retrieval.py).

  RAW/train.json, RAW/val_1.json   {"v_<id>": {"duration": s, "timestamps": [...],
                                               "sentences": [...]}}
  RAW/train_ids.json, RAW/val_ids.json   (optional) ["v_<id>", ...]: the split's videos
  RAW/videos/<id>.mp4   ids carry the ``v_`` prefix in the annotations; the files usually do
                        not (the original strips it), both are tried.

Splits: ``train`` -> train.json; ``val`` and ``test`` -> val_1.json (the original has no
test loader; val_1 is the reported test set). One record per video: the paragraph = all
sentences (stripped) joined by a space; the clip is the whole video (start = end = None).
"""

from __future__ import annotations

import os

from data_pipeline.datasets import _common as C
from data_pipeline.records import DatasetSpec

NAME = "activitynet"
SPLITS = ("train", "val", "test")
SPEC = DatasetSpec(
    build_splits=("train", "test"),
    files={"train": ("train.json",), "test": ("val_1.json",)},
    max_frames=64,
    source="ActivityNet Captions annotations, test split = val_1; train_ids.json and "
    "val_ids.json are optional",
)
FILES = {
    "train": ("train.json", "train_ids.json"),
    "val": ("val_1.json", "val_ids.json"),
    "test": ("val_1.json", "val_ids.json"),
}


def strip_prefix(vid: str) -> str:
    return vid[2:] if vid.startswith("v_") else vid


def _video_id(vid):
    return vid if isinstance(vid, str) and not C.has_bad_text(vid) else C.Unreadable("bad video id")


def _video(where, item):
    """An entry of the annotation json: one video and its sentences, in order."""
    vid, entry = item
    sentences = entry.get("sentences") if isinstance(entry, dict) else None
    if not isinstance(sentences, list):
        return C.Unreadable("needs a 'sentences' list")
    return vid, [(f"{where}.sentences[{k}]", s) for k, s in enumerate(sentences)]


def videos(root, split, report, strict):
    """The split's videos (the ids file's, else all of the annotation file) with their
    sentences; ids lose their ``v_`` prefix."""
    ann_name, ids_name = FILES[split]
    ann_path = C.require_file(root, ann_name, NAME)
    ann = C.load_json(ann_path, report, strict)
    if not isinstance(ann, dict):
        raise C.DataError(f"{ann_path}: expected an object {{video_id: {{duration, sentences}}}}")
    ids_path = os.path.join(root, ids_name)
    if os.path.isfile(ids_path):  # the split's videos, else all of the annotation file
        ids = C.load_json(ids_path, report, strict)
        if not isinstance(ids, list):
            raise C.DataError(f"{ids_path}: expected a list of video ids")
        ids = [(f"{ids_path}[{j}]", vid) for j, vid in enumerate(ids)]
        vids = list(C.listed(ids, ann, f"not in {ann_name}", report, strict, _video_id))
    else:
        vids = list(ann)
    items = [(f"{ann_path}[{vid}]", (vid, ann[vid])) for vid in vids]
    by_video = C.group_captions(items, _video, report, strict, keep_empty=True)
    return [(strip_prefix(vid), sentences) for vid, sentences in by_video.items()]


read_split = C.make_read_split(
    NAME, SPLITS, videos, file_names=lambda v: [v, "v_" + v], paragraph=True
)
