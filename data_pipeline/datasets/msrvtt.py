"""MSR-VTT (CLIP4Clip layout; dataloader_msrvtt_retrieval.py).

  RAW/MSRVTT_data.json          {"videos": [...], "sentences": [{"video_id", "caption", ...}]}
  RAW/MSRVTT_train.9k.csv       column video_id (split ``train``; ``train_7k`` uses
  RAW/MSRVTT_train.7k.csv       the 7k list)
  RAW/MSRVTT_JSFUSION_test.csv  columns video_id, sentence (1k-A: 1000 pairs; ``test``/``val``)
  RAW/videos/<video_id>.mp4     (or .webm/.mkv/.avi)

Training captions come from ``MSRVTT_data.json``; test captions from the JSFusion csv, one
record per row (as the original: the 1000 pairs, not all 20 captions of those videos).
"""

from __future__ import annotations

import collections

from data_pipeline.datasets import _common as C
from data_pipeline.records import ClipRecord, DatasetSpec, SkipReport, skip_or_raise

NAME = "msrvtt"
SPLITS = ("train", "train_7k", "val", "test")
SPEC = DatasetSpec(
    build_splits=("train", "test"),
    files={
        "*": ("MSRVTT_data.json",),
        "train": ("MSRVTT_train.9k.csv",),
        "test": ("MSRVTT_JSFUSION_test.csv",),
        "train_7k": ("MSRVTT_train.7k.csv",),
    },
    source="CLIP4Clip's msrvtt_data.zip + the MSRVTT_Videos archive; add "
    "MSRVTT_train.7k.csv and --splits=train,test,train_7k for the 7k split",
)
TRAIN_CSV = {"train": "MSRVTT_train.9k.csv", "train_7k": "MSRVTT_train.7k.csv"}
TEST_CSV = "MSRVTT_JSFUSION_test.csv"


def _csv_rows(path, report, strict, needed):
    """Header-addressed rows as dicts, one per line (`C.read_csv_rows`: a stray quote cannot
    merge lines); rows with the wrong number of fields and repeated video ids are reported."""
    rows = C.read_csv_rows(path, report, strict)
    if not rows:
        raise C.DataError(f"{path}: empty csv file")
    header = [h.strip() for h in rows[0][1]]
    missing = [c for c in needed if c not in header]
    if missing:
        raise C.DataError(f"{path}: header {header} lacks column(s) {missing}")
    out = []
    seen = C.FirstSeen(report, strict)
    for i, row in rows[1:]:
        if not any(x.strip() for x in row):
            continue
        if len(row) != len(header):
            skip_or_raise(
                report,
                strict,
                f"{path}:{i}",
                C.REASON_BAD_ROW,
                f"{len(row)} fields, header has {len(header)}",
            )
            continue
        fields = dict(zip(header, row))
        if seen.repeat(fields["video_id"].strip(), f"{path}:{i}"):
            continue
        out.append((i, fields))
    return out


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
    items = []
    if split.startswith("train"):
        csv_path = C.require_file(root, TRAIN_CSV[split], NAME)
        data_path = C.require_file(root, "MSRVTT_data.json", NAME)
        data = C.load_json(data_path, report, strict)
        if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
            raise C.DataError(f"{data_path}: expected an object with a 'sentences' list")
        captions = collections.defaultdict(list)
        for j, s in enumerate(data["sentences"]):
            where = f"{data_path}:sentences[{j}]"
            if (
                not isinstance(s, dict)
                or not isinstance(s.get("video_id"), str)
                or "caption" not in s
            ):
                skip_or_raise(report, strict, where, C.REASON_BAD_ROW, "needs video_id and caption")
                continue
            cap = C.clean_caption(s["caption"], where, report, strict)
            if cap is not None:
                captions[s["video_id"]].append(cap)
        for i, row in _csv_rows(csv_path, report, strict, ["video_id"]):
            vid = row["video_id"].strip()
            if C.has_bad_text(vid) or not vid:
                skip_or_raise(report, strict, f"{csv_path}:{i}", C.REASON_BAD_ROW, "bad video_id")
                continue
            if not captions.get(vid):  # none at all, or all of them rejected above
                skip_or_raise(
                    report,
                    strict,
                    f"{csv_path}:{i}",
                    C.REASON_NO_ANNOTATION,
                    f"video id {vid} has no usable caption in MSRVTT_data.json",
                )
                continue
            items.append((vid, captions[vid], None, None))
        return C.build_records(
            items,
            video_dir=video_dir,
            split="train",
            expand=expand_sentences,
            report=report,
            strict=strict,
        )

    csv_path = C.require_file(root, TEST_CSV, NAME)
    for i, row in _csv_rows(csv_path, report, strict, ["video_id", "sentence"]):
        where = f"{csv_path}:{i}"
        vid = row["video_id"].strip()
        if C.has_bad_text(vid) or not vid:
            skip_or_raise(report, strict, where, C.REASON_BAD_ROW, "bad video_id")
            continue
        cap = C.clean_caption(row["sentence"], where, report, strict)
        if cap is not None:
            items.append((vid, [cap], None, None))
    return C.build_records(
        items,
        video_dir=video_dir,
        split=split,
        expand=expand_sentences,
        report=report,
        strict=strict,
    )
