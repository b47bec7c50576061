"""Does a caption find its own time range in a long video? (``index``'s moments, end to end)

Concatenates the first ``--clips`` test clips of a trained demo run (the synthetic dataset's
``MSRVTT_JSFUSION_test.csv``: one canonical caption per test clip, the clips in
``data/raw/videos``) into one long video, indexes it with the run's model (window = one
clip's length, stride = half of it, unless given), queries each clip's caption and prints a
table: the clip's true [start, end], the best moment's [start, end] and their temporal IoU,
whether the best moment overlaps the clip with IoU >= ``--iou``, and whether one of the best
``--per_file`` moments (non-maximum suppressed) does. Chance for top-1 is about 1 / clips.

    python benchmarks/search_moments.py --workdir workdir/demo
    python benchmarks/search_moments.py --workdir workdir/demo --clips 24 --first 12

The long video and its index live in a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import av

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# After the repo is on the path (the benchmark runs as a plain script).
from data_pipeline import video as video_lib  # noqa: E402
from ucofia_jax.errors import UserError  # noqa: E402
from ucofia_jax.search import indexer, scoring  # noqa: E402
from ucofia_jax.search.index import Index  # noqa: E402
from ucofia_jax.search.source import ModelSource, load_model  # noqa: E402

TEST_CSV = "data/raw/MSRVTT_JSFUSION_test.csv"
VIDEOS = "data/raw/videos"


class BenchmarkInputError(UserError):
    """A workdir without what this benchmark reads."""


def read_test_clips(workdir: Path, first: int, count: int) -> list:
    """[(video file, caption)] of test clips first .. first + count - 1 in the csv's order."""
    table = workdir / TEST_CSV
    if not table.is_file():
        raise BenchmarkInputError(f"{table}: missing (is {workdir} a `make demo` run?)")
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"video_id", "sentence"} <= set(rows[0]):
        raise BenchmarkInputError(f"{table}: no rows with video_id and sentence columns")
    if first < 0 or count < 1 or first + count > len(rows):
        raise BenchmarkInputError(
            f"{table}: has {len(rows)} test clips; cannot take {count} from number {first}"
        )
    out = []
    for row in rows[first : first + count]:
        path = workdir / VIDEOS / f"{row['video_id']}.mp4"
        if not path.is_file():
            raise BenchmarkInputError(f"{path}: missing (named in {table})")
        out.append((path, row["sentence"]))
    return out


def decode_all(path: Path) -> tuple:
    """(every frame as uint8 RGB, frames per second) of ``path``."""
    try:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            fps = stream.average_rate
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as e:
        raise BenchmarkInputError(f"{path}: cannot decode ({e})") from e
    if not frames or fps is None:
        raise BenchmarkInputError(f"{path}: no video frames")
    return frames, float(fps)


def concatenate(clips: list, out: Path) -> list:
    """Writes the clips one after another to ``out``; returns each clip's (start, end) s."""
    frames, spans, fps0 = [], [], None
    for path, _ in clips:
        got, fps = decode_all(path)
        if fps0 is None:
            fps0 = fps
        elif fps != fps0:
            raise BenchmarkInputError(f"{path}: {fps:g} fps, the first clip has {fps0:g}")
        start = len(frames) / fps0
        frames += got
        spans.append((start, len(frames) / fps0))
    if fps0 != int(fps0):
        raise BenchmarkInputError(f"{clips[0][0]}: {fps0:g} fps is not a whole number")
    video_lib.write_video(str(out), frames, int(fps0))
    return spans


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained run (`make demo` output)")
    p.add_argument("--clips", type=int, default=12, help="test clips to concatenate")
    p.add_argument("--first", type=int, default=0, help="first test clip (csv order)")
    p.add_argument("--window", type=float, default=None, help="s; default one clip's length")
    p.add_argument("--stride", type=float, default=None, help="s; default half the window")
    p.add_argument("--per_file", type=int, default=3, help="moments kept for 'within top-n'")
    p.add_argument("--iou", type=float, default=0.5, help="temporal IoU that counts as found")
    p.add_argument("--workers", type=int, default=0, help="decode processes of `index`")
    a = p.parse_args(argv)
    try:
        run(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(a) -> None:
    workdir = Path(a.workdir)
    clips = read_test_clips(workdir, a.first, a.clips)
    model = load_model(ModelSource(workdir=str(workdir)))
    with tempfile.TemporaryDirectory(prefix="ucofia_moments_") as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        t0 = time.time()
        spans = concatenate(clips, folder / "long.mp4")
        lengths = {round(e - s, 6) for s, e in spans}
        window = a.window if a.window is not None else max(lengths)
        stride = a.stride if a.stride is not None else window / 2
        summary = indexer.build_index(
            folder,
            Path(tmp) / "index",
            model,
            workers=a.workers,
            progress=False,
            window=window,
            stride=stride,
        )
        index_s = time.time() - t0
        index = Index.open(Path(tmp) / "index", model)
        captions = [c for _, c in clips]
        t0 = time.time()
        results = index.search(captions, top=a.per_file, per_file=a.per_file)
        query_s = time.time() - t0
    print(
        f"{a.clips} test clips from {a.first} of {workdir}, {spans[-1][1]:g} s in all; "
        f"window {window:g} s, stride {stride:g} s: {summary.rows} moments; "
        f"index {index_s:.1f} s, {len(captions)} queries {query_s:.1f} s"
    )
    print(f"{'clip':>4} {'true':>13} {'top-1':>13} {'IoU':>5} {'top-1':>5} {'top-n':>5}  caption")
    found1 = foundn = 0
    for k, (span, hits, caption) in enumerate(zip(spans, results, captions)):
        ious = [scoring.temporal_iou(span, (h.start, h.end)) for h in hits]
        best = hits[0] if hits else None
        hit1 = bool(ious) and ious[0] >= a.iou
        hitn = any(i >= a.iou for i in ious)
        found1 += hit1
        foundn += hitn
        got = f"[{best.start:5.1f},{best.end:5.1f}]" if best and best.start is not None else "-"
        print(
            f"{k:4d} [{span[0]:5.1f},{span[1]:5.1f}] {got:>13} "
            f"{(ious[0] if ious else 0.0):5.2f} {'yes' if hit1 else 'no':>5} "
            f"{'yes' if hitn else 'no':>5}  {caption}"
        )
    n = len(spans)
    print(
        f"found (IoU >= {a.iou:g}): top-1 {found1}/{n} = {found1 / n:.2f}, "
        f"within top-{a.per_file} moments {foundn}/{n} = {foundn / n:.2f} "
        f"(chance for top-1 about {1 / n:.2f})"
    )


if __name__ == "__main__":
    sys.exit(main())
