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
REASON_SPANS_LINES = "field spans lines"
REASON_DUPLICATE = "duplicate id"
# The reasons that are about annotation files (the others come from decoding videos).
ANNOTATION_REASONS = (
    REASON_BAD_ROW,
    REASON_EMPTY,
    REASON_NON_UTF8,
    REASON_NO_ANNOTATION,
    REASON_SPANS_LINES,
    REASON_DUPLICATE,
)


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


def load_json(path: str, report: SkipReport | None = None, strict: bool = False):
    """Parsed JSON; a key repeated inside one object (JSON keeps the last value silently) is
    reported as a duplicate id with its line."""
    text = read_text(path)
    dups: list[str] = []

    def pairs_hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                dups.append(k)
            out[k] = v
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    searched: dict[str, int] = {}
    for k in dups:
        # The line of the repeat: the next occurrence of the quoted key after the last seen.
        needle = json.dumps(k, ensure_ascii=False)
        first = text.find(needle)
        pos = text.find(needle, searched.get(k, first) + 1) if first >= 0 else -1
        searched[k] = pos
        line = text.count("\n", 0, pos) + 1 if pos >= 0 else "?"
        skip_or_raise(
            report,
            strict,
            f"{path}:{line}",
            REASON_DUPLICATE,
            f"key {k!r} appears again in one object; the earlier value is dropped",
        )
    return data


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


def read_csv_rows(
    path: str, report: SkipReport | None, strict: bool, delimiter: str = ","
) -> list[tuple[int, list[str]]]:
    """(1-based line number, fields) of every non-empty line, each line parsed on its own.

    No annotation file of these datasets has a field with a newline, so a quote that opens a
    field and is not closed on its line is a stray one: parsed as a whole, the file would read
    it as a field running over the following lines, merging them into one caption (one stray
    quote in row 3 of MSR-VTT's test csv leaves 3 of 10 rows). Here each such span is reported
    (with its lines and the row count it would give), the line with the broken quoting is
    reported and skipped, and every other line is kept.
    """
    # QUOTE_NONE for tab files: LSMDC sentences contain unbalanced quotes.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # The line ends the csv module knows (\r\n, \n, a lone \r), not str.splitlines' others.
    lines = re.split(r"\r\n|\r|\n", read_text(path))
    if lines and not lines[-1]:
        lines.pop()  # the final newline ends the last line; it does not start another
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    if quoting != csv.QUOTE_NONE:
        whole = csv.reader((ln + "\n" for ln in lines), delimiter=delimiter, quoting=quoting)
        spans, n_rows, prev = [], 0, 0
        try:
            for row in whole:
                if row:
                    n_rows += 1
                if whole.line_num - prev > 1 and any("\n" in f for f in row):
                    spans.append((prev + 1, whole.line_num))
                prev = whole.line_num
        except csv.Error:
            pass  # e.g. a NUL byte: the line is reported below, where it is parsed alone
        for lo, hi in spans:
            skip_or_raise(
                report,
                strict,
                f"{path}:{lo}-{hi}",
                REASON_SPANS_LINES,
                f"a quoted field runs over lines {lo}-{hi} (a stray quote?): read as a whole "
                f"the file gives {n_rows} rows for its {len(numbered)} non-empty lines; "
                "each line is read on its own instead",
            )
    out = []
    for i, line in numbered:
        try:
            rows = list(csv.reader([line], delimiter=delimiter, quoting=quoting, strict=True))
        except csv.Error as e:
            skip_or_raise(
                report, strict, f"{path}:{i}", REASON_BAD_ROW, f"bad quoting ({e}): {line[:80]!r}"
            )
            continue
        out.append((i, rows[0] if rows else []))
    return out


class FirstSeen:
    """Remembers where each id was first seen; `repeat` reports an id seen before."""

    def __init__(self, report: SkipReport | None, strict: bool):
        self._where: dict[str, str] = {}
        self._report, self._strict = report, strict

    def repeat(self, key: str, where: str) -> bool:
        """True (after reporting) when ``key`` was seen before; else records it."""
        if key in self._where:
            skip_or_raise(
                self._report,
                self._strict,
                where,
                REASON_DUPLICATE,
                f"id {key} already at {self._where[key]}",
            )
            return True
        self._where[key] = where
        return False


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
    seen = FirstSeen(report, strict)
    for i, vid in read_lines(list_path, report, strict):
        if seen.repeat(vid, f"{list_path}:{i}"):
            continue
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
