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
from data_pipeline.records import ClipRecord, DatasetSpec, SkipReport, skip_or_raise

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
    del expand_sentences  # paragraph-to-video: one paragraph per video
    video_dir = C.default_video_dir(root, video_dir)
    ann_name, ids_name = FILES[split]
    ann_path = C.require_file(root, ann_name, NAME)
    ann = C.load_json(ann_path, report, strict)
    if not isinstance(ann, dict):
        raise C.DataError(f"{ann_path}: expected an object {{video_id: {{duration, sentences}}}}")
    ids_path = os.path.join(root, ids_name)
    if os.path.isfile(ids_path):
        ids = C.load_json(ids_path, report, strict)
        if not isinstance(ids, list):
            raise C.DataError(f"{ids_path}: expected a list of video ids")
        pairs = []
        seen = C.FirstSeen(report, strict)
        for j, vid in enumerate(ids):
            if not isinstance(vid, str) or C.has_bad_text(vid):
                skip_or_raise(report, strict, f"{ids_path}[{j}]", C.REASON_BAD_ROW, "bad video id")
                continue
            if seen.repeat(vid, f"{ids_path}[{j}]"):
                continue
            if vid not in ann:
                skip_or_raise(
                    report,
                    strict,
                    f"{ids_path}[{j}]",
                    C.REASON_NO_ANNOTATION,
                    f"video id {vid} not in {ann_name}",
                )
                continue
            pairs.append(vid)
    else:
        pairs = list(ann)
    items = []
    for vid in pairs:
        where = f"{ann_path}[{vid}]"
        entry = ann[vid]
        if not isinstance(entry, dict) or not isinstance(entry.get("sentences"), list):
            skip_or_raise(report, strict, where, C.REASON_BAD_ROW, "needs a 'sentences' list")
            continue
        sents = [
            C.clean_caption(s, f"{where}.sentences[{k}]", report, strict)
            for k, s in enumerate(entry["sentences"])
        ]
        sents = [s for s in sents if s is not None]
        items.append((strip_prefix(vid), [" ".join(sents)] if sents else [], None, None))
    return C.build_records(
        items,
        video_dir=video_dir,
        split=split,
        expand=False,
        report=report,
        strict=strict,
        names_fn=lambda v: [v, "v_" + v],
    )
