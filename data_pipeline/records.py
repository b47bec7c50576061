"""Clip records, the skip report and the dataset spec shared by the whole data pipeline.

A reader turns a dataset's annotation files into `ClipRecord`s; anything it cannot use is
either recorded in a `SkipReport` (default) or raised as a `DataError` (``--strict``). The
report keeps the file name next to each reason so that a user can fix their raw files instead
of guessing why the clip count is lower than the paper's.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Iterable

from ucofia_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a dataset needs on disk, and its own frame count if any (SPEC §9.3, §11).

    Each reader module in `data_pipeline.datasets` declares its own, next to the code that
    reads those files; the builder and the build command take them from there.
    """

    # The splits a build writes unless told otherwise (a reader may know more, e.g. train_7k).
    build_splits: tuple[str, ...]
    # Annotation files that must be at the root of manual_dir, per split ("*" = every split).
    files: dict
    # Frames per clip where the dataset wants its own (the paragraph datasets: long videos);
    # None = config.data.max_frames (base_config). Only the build command's default reads it.
    max_frames: int | None = None
    # Shown in the manual download instructions: where the original files come from.
    source: str = ""


@dataclasses.dataclass(frozen=True)
class ClipRecord:
    """One video clip with its captions.

    Attributes:
      video_id: the dataset's id (as written in the annotations, e.g. ``video7020``).
      video_path: absolute or root-relative path of the video file that exists on disk.
      captions: one or more captions. One when sentences are expanded (one sample per
        caption), all captions of the video otherwise (multi-sentence evaluation), or a single
        paragraph for paragraph-to-video datasets (ActivityNet, DiDeMo).
      start, end: clip boundaries in seconds, ``None`` meaning the start / end of the file.
      split: ``train`` / ``val`` / ``test``.
    """

    video_id: str
    video_path: str
    captions: tuple[str, ...]
    start: float | None
    end: float | None
    split: str

    def __post_init__(self):
        # A list would make the record unhashable and mutable; catch it where it is built.
        if not isinstance(self.captions, tuple):
            raise TypeError(
                f"ClipRecord.captions must be a tuple, got {type(self.captions).__name__}"
            )
        if not self.captions:
            raise ValueError(f"ClipRecord {self.video_id!r} has no captions")


class SkipReport:
    """Collects skipped inputs as (file name, reason) entries.

    `reason` is a short fixed category (``missing video``, ``empty caption`` ...) so that the
    counts group well; `detail` carries the specifics (row number, exception text).
    """

    def __init__(self):
        self.entries: list[dict[str, str]] = []

    def add(self, file_name: str, reason: str, detail: str = "") -> None:
        self.entries.append({"file": str(file_name), "reason": reason, "detail": detail})

    def extend(self, other: "SkipReport") -> None:
        self.entries.extend(other.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def counts(self) -> dict[str, int]:
        """Number of skipped items per reason, most frequent first."""
        return dict(collections.Counter(e["reason"] for e in self.entries).most_common())

    def files(self, reason: str | None = None) -> list[str]:
        return [e["file"] for e in self.entries if reason is None or e["reason"] == reason]

    def summary(self) -> str:
        if not self.entries:
            return "skipped: 0"
        parts = ", ".join(f"{n} {r}" for r, n in self.counts().items())
        return f"skipped: {len(self.entries)} ({parts})"

    def write(self, path: str) -> str:
        """Writes the report; ``.json`` gives machine-readable JSON, anything else a text file.

        The text format is one tab-separated line per entry (reason, file, detail) after a
        summary line, so that ``cut -f2`` lists the offending files.
        """
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if path.endswith(".json"):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(
                    {"total": len(self.entries), "counts": self.counts(), "entries": self.entries},
                    f,
                    indent=1,
                    ensure_ascii=False,
                )
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"# {self.summary()}\n")
                for e in self.entries:
                    detail = e["detail"].replace("\t", " ").replace("\n", " ")
                    f.write(f"{e['reason']}\t{e['file']}\t{detail}\n")
        return path


def skip_or_raise(
    report: SkipReport | None, strict: bool, file_name: str, reason: str, detail: str = ""
) -> None:
    """The one place that implements the skip-vs-strict policy for readers and builders."""
    if strict:
        msg = f"{file_name}: {reason}" + (f" ({detail})" if detail else "")
        raise DataError(msg)
    if report is not None:
        report.add(file_name, reason, detail)


def check_records(records: Iterable[ClipRecord], source: str) -> list[ClipRecord]:
    """Fails clearly when a split ends up empty (e.g. wrong --video_dir), instead of later."""
    records = list(records)
    if not records:
        raise DataError(f"{source}: no usable clips (see the skip report for the reasons)")
    return records
