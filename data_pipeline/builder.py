"""TFDS builder for the six video-text datasets: sampled JPEG frames + captions per clip.

One builder class, `UcofiaVideoText`, parameterised by a `VideoTextConfig` (dataset name and
the frame sampling), so that the datasets share all code; only the annotation readers
(`data_pipeline.datasets`) differ. Decoding is the cost, so `_generate_examples` fans the
clips out to a process pool; each finished clip is also written to a per-clip cache under
``<data_dir>/.ucofia_cache/`` so that a build that was killed halfway skips the decodes it
already did when it is run again. TFDS itself writes into an ``incomplete.*`` directory and
renames it only on success, so an interrupted build never leaves a half dataset (or
duplicates) behind; `clean_stale_incomplete_dirs` removes the temp directories of builds
that were killed with SIGKILL (TFDS only cleans them up on exceptions).

Records are stored in ArrayRecord files so that the input pipeline can read them by index
(`pipeline.py` relies on this for its deterministic, resumable order).

Features of one example (one clip = one video, or one LSMDC clip):
  video_id    Text
  frames      Sequence(Image(S, S, 3), length=max_frames), JPEG; zero frames where frame_mask = 0
  frame_mask  int32 [max_frames]
  captions    Sequence(Text): all captions of the clip (the pipeline expands or samples)
  start, end  float32 seconds, -1 meaning "start / end of the file"
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import multiprocessing
import os
import shutil
import sys
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm import tqdm

from data_pipeline import datasets
from data_pipeline import records as records_lib
from data_pipeline import video as video_lib
from data_pipeline.sampling import FrameSampling

BUILDER_NAME = "ucofia_video_text"
DATASET_VERSION = "1.0.0"
CACHE_DIRNAME = ".ucofia_cache"

log = logging.getLogger(__name__)


# The dataset names, in the order of the registry (`datasets.MODULES`).
DATASETS: tuple[str, ...] = tuple(datasets.SPECS)


def required_files(dataset: str, split: str | None = None) -> list[str]:
    """Annotation file names that must be at the root of manual_dir (one split or the defaults)."""
    spec = dataset_spec(dataset)
    splits = spec.build_splits if split is None else (split,)
    out = list(spec.files.get("*", ()))
    for s in splits:
        out += [f for f in spec.files.get(s, ()) if f not in out]
    return out


def dataset_spec(dataset: str) -> records_lib.DatasetSpec:
    if dataset not in datasets.SPECS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    return datasets.SPECS[dataset]


def layout_text(dataset: str) -> str:
    """The manual_dir layout a dataset needs, as shown in instructions and error messages."""
    files = "\n".join(f"      {f}" for f in required_files(dataset))
    return (
        f"  <manual_dir>/          ({dataset_spec(dataset).source})\n{files}\n"
        f"      videos/<video_id>.mp4   (or .webm/.mkv/.avi; another folder with --video_dir)"
    )


class VideoTextConfig(tfds.core.BuilderConfig):
    """Dataset + frame sampling. The name encodes everything that changes the stored frames."""

    def __init__(self, *, dataset: str, sampling: FrameSampling, **kwargs):
        super().__init__(
            name=config_name(dataset, sampling),
            version=DATASET_VERSION,
            description=f"{dataset}: {sampling.max_frames} frames of {sampling.image_size}px",
            **kwargs,
        )
        self.dataset = dataset
        self.sampling = sampling


# The name format of built datasets: ``<dataset>_f<max_frames>_s<image_size>``, then a suffix
# for each of these fields whose value differs from the one given here. These are the values of
# the names already on disk (the original's 1 fps and uniform slice, JPEG quality 95), part of
# the name format, not defaults: changing a default in base_config must not rename datasets.
_NAME_SUFFIXES = {
    "feature_framerate": ("fps", 1),
    "slice_framepos": ("pos", 2),
    "jpeg_quality": ("q", 95),
}


def config_name(dataset: str, sampling: FrameSampling) -> str:
    """``msrvtt_f12_s224``, + ``_fps2`` / ``_pos0`` / ``_q90`` where the sampling is not the
    original 1 fps / uniform slice / JPEG quality 95 (`_NAME_SUFFIXES`)."""
    dataset_spec(dataset)  # an unknown dataset fails here, naming the known ones
    name = f"{dataset}_f{sampling.max_frames}_s{sampling.image_size}"
    for field, (tag, unnamed) in _NAME_SUFFIXES.items():
        value = getattr(sampling, field)
        if value != unnamed:
            name += f"_{tag}{value}"
    return name


def _manual_instructions() -> str:
    parts = [
        "Put each dataset's annotation files at the root of --manual_dir under their "
        "original names and the videos in <manual_dir>/videos/ (or pass --video_dir). "
        "Then run `python -m data_pipeline.build --dataset=NAME --manual_dir=RAW "
        "--data_dir=OUT`.\n"
    ]
    for name in DATASETS:
        parts.append(f"{name}:\n{layout_text(name)}\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Worker side: runs in spawned processes; must not touch TensorFlow.


@dataclasses.dataclass(frozen=True)
class _Job:
    index: int
    video_id: str
    video_path: str
    start: float | None
    end: float | None
    sampling: FrameSampling
    cache_dir: str | None


def _cache_path(job: _Job) -> str | None:
    if not job.cache_dir:
        return None
    try:
        st = os.stat(job.video_path)
    except OSError:
        return None
    # Everything that changes the stored frames is in the key, including the file's identity,
    # so a replaced video is decoded again.
    key = repr(
        (
            os.path.abspath(job.video_path),
            st.st_size,
            st.st_mtime_ns,
            job.start,
            job.end,
            job.sampling.max_frames,
            job.sampling.image_size,
            job.sampling.feature_framerate,
            job.sampling.slice_framepos,
            job.sampling.jpeg_quality,
        )
    )
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return os.path.join(job.cache_dir, digest[:2], digest + ".npz")


def _encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _load_cached(path: str):
    with np.load(path, allow_pickle=False) as z:
        data, offsets, mask = z["data"].tobytes(), z["offsets"], z["mask"]
    jpegs = [data[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return jpegs, mask


def _save_cached(path: str, jpegs: list[bytes], mask: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    offsets = np.cumsum([0] + [len(j) for j in jpegs]).astype(np.int64)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, data=np.frombuffer(b"".join(jpegs), np.uint8), offsets=offsets, mask=mask)
    os.replace(tmp, path)  # atomic: a killed worker never leaves a half-written cache entry


def process_clip(job: _Job):
    """Decodes one clip -> ``(index, jpegs, mask, None)``, or on failure
    ``(index, None, None, (reason, detail))``."""
    cache = _cache_path(job)
    if cache and os.path.exists(cache):
        try:
            jpegs, mask = _load_cached(cache)
            return job.index, jpegs, mask, None
        except Exception:  # pylint: disable=broad-except
            pass  # a corrupt cache entry is simply recomputed
    try:
        frames, mask = video_lib.decode_clip(
            job.video_path, job.sampling, start=job.start, end=job.end
        )
    except video_lib.VideoDecodeError as e:
        return job.index, None, None, (e.reason, e.detail)
    except Exception as e:  # pylint: disable=broad-except
        # Anything unexpected from FFmpeg/PIL is a skip with the exception text, not a crash of
        # a multi-hour build; --strict turns it into an error in the parent.
        return job.index, None, None, ("decode error", f"{type(e).__name__}: {e}")
    jpegs = [_encode_jpeg(f, job.sampling.jpeg_quality) for f in frames]
    if cache:
        try:
            _save_cached(cache, jpegs, mask)
        except OSError:
            pass  # the cache is an optimisation only
    return job.index, jpegs, mask, None


# ---------------------------------------------------------------------------------------


class UcofiaVideoText(tfds.core.GeneratorBasedBuilder):
    """Video-text retrieval datasets (MSR-VTT, MSVD, LSMDC, ActivityNet, DiDeMo, VATEX)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Sampled JPEG frames + all captions per clip."}
    # No predefined configs: every config is made from a FrameSampling (config.data), so the
    # builder holds no sampling defaults of its own.
    MANUAL_DOWNLOAD_INSTRUCTIONS = _manual_instructions()

    # TFDS 4.9's default looks the module up through `importlib_resources`, a package it does
    # not declare as a dependency; the file of this class is all it needs.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(os.path.abspath(__file__))

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
    # prepared" on stdout, although nothing downloads (the clips are local files) and the
    # build prints its own summary: here they are INFO log lines, shown by --verbose.
    def _log_download_bytes(self) -> None:
        log.info("TFDS: preparing %s in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        log.info("TFDS: %s prepared in %s", self.name, self.data_dir)

    def __init__(
        self,
        *,
        video_dir: str | None = None,
        workers: int | None = None,
        strict: bool = False,
        cache_dir: str | None = None,
        progress: bool = True,
        splits: tuple[str, ...] | None = None,
        fail_after: int | None = None,
        **kwargs,
    ):
        """Extra arguments (only used when building).

        Args:
          splits: the splits to build; default the spec's `build_splits` (e.g. add ``train_7k``
            for MSR-VTT's 7k training list).
          video_dir: folder of the video files; default ``<manual_dir>/videos``.
          workers: decode processes; default all CPUs. 0 decodes in this process.
          strict: refuse bad input instead of skipping it: every annotation problem of every
            split is listed in one `DataError` before any video is decoded; the videos of a
            split that fail to decode are listed together at the end of that split.
          cache_dir: per-clip decode cache (resume); default ``<data_dir>/.ucofia_cache/<config>``;
            '' disables it.
          progress: show a tqdm bar per split.
          fail_after: testing hook: raise after this many examples (simulates an interruption).
        """
        super().__init__(**kwargs)
        self._video_dir = video_dir
        self._workers = (os.cpu_count() or 1) if workers is None else int(workers)
        self._strict = strict
        self._cache_dir = cache_dir
        self._progress = progress
        self._fail_after = fail_after
        self._splits = tuple(splits) if splits else None
        self.skip_report = records_lib.SkipReport()
        self.written: dict[str, int] = {}
        self._records: dict[str, list[records_lib.ClipRecord]] = {}  # read ahead (strict)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        s, f = c.sampling.image_size, c.sampling.max_frames
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "video_id": tfds.features.Text(),
                    "frames": tfds.features.Sequence(
                        tfds.features.Image(shape=(s, s, 3), encoding_format="jpeg"),
                        length=f,
                    ),
                    "frame_mask": tfds.features.Tensor(shape=(f,), dtype=np.int32),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "start": tfds.features.Scalar(dtype=np.float32),
                    "end": tfds.features.Scalar(dtype=np.float32),
                }
            ),
            description=(
                f"{c.dataset}: {f} frames sampled at {c.sampling.feature_framerate} fps "
                f"(slice_framepos {c.sampling.slice_framepos}), {s}px, with all captions per clip."
            ),
        )

    @property
    def dataset_root(self) -> str:
        """``<data_dir>/ucofia_video_text/<config>`` (stable, outside TFDS's temp directory)."""
        return os.path.join(os.fspath(self.data_dir_root), self.name, self.builder_config.name)

    def default_cache_dir(self) -> str:
        return os.path.join(os.fspath(self.data_dir_root), CACHE_DIRNAME, self.builder_config.name)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        c = self.builder_config
        splits = self._splits or dataset_spec(c.dataset).build_splits
        check_manual_dir(c.dataset, manual_dir, self._video_dir, splits)
        if self._strict:
            # Every annotation problem of every split at once, before any decoding.
            problems = records_lib.SkipReport()
            for split in splits:
                self._records[split] = self._read_all(manual_dir, split, problems)
            if len(problems):
                self.skip_report.extend(problems)
                raise records_lib.DataError(
                    strict_message(problems, f"the annotations of {c.dataset} ({manual_dir})")
                )
        return {split: self._generate_examples(manual_dir, split) for split in splits}

    def _read_all(self, manual_dir: str, split: str, report: records_lib.SkipReport):
        reader = datasets.get_reader(self.builder_config.dataset)
        # One record per clip with all its captions; the pipeline expands or samples captions.
        # strict=False: each problem goes to the report (--strict turns the list into one error).
        return reader(
            manual_dir,
            split,
            video_dir=self._video_dir,
            expand_sentences=False,
            strict=False,
            report=report,
        )

    def _read_records(self, manual_dir: str, split: str) -> list[records_lib.ClipRecord]:
        recs = self._records.pop(split, None)
        if recs is None:
            recs = self._read_all(manual_dir, split, self.skip_report)
        return records_lib.check_records(
            recs, f"{self.builder_config.dataset} {split} ({manual_dir})"
        )

    def _generate_examples(self, manual_dir: str, split: str) -> Iterator[tuple[str, dict]]:
        c = self.builder_config
        recs = self._read_records(manual_dir, split)
        cache_dir = self.default_cache_dir() if self._cache_dir is None else self._cache_dir
        jobs = [
            _Job(
                i,
                r.video_id,
                r.video_path,
                r.start,
                r.end,
                c.sampling,
                cache_dir or None,
            )  # shared by the splits: train_7k reuses train's decodes
            for i, r in enumerate(recs)
        ]
        self.written[split] = 0
        pbar = None
        if self._progress:
            pbar = tqdm(total=len(jobs), desc=f"{c.name} {split}", unit="clip", file=sys.stderr)
        results = _run_jobs(jobs, self._workers)
        failed = records_lib.SkipReport()
        try:
            yield from self._write(results, recs, split, pbar, failed)
        finally:
            # Stops the pool now (not at garbage collection) when --strict or an interruption
            # ends the split early.
            results.close()
            if pbar is not None:
                pbar.close()
        if self._strict and len(failed):
            raise records_lib.DataError(
                strict_message(failed, f"the videos of {c.dataset} {split}")
            )
        if self.written[split] == 0:
            raise records_lib.DataError(
                f"{c.dataset} {split}: every clip failed to decode ({self.skip_report.summary()})"
            )

    def _write(self, results, recs, split, pbar, failed: records_lib.SkipReport):
        for index, jpegs, mask, error in results:
            if pbar is not None:
                pbar.update(1)
            r = recs[index]
            if error is not None:
                reason, detail = error
                self.skip_report.add(r.video_path, reason, detail)
                failed.add(r.video_path, reason, detail)  # strict: listed at the split's end
                continue
            if self._fail_after is not None and sum(self.written.values()) >= self._fail_after:
                raise RuntimeError(f"fail_after={self._fail_after}: simulated interruption")
            self.written[split] += 1
            # The key includes the record index: LSMDC/DiDeMo-style datasets may have several
            # clips of one video, and TFDS rejects duplicate keys.
            yield (
                f"{index:08d}_{r.video_id}",
                {
                    "video_id": r.video_id,
                    "frames": jpegs,
                    "frame_mask": np.asarray(mask, np.int32),
                    "captions": list(r.captions),
                    "start": np.float32(-1 if r.start is None else r.start),
                    "end": np.float32(-1 if r.end is None else r.end),
                },
            )


def _run_jobs(jobs: list[_Job], workers: int):
    if workers <= 0 or len(jobs) <= 1:
        for job in jobs:
            yield process_clip(job)
        return
    # spawn, not fork: the parent has TensorFlow loaded and forking a threaded process can
    # deadlock; the workers only import av/PIL/numpy (+ tfds, ~1 s once per worker).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs))) as pool:
        # Unordered: TFDS shuffles by key anyway, and slow videos should not stall the bar.
        yield from pool.imap_unordered(process_clip, jobs, chunksize=1)


def strict_message(problems: records_lib.SkipReport, what: str, limit: int = 200) -> str:
    """The one error of a --strict build: every problem, one per line (file: reason (detail))."""
    lines = [
        f"  {e['file']}: {e['reason']}" + (f" ({e['detail']})" if e["detail"] else "")
        for e in list(problems)[:limit]
    ]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return (
        f"--strict: {len(problems)} problem(s) in {what} ({problems.summary()}); nothing "
        "was written:\n" + "\n".join(lines) + more
    )


def check_manual_dir(
    dataset: str,
    manual_dir: str,
    video_dir: str | None = None,
    splits: tuple[str, ...] | None = None,
) -> None:
    """Raises `DataError` naming every missing annotation file / the missing video folder."""
    spec = dataset_spec(dataset)
    known = datasets.SPLITS[dataset]
    bad = [s for s in splits or () if s not in known]
    if bad:
        raise ValueError(f"{dataset}: unknown split(s) {bad}; the reader knows {list(known)}")
    if not os.path.isdir(manual_dir):
        raise records_lib.DataError(
            f"manual_dir {manual_dir} does not exist. Expected layout for {dataset}:\n"
            f"{layout_text(dataset)}"
        )
    missing = []
    for split in splits or spec.build_splits:
        for f in required_files(dataset, split):
            p = os.path.join(manual_dir, f)
            if not os.path.isfile(p) and p not in missing:
                missing.append(p)
    vdir = video_dir or os.path.join(manual_dir, "videos")
    if not os.path.isdir(vdir):
        missing.append(f"{vdir}/ (video folder; pass --video_dir if the videos are elsewhere)")
    if missing:
        raise records_lib.DataError(
            f"{dataset}: missing in {manual_dir}:\n"
            + "\n".join(f"  {m}" for m in missing)
            + f"\nExpected layout:\n{layout_text(dataset)}"
        )


def clean_stale_incomplete_dirs(builder: UcofiaVideoText) -> list[str]:
    """Removes TFDS temp dirs of this config left by a killed build (TFDS cleans only on
    exceptions).

    Not safe while another build of the same config is running into the same data_dir.
    """
    root = builder.dataset_root
    removed = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("incomplete."):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    return removed


def get_builder(
    dataset: str, *, data_dir: str, sampling: FrameSampling, **kwargs
) -> UcofiaVideoText:
    """The builder for one dataset + sampling (reading or building)."""
    config = VideoTextConfig(dataset=dataset, sampling=sampling)
    return UcofiaVideoText(config=config, data_dir=data_dir, **kwargs)
