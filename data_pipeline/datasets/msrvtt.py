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

from data_pipeline.datasets import _common as C
from data_pipeline.records import DatasetSpec, skip_or_raise

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


def _sentence(where, s):
    """An item of MSRVTT_data.json's ``sentences``: one caption of one video."""
    if not isinstance(s, dict) or not isinstance(s.get("video_id"), str) or "caption" not in s:
        return C.Unreadable("needs video_id and caption")
    return s["video_id"], [(where, s["caption"])]


def _video_id(row):
    vid = row["video_id"].strip()
    return C.Unreadable("bad video_id") if C.has_bad_text(vid) or not vid else vid


def _test_row(where, row):
    """A row of the JSFusion csv: one (video, caption) pair."""
    vid = _video_id(row)
    return vid if isinstance(vid, C.Unreadable) else (vid, [(where, row["sentence"])])


def videos(root, split, report, strict):
    """Training: the listed videos with all their captions in MSRVTT_data.json; test: the
    JSFusion csv's pairs, one video each."""
    if split.startswith("train"):
        csv_path = C.require_file(root, TRAIN_CSV[split], NAME)
        data_path = C.require_file(root, "MSRVTT_data.json", NAME)
        data = C.load_json(data_path, report, strict)
        if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
            raise C.DataError(f"{data_path}: expected an object with a 'sentences' list")
        items = ((f"{data_path}:sentences[{j}]", s) for j, s in enumerate(data["sentences"]))
        captions = C.group_captions(items, _sentence, report, strict)
        rows = _csv_rows(csv_path, report, strict, ["video_id"])
        ids = [(f"{csv_path}:{i}", row) for i, row in rows]
        listed = C.listed(
            ids,
            captions,
            "has no usable caption in MSRVTT_data.json",
            report,
            strict,
            rule=_video_id,
        )
        return [(vid, captions[vid]) for vid in listed]
    csv_path = C.require_file(root, TEST_CSV, NAME)
    rows = _csv_rows(csv_path, report, strict, ["video_id", "sentence"])
    items = [(f"{csv_path}:{i}", row) for i, row in rows]
    return list(C.group_captions(items, _test_row, report, strict).items())


# Both training lists label their records ``train``.
read_split = C.make_read_split(NAME, SPLITS, videos, record_split={"train_7k": "train"})
