"""Re-encode a folder of videos to a low frame rate and a small size, as the original did.

The CLIP4Clip family pre-compresses every dataset with ffmpeg (preprocess/compress_video.py:
``-r 3``, shorter side 224 with even sides, video stream only) so that decoding at training
time is cheap. This tool does the same with PyAV (no ffmpeg binary needed), in parallel:

  python -m data_pipeline.compress --input_dir RAW/videos --output_dir RAW/videos_3fps \
      [--fps 3 --size 224 --workers N]

* The folder structure is mirrored; every output is ``<relative path without extension>.mp4``
  (H.264, yuv420p). The readers look videos up by id with any extension, so this drops in.
* Resumable: an output that exists is a finished one (each is written under a temporary name
  and renamed at the end, so a killed run leaves no half file) and is skipped.
* Failures (unreadable inputs) do not stop the run; they are listed at the end and written to
  ``OUTPUT/compress_failures.txt``; the exit status is 1 when any occurred.
* Frame-rate conversion: output frame k (time k / fps) is the first input frame at or after
  that time (dropped frames in between; repeated frames when the input is slower than the
  target), so a 10 s clip gives 10 * fps frames. This is close to, not bit-identical with,
  ffmpeg's ``-r``; the later 1 fps sampling only needs frames at whole seconds, which both
  place at the same input frames. Scaling is swscale bicubic, ffmpeg's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import math
import multiprocessing
import os
import sys
import time

import av
from tqdm import tqdm

INPUT_EXTENSIONS = (
    ".mp4",
    ".webm",
    ".mkv",
    ".avi",
    ".mov",
    ".m4v",
    ".3gp",
    ".mpg",
    ".mpeg",
    ".flv",
    ".wmv",
)


def output_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Shorter side -> `size`, longer side scaled and truncated to an even number (yuv420p)."""
    if width >= height:
        return max(2, int(width * size / height) // 2 * 2), size
    return size, max(2, int(height * size / width) // 2 * 2)


@dataclasses.dataclass
class Job:
    src: str
    dst: str
    fps: int
    size: int
    crf: int
    preset: str
    threads: int


def compress_one(job: Job) -> tuple[str, str, str]:
    """Returns (src, status, message); status is ``done``, ``skipped`` or ``failed``."""
    if os.path.exists(job.dst):
        return job.src, "skipped", ""
    os.makedirs(os.path.dirname(job.dst) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(job.dst), "." + os.path.basename(job.dst) + ".partial")
    try:
        n_in, n_out = _transcode(job, tmp)
        if n_out == 0:
            raise ValueError("no frames decoded")
        os.replace(tmp, job.dst)  # atomic on one file system: the output exists only when whole
        return job.src, "done", f"{n_in} -> {n_out} frames"
    except Exception as e:  # every failure is reported, none stops the other files
        if os.path.exists(tmp):
            os.remove(tmp)
        return job.src, "failed", f"{type(e).__name__}: {e}"


def _transcode(job: Job, tmp: str) -> tuple[int, int]:
    with av.open(job.src) as inp:
        if not inp.streams.video:
            raise ValueError("no video stream")
        ist = inp.streams.video[0]
        ist.thread_count = job.threads
        in_rate = float(ist.average_rate or ist.guessed_rate or 0) or None
        w, h = output_size(ist.codec_context.width, ist.codec_context.height, job.size)
        n_in = n_out = 0
        with av.open(tmp, mode="w", format="mp4") as out:
            ost = out.add_stream(
                "libx264",
                rate=job.fps,
                options={"crf": str(job.crf), "preset": job.preset, "threads": str(job.threads)},
            )
            ost.width, ost.height, ost.pix_fmt = w, h, "yuv420p"
            tb = fractions.Fraction(1, job.fps)
            ost.codec_context.time_base = tb
            t0 = None
            for frame in inp.decode(ist):
                t = frame.time
                if t is None:
                    t = n_in / in_rate if in_rate else None
                if t is None:
                    raise ValueError("frames have no timestamps and the stream no frame rate")
                t0 = t if t0 is None else t0
                slot = int(math.floor((t - t0) * job.fps + 1e-6))
                n_in += 1
                if slot < n_out:
                    continue  # an output frame for this time exists: drop
                small = frame.reformat(width=w, height=h, format="yuv420p", interpolation="BICUBIC")
                while n_out <= slot:  # repeat when the input is slower than the target rate
                    small.pts = n_out
                    small.time_base = tb
                    for packet in ost.encode(small):
                        out.mux(packet)
                    n_out += 1
            for packet in ost.encode():
                out.mux(packet)
    return n_in, n_out


def find_inputs(input_dir: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(input_dir):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(INPUT_EXTENSIONS) and not f.startswith("."):
                out.append(os.path.join(root, f))
    return out


def make_jobs(input_dir, output_dir, *, fps=3, size=224, crf=23, preset="medium", threads=1):
    jobs = []
    for src in find_inputs(input_dir):
        rel = os.path.splitext(os.path.relpath(src, input_dir))[0] + ".mp4"
        jobs.append(Job(src, os.path.join(output_dir, rel), fps, size, crf, preset, threads))
    return jobs


def compress_dir(
    input_dir: str,
    output_dir: str,
    *,
    fps: int = 3,
    size: int = 224,
    workers: int = 1,
    crf: int = 23,
    preset: str = "medium",
    progress: bool = True,
) -> dict[str, list]:
    """Compresses every video under `input_dir`; returns {'done'|'skipped'|'failed': [...]}."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"--input_dir {input_dir} is not a folder")
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise ValueError("--output_dir must differ from --input_dir (outputs are .mp4 too)")
    jobs = make_jobs(input_dir, output_dir, fps=fps, size=size, crf=crf, preset=preset)
    os.makedirs(output_dir, exist_ok=True)
    results = {"done": [], "skipped": [], "failed": []}
    bar = tqdm(total=len(jobs), unit="video", disable=not progress, desc="compress")
    if workers <= 1:
        it = map(compress_one, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers)
        it = pool.imap_unordered(compress_one, jobs, chunksize=1)
    try:
        for src, status, msg in it:
            results[status].append((src, msg))
            bar.update(1)
            bar.set_postfix(failed=len(results["failed"]), refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    if results["failed"]:
        with open(os.path.join(output_dir, "compress_failures.txt"), "w", encoding="utf-8") as f:
            for src, msg in sorted(results["failed"]):
                f.write(f"{src}\t{msg}\n")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Re-encode videos to N fps, shorter side S (H.264).")
    p.add_argument("--input_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--fps", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="shorter side in pixels")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--crf", type=int, default=23, help="x264 quality (ffmpeg's default 23)")
    p.add_argument("--preset", default="medium", help="x264 preset (ffmpeg's default medium)")
    a = p.parse_args(argv)
    t0 = time.time()
    r = compress_dir(
        a.input_dir,
        a.output_dir,
        fps=a.fps,
        size=a.size,
        workers=a.workers,
        crf=a.crf,
        preset=a.preset,
    )
    print(
        f"compressed {len(r['done'])}, already done {len(r['skipped'])}, "
        f"failed {len(r['failed'])} in {time.time() - t0:.1f}s"
    )
    for src, msg in sorted(r["failed"])[:20]:
        print(f"  FAILED {src}: {msg}")
    if r["failed"]:
        print(f"  full list: {os.path.join(a.output_dir, 'compress_failures.txt')}")
    return 1 if r["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
