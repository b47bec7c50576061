"""Builds one dataset into TFDS format: ``python -m data_pipeline.build``.

    python -m data_pipeline.build --dataset=msrvtt --manual_dir=RAW --data_dir=OUT \
        [--video_dir DIR] [--max_frames N] [--image_size S] [--strict] [--workers N]

``--verbose`` adds the libraries' log lines (TFDS, absl) and TFDS's progress bars to ours.

RAW holds the dataset's annotation files under their original names and the videos in
RAW/videos/ (see ``--help`` or docs/pipeline.md for each dataset's files). The command checks
the layout first and names every missing file, then decodes all clips in parallel, writes
the TFDS dataset to ``OUT/ucofia_video_text/<config>/1.0.0`` and ends with a summary: clips
written per split, clips skipped and why; the skipped file names go to
``OUT/ucofia_video_text/<config>/skip_report.txt`` (and ``.json``).

Re-running after an interruption is safe: TFDS only renames its temp directory into place
when every split is written (so no partial dataset or duplicates), temp directories of
killed builds are removed, and already decoded clips come from the decode cache
(``OUT/.ucofia_cache/<config>``, deleted after a successful build unless --keep_cache).

The frame sampling flags default to ``base_config()``'s ``data`` section (the training
config's), except ``--max_frames`` for a dataset whose spec sets its own (the paragraph
datasets ActivityNet and DiDeMo).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import tensorflow_datasets as tfds

from data_pipeline import builder as builder_lib
from data_pipeline import tables
from data_pipeline.datasets._common import ANNOTATION_REASONS
from data_pipeline.sampling import SLICE_FRAMEPOS, FrameSampling
from ucofia_jax import config as config_lib
from ucofia_jax.errors import DataError
from ucofia_jax.runtime import distributed


def default_sampling(dataset: str) -> FrameSampling:
    """The sampling of a build without sampling flags: ``base_config().data``, with the
    dataset spec's own ``max_frames`` where it has one."""
    sampling = FrameSampling.from_config(config_lib.base_config().data)
    own_frames = builder_lib.dataset_spec(dataset).max_frames
    return sampling if own_frames is None else sampling.replace(max_frames=own_frames)


def _parser() -> argparse.ArgumentParser:
    base = FrameSampling.from_config(config_lib.base_config().data)
    own = {n: builder_lib.dataset_spec(n).max_frames for n in builder_lib.DATASETS}
    own = "; ".join(f"{v} for {n}" for n, v in own.items() if v is not None)
    layouts = "\n\n".join(f"{n}:\n{builder_lib.layout_text(n)}" for n in builder_lib.DATASETS)
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.build",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Layouts of --manual_dir:\n\n" + layouts,
    )
    p.add_argument("--dataset", required=True, choices=builder_lib.DATASETS)
    p.add_argument("--manual_dir", required=True, help="raw annotation files (+ videos/)")
    p.add_argument("--data_dir", required=True, help="TFDS output directory")
    p.add_argument("--video_dir", default=None, help="video folder (default MANUAL_DIR/videos)")
    # Sampling flags: None = default_sampling(dataset) (the help shows the values).
    p.add_argument(
        "--max_frames",
        type=int,
        default=None,
        help=f"frames per clip (default {base.max_frames}" + (f"; {own})" if own else ")"),
    )
    p.add_argument(
        "--image_size", type=int, default=None, help=f"frame side (default {base.image_size})"
    )
    p.add_argument(
        "--feature_framerate",
        type=int,
        default=None,
        help=f"frames taken per second (default {base.feature_framerate})",
    )
    p.add_argument(
        "--slice_framepos",
        type=int,
        default=None,
        choices=tuple(SLICE_FRAMEPOS),
        help=f"frames kept when more were taken: {SLICE_FRAMEPOS} (default {base.slice_framepos})",
    )
    p.add_argument(
        "--jpeg_quality",
        type=int,
        default=None,
        help=f"JPEG quality of the stored frames (default {base.jpeg_quality})",
    )
    p.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits to build (default: the dataset's usual ones; "
        "e.g. train,test,train_7k for MSR-VTT's 7k list too)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse bad input instead of skipping it: lists every annotation problem of "
        "every split before decoding (and every video of a split that fails to decode)",
    )
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all CPUs)")
    p.add_argument(
        "--keep_cache",
        action="store_true",
        help="keep the per-clip decode cache after a successful build",
    )
    p.add_argument("--no_progress", action="store_true")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' log lines and TFDS's own progress bars too",
    )
    return p


def build(
    dataset: str,
    *,
    manual_dir: str,
    data_dir: str,
    sampling: FrameSampling,
    video_dir: str | None = None,
    strict: bool = False,
    workers: int | None = None,
    keep_cache: bool = False,
    progress: bool = True,
    splits=None,
    fail_after: int | None = None,
    log=print,
) -> dict:
    """Builds (or finds already built) one dataset with `sampling`. Returns a summary dict.

    Keys: ``config``, ``path`` (the TFDS version dir), ``written`` (clips per split),
    ``skipped`` (count per reason), ``report`` (report file or None), ``reused`` (bool).
    Raises `DataError` for a bad layout, and in strict mode for any bad input (one error
    that lists every problem; the skip report on disk has them too).
    """
    if not progress:
        tfds.disable_progress_bar()  # TFDS's own per-split bars
    manual_dir = os.path.abspath(manual_dir)
    data_dir = os.path.abspath(data_dir)
    video_dir = os.path.abspath(video_dir) if video_dir else None
    b = builder_lib.get_builder(
        dataset,
        data_dir=data_dir,
        sampling=sampling,
        video_dir=video_dir,
        workers=workers,
        strict=strict,
        progress=progress,
        splits=tuple(splits) if splits else None,
        fail_after=fail_after,
    )
    name = b.builder_config.name
    if b.is_prepared():
        missing = [s for s in splits or () if s not in b.info.splits]
        if missing:
            raise DataError(
                f"{name} in {b.data_dir} was built without split(s) {missing} (it has "
                f"{sorted(b.info.splits)}); delete {b.dataset_root} and build again with "
                f"--splits={','.join(sorted(set(b.info.splits) | set(splits)))}"
            )
        log(f"{name}: already built at {b.data_dir}; delete it to rebuild.")
        return {
            "config": name,
            "path": os.fspath(b.data_dir),
            "reused": True,
            "written": {s: v.num_examples for s, v in b.info.splits.items()},
            "skipped": {},
            "report": None,
        }
    builder_lib.check_manual_dir(dataset, manual_dir, video_dir, tuple(splits) if splits else None)
    stale = builder_lib.clean_stale_incomplete_dirs(b)
    if stale:
        log(f"{name}: removed {len(stale)} temp dir(s) of an interrupted build: {', '.join(stale)}")
    t0 = time.time()
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        try_download_gcs=False,
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
    )
    try:
        b.download_and_prepare(
            download_config=config,
            file_format="array_record",
            download_dir=os.path.join(data_dir, "downloads"),
        )
    finally:
        # Written also when the build fails (e.g. --strict), so that the reasons are on disk.
        # Always written (also when empty) so that a finished build has a report to look at.
        report = b.skip_report.write(os.path.join(b.dataset_root, "skip_report.txt"))
        b.skip_report.write(os.path.join(b.dataset_root, "skip_report.json"))
    if not keep_cache:
        shutil.rmtree(b.default_cache_dir(), ignore_errors=True)
    # The captions/ids sidecar of each split, so that the pipeline does not read every frame
    # byte at start-up to learn them.
    for split in b.info.splits:
        tables.load_tables(
            b.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES),
            b.data_dir,
            split,
        )
    written = dict(b.written)
    total = sum(written.values())
    per_split = ", ".join(f"{s} {n}" for s, n in written.items())
    log(f"{name}: wrote {total} clips ({per_split}) to {b.data_dir} in {time.time() - t0:.1f} s")
    n_ann = sum(1 for e in b.skip_report if e["reason"] in ANNOTATION_REASONS)
    log(
        f"{name}: {b.skip_report.summary()}; {n_ann} of them annotation problems, "
        f"{len(b.skip_report) - n_ann} videos; report: {report}"
    )
    return {
        "config": name,
        "path": os.fspath(b.data_dir),
        "written": written,
        "skipped": b.skip_report.counts(),
        "report": report,
        "reused": False,
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    distributed.quiet_logs(args.verbose)
    if not args.verbose:
        tfds.disable_progress_bar()  # TFDS's per-split bars; ours (one per split) stay
    flags = {k: getattr(args, k) for k in FrameSampling.field_names()}
    try:
        sampling = default_sampling(args.dataset).replace(
            **{k: v for k, v in flags.items() if v is not None}
        )
    except ValueError as e:  # named after the config key; here it came from the flag
        print(f"error: {str(e).replace('config.data.', '--')}", file=sys.stderr)
        return 2
    try:
        build(
            args.dataset,
            manual_dir=args.manual_dir,
            data_dir=args.data_dir,
            sampling=sampling,
            video_dir=args.video_dir,
            strict=args.strict,
            workers=args.workers,
            keep_cache=args.keep_cache,
            progress=not args.no_progress,
            splits=[s.strip() for s in args.splits.split(",") if s.strip()]
            if args.splits
            else None,
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
