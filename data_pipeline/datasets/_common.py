"""Helpers shared by the annotation readers: safe text/JSON loading, caption checks, video lookup.

Policy (issue 4): a bad *item* (row, caption, video) is skipped and recorded in the
`SkipReport` with the file name and a reason, or raises `DataError` in strict mode. A missing
or unparseable *annotation file* always raises, naming the file and where it was expected:
nothing sensible can be built without it.

The reader loop (`group_captions`, `listed`, `make_read_split`) is the same for every dataset:
load -> validate each item -> clean each caption -> group by video -> the split's videos ->
ClipRecords; a reader module states only its files and its rules (how an item maps to a video
id and captions, its split lists, its quirks).

Text is decoded as UTF-8 with ``surrogateescape`` so that one bad byte sequence spoils only
the caption it is in (detected by its lone surrogates) instead of the whole file.
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, NamedTuple

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


# ------------------------------------------------------------------------- the reader loop


class Unreadable(NamedTuple):
    """What a reader's rule gives for an item (or caption) it cannot read; the loop reports
    it as an unreadable annotation row with this detail, at the item's place."""

    detail: str


def clean_caption(text, where: str, report: SkipReport | None, strict: bool) -> str | None:
    """Caption with its whitespace runs made single spaces, or None (after reporting) when it
    is not usable: `Unreadable` (a reader's rule rejected it), not a string, not UTF-8, empty."""
    if isinstance(text, Unreadable):
        skip_or_raise(report, strict, where, REASON_BAD_ROW, text.detail)
        return None
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


# A rule's reading of one annotation item: (video id, [(where, raw caption), ...]).
Video = tuple[str, list[tuple[str, Any]]]


def group_captions(
    items: Iterable[tuple[str, Any]],
    rule: Callable[[str, Any], Video | Unreadable],
    report: SkipReport | None,
    strict: bool,
    *,
    keep_empty: bool = False,
    last_wins: Callable[[str, str], str] | None = None,
) -> dict[str, list[str]]:
    """The usable captions of an annotation file by video id, each cleaned (`clean_caption`).

    items: (where, item) in file order; `where` names the file and the line or item, and is
      where a rejected item is reported.
    rule(where, item): the reader's reading of one item: `Unreadable(why)`, or the video id
      and the item's raw captions, each with its own place (a raw caption may be `Unreadable`).
    keep_empty: for files with one entry per video (a dict video id -> captions): a video is
      kept, in entry order, even when none of its captions is usable, so that the records step
      counts the lost video. Otherwise a video comes in the order of its first usable caption.
    last_wins(video id, where): for files where a repeated video replaces the earlier item
      (LSMDC, as its original loader's dict); the earlier item is reported as a duplicate with
      this detail. Otherwise the captions of all items of a video are kept, in file order.
    """
    groups: dict[str, list[str]] = {}
    where_of: dict[str, str] = {}
    for where, item in items:
        video = rule(where, item)
        if isinstance(video, Unreadable):
            skip_or_raise(report, strict, where, REASON_BAD_ROW, video.detail)
            continue
        video_id, raw_captions = video
        captions = [clean_caption(c, w, report, strict) for w, c in raw_captions]
        captions = [c for c in captions if c is not None]
        if not captions and not keep_empty:
            continue
        if last_wins is not None and video_id in groups:
            detail = last_wins(video_id, where)
            skip_or_raise(report, strict, where_of[video_id], REASON_DUPLICATE, detail)
            groups[video_id] = captions
        else:
            groups.setdefault(video_id, []).extend(captions)
        where_of[video_id] = where
    return groups


def listed(
    ids: Iterable[tuple[str, Any]],
    known,
    missing: str,
    report: SkipReport | None,
    strict: bool,
    rule: Callable[[Any], str | Unreadable] = lambda video_id: video_id,
) -> Iterator[str]:
    """The video ids of a split list (``ids``: (where, raw id) in list order) that ``known``
    holds, each once; `rule` reads a raw id (or rejects it: `Unreadable`). A repeated id is
    reported as a duplicate, one ``known`` lacks as ``no annotation``: ``video id ID missing``.
    A generator: each id is checked when it is taken, so a caller's own checks of an id come
    right after its list checks, in the order of the list."""
    seen = FirstSeen(report, strict)
    for where, raw in ids:
        video_id = rule(raw)
        if isinstance(video_id, Unreadable):
            skip_or_raise(report, strict, where, REASON_BAD_ROW, video_id.detail)
            continue
        if seen.repeat(video_id, where):
            continue
        if video_id not in known:
            detail = f"video id {video_id} {missing}"
            skip_or_raise(report, strict, where, REASON_NO_ANNOTATION, detail)
            continue
        yield video_id


def listed_entries(
    list_path: str,
    ann: dict,
    ann_path: str,
    report: SkipReport | None,
    strict: bool,
    entry_types: tuple = (list,),
) -> list[tuple[str, tuple[str, Any]]]:
    """Items (where, (video id, entry)) for `group_captions` from a split list file (one id a
    line) and a dict video id -> captions: the listed ids that ``ann`` holds with a list of
    captions (entries of other types are reported), in list order."""
    lines = [(f"{list_path}:{i}", vid) for i, vid in read_lines(list_path, report, strict)]
    missing = f"not in {os.path.basename(ann_path)}"
    out = []
    for vid in listed(lines, ann, missing, report, strict):
        where = f"{ann_path}[{vid}]"
        if not isinstance(ann[vid], entry_types):
            detail = f"captions are {type(ann[vid]).__name__}, expected a list"
            skip_or_raise(report, strict, where, REASON_BAD_ROW, detail)
            continue
        out.append((where, (vid, ann[vid])))
    return out


def each_caption(where: str, entry: tuple[str, Any]) -> Video:
    """The rule for `listed_entries` items whose entry is a list of captions: caption ``k``
    of video ``v`` is at ``ann_path[v][k]``."""
    video_id, captions = entry
    return video_id, [(f"{where}[{k}]", c) for k, c in enumerate(captions)]


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
    videos: Iterable[tuple[str, list[str]]],
    *,
    video_dir: str,
    split: str,
    start: float | None,
    end: float | None,
    expand: bool,
    report: SkipReport | None,
    strict: bool,
    file_names: Callable[[str], list[str]],
) -> list[ClipRecord]:
    """(video id, captions) -> ClipRecords of the clip ``start``-``end`` of each video's file;
    a video without a file or without captions is reported. ``file_names(video id)``: the
    names to try under ``video_dir``, each as given and with each known extension."""
    if not os.path.isdir(video_dir):
        raise DataError(
            f"video folder {video_dir} does not exist (pass --video_dir if the videos "
            f"are not under RAW/videos/)"
        )
    records = []
    for vid, caps in videos:
        names = file_names(vid)
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


# A dataset's rules: (root, split, report, strict) -> (video id, captions) in record order.
VideosOfSplit = Callable[[str, str, SkipReport | None, bool], Iterable[tuple[str, list[str]]]]


def make_read_split(
    name: str,
    splits: tuple[str, ...],
    videos: VideosOfSplit,
    *,
    file_names: Callable[[str], list[str]] = lambda video_id: [video_id],
    paragraph: bool = False,
    clip: tuple[float | None, float | None] = (None, None),
    record_split: dict[str, str] | None = None,
):
    """The `read_split` of a dataset (its signature: the package doc) from its rules.

    videos: reads the split's annotation files (with `group_captions` and `listed`).
    file_names(video id): the file names to try for a video (default: the id itself).
    paragraph: one caption per video, its captions joined by a space (paragraph-to-video).
    clip: (start, end) in seconds of every record; None is the start / end of the file.
    record_split: the split a record is labelled with, where it is not the one read.
    """
    record_split = record_split or {}

    def read_split(
        root: str,
        split: str,
        *,
        video_dir: str | None = None,
        expand_sentences: bool = False,
        strict: bool = False,
        report: SkipReport | None = None,
    ) -> list[ClipRecord]:
        check_split(split, splits, name)
        by_video = videos(root, split, report, strict)
        if paragraph:
            by_video = [(vid, [" ".join(caps)] if caps else []) for vid, caps in by_video]
        start, end = clip
        return build_records(
            by_video,
            video_dir=default_video_dir(root, video_dir),
            split=record_split.get(split, split),
            start=start,
            end=end,
            expand=expand_sentences,
            report=report,
            strict=strict,
            file_names=file_names,
        )

    read_split.__doc__ = f"The {name} ClipRecords of `split` (see `data_pipeline.datasets`)."
    return read_split
