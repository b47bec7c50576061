"""Helpers shared by the annotation readers: safe text/JSON loading, caption checks, video lookup.

Policy (issue 4): a bad *item* (row, caption, video) is skipped and recorded in the
`SkipReport` with the file name and a reason, or raises `DataError` in strict mode. A missing
or unparseable *annotation file* always raises, naming the file and where it was expected:
nothing sensible can be built without it.

Text is decoded as UTF-8 with ``surrogateescape`` so that one bad byte sequence spoils only
the caption it is in (detected by its lone surrogates) instead of the whole file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any, Iterable

from data_pipeline.records import ClipRecord, DataError, SkipReport, skip_or_raise
from data_pipeline.video import VIDEO_EXTENSIONS

_SURROGATE = re.compile("[\udc80-\udcff]")
REASON_MISSING_VIDEO = "missing video"
REASON_BAD_ROW = "unreadable annotation row"
REASON_EMPTY = "empty caption"
REASON_NON_UTF8 = "non-UTF-8 text"
REASON_NO_ANNOTATION = "no annotation"


def check_split(split: str, allowed: Iterable[str], dataset: str) -> str:
    allowed = tuple(allowed)
    if split not in allowed:
        raise ValueError(f"{dataset}: unknown split {split!r}; expected one of {allowed}")
    return split


def require_file(root: str, name: str, dataset: str) -> str:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise DataError(
            f"{dataset}: annotation file {name} not found; expected at {path} "
            f"(annotation files go at the root of the raw folder under their original names)"
        )
    return path


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="surrogateescape")


def load_json(path: str):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def read_lines(path: str, report: SkipReport | None, strict: bool) -> list[tuple[int, str]]:
    """Non-empty stripped lines with 1-based line numbers; undecodable lines are skipped."""
    out = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if has_bad_text(line):
            skip_or_raise(report, strict, f"{path}:{i}", REASON_NON_UTF8, repr(line[:80]))
            continue
        out.append((i, line))
    return out


def read_csv(path: str, delimiter: str = ",") -> list[list[str]]:
    # QUOTE_NONE for tab files: LSMDC sentences contain unbalanced quotes.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    return list(csv.reader(io.StringIO(read_text(path)), delimiter=delimiter, quoting=quoting))


def has_bad_text(s: str) -> bool:
    return bool(_SURROGATE.search(s))


def listed_caption_entries(
    list_path: str,
    ann: dict,
    ann_path: str,
    report: SkipReport | None,
    strict: bool,
    entry_types: tuple = (list,),
) -> list[tuple[str, Any]]:
    """(video id, caption entry) for every id of a split list that the annotation dict holds.

    Ids missing from ``ann`` and entries that are not lists are reported (or raise when strict).
    """
    out = []
    for i, vid in read_lines(list_path, report, strict):
        if vid not in ann:
            skip_or_raise(
                report,
                strict,
                f"{list_path}:{i}",
                REASON_NO_ANNOTATION,
                f"video id {vid} not in {os.path.basename(ann_path)}",
            )
            continue
        entry = ann[vid]
        if not isinstance(entry, entry_types):
            skip_or_raise(
                report,
                strict,
                f"{ann_path}[{vid}]",
                REASON_BAD_ROW,
                f"captions are {type(entry).__name__}, expected a list",
            )
            continue
        out.append((vid, entry))
    return out


def clean_caption(text, where: str, report: SkipReport | None, strict: bool) -> str | None:
    """Stripped caption, or None (after reporting) when it is not usable."""
    if not isinstance(text, str):
        skip_or_raise(report, strict, where, REASON_BAD_ROW, f"caption is {type(text).__name__}")
        return None
    if has_bad_text(text):
        skip_or_raise(report, strict, where, REASON_NON_UTF8, repr(text[:80]))
        return None
    text = " ".join(text.split())
    if not text:
        skip_or_raise(report, strict, where, REASON_EMPTY)
        return None
    return text


def find_video_file(video_dir: str, names: Iterable[str]) -> str | None:
    """First existing ``video_dir/name`` (as given, then with each known extension)."""
    for name in names:
        if not name:
            continue
        p = os.path.join(video_dir, name)
        if os.path.splitext(name)[1] and os.path.isfile(p):  # id already names the file (DiDeMo)
            return p
        for ext in VIDEO_EXTENSIONS:
            if os.path.isfile(p + ext):
                return p + ext
    return None


def build_records(
    items,
    *,
    video_dir: str,
    split: str,
    expand: bool,
    report: SkipReport | None,
    strict: bool,
    names_fn=None,
) -> list[ClipRecord]:
    """items: (video_id, captions list, start, end) -> ClipRecords with resolved video files.

    `names_fn(video_id)` gives the file names to try (default: the id itself).
    """
    if not os.path.isdir(video_dir):
        raise DataError(
            f"video folder {video_dir} does not exist (pass --video_dir if the videos "
            f"are not under RAW/videos/)"
        )
    records = []
    for vid, caps, start, end in items:
        names = names_fn(vid) if names_fn else [vid]
        path = find_video_file(video_dir, names)
        if path is None:
            skip_or_raise(
                report,
                strict,
                os.path.join(video_dir, names[0]),
                REASON_MISSING_VIDEO,
                f"video id {vid}; tried extensions {', '.join(VIDEO_EXTENSIONS)}",
            )
            continue
        if not caps:
            # Its captions were all rejected (each reported); count the video too, so that the
            # report says how many videos were lost and not only how many captions.
            skip_or_raise(
                report, strict, path, REASON_NO_ANNOTATION, f"video id {vid}: no usable caption"
            )
            continue
        if expand:
            records.extend(ClipRecord(vid, path, (c,), start, end, split) for c in caps)
        else:
            records.append(ClipRecord(vid, path, tuple(caps), start, end, split))
    return records


def default_video_dir(root: str, video_dir: str | None) -> str:
    return video_dir if video_dir is not None else os.path.join(root, "videos")
