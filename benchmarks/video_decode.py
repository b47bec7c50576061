"""Decode throughput of data_pipeline.video.decode_clip, in clips/s per CPU core.

Generates its own clips (10 s, 320x240, 30 fps, H.264, moving gradient + shapes so the
encoder sees motion), then times ``decode_clip`` at the training sampling (``base_config()``'s
``data``) with one decoder thread in one process (= one core). Also times the same clips after
the 3 fps / shorter-side-224 compression the original recipe applies (what training reads).

  python benchmarks/video_decode.py [--num_clips 8 --repeats 2 --workers 1,2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np

from data_pipeline import compress
from data_pipeline.sampling import FrameSampling
from data_pipeline.video import decode_clip, write_video
from ucofia_jax import config as config_lib


def make_clip(path, seed, seconds=10, fps=30, w=320, h=240):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, 3)
    frames = []
    for t in range(seconds * fps):
        f = np.empty((h, w, 3), np.uint8)
        f[..., 0] = (xx + 3 * t + base[0]) % 256
        f[..., 1] = (yy + 2 * t + base[1]) % 256
        f[..., 2] = ((xx + yy) // 2 + base[2]) % 256
        cx, cy = (40 + 4 * t) % w, (30 + 2 * t) % h
        f[max(cy - 20, 0) : cy + 20, max(cx - 20, 0) : cx + 20] = (255, 255, 255)
        frames.append(f)
    write_video(path, frames, fps, crf=23)


def _decode_all(paths, sampling):
    f, s = sampling.max_frames, sampling.image_size
    for p in paths:
        frames, mask = decode_clip(p, sampling, threads=1)
        assert frames.shape == (f, s, s, 3)
    return len(paths)


def _cpu_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_decode(paths, repeats, workers, sampling):
    """(clips, wall seconds, CPU seconds). CPU time gives per-core speed on a busy machine."""
    paths = list(paths) * repeats
    t0 = time.perf_counter()
    if workers == 1:
        c0 = time.process_time()
        _decode_all(paths, sampling)
        cpu = time.process_time() - c0
    else:
        c0 = _cpu_children()
        pool = multiprocessing.get_context("spawn").Pool(workers)
        pool.starmap(_decode_all, [([p], sampling) for p in paths], chunksize=1)
        pool.close()
        pool.join()  # children's CPU time is accounted once they have been waited for
        cpu = _cpu_children() - c0
    return len(paths), time.perf_counter() - t0, cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_clips", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", default="1", help="comma-separated process counts to time")
    p.add_argument("--dir", default=None, help="where to write the clips (default: a temp dir)")
    a = p.parse_args(argv)
    sampling = FrameSampling.from_config(config_lib.base_config().data)
    tmp = a.dir or tempfile.mkdtemp(prefix="decode_bench_")
    raw, small = os.path.join(tmp, "raw"), os.path.join(tmp, "3fps")
    os.makedirs(raw, exist_ok=True)
    t0 = time.perf_counter()
    paths = []
    for i in range(a.num_clips):
        path = os.path.join(raw, f"clip{i}.mp4")
        if not os.path.exists(path):
            make_clip(path, i)
        paths.append(path)
    compress.compress_dir(raw, small, fps=3, size=224, workers=1, preset="veryfast", progress=False)
    small_paths = [os.path.join(small, f"clip{i}.mp4") for i in range(a.num_clips)]
    print(
        f"# clips ready in {time.perf_counter() - t0:.1f}s under {tmp}; "
        f"{os.cpu_count()} CPUs visible"
    )
    rows = []
    for name, ps in (("10 s 320x240 30 fps", paths), ("same, compressed 3 fps / 224", small_paths)):
        decode_clip(ps[0], sampling)  # warm-up (imports, codec init)
        for w in (int(x) for x in a.workers.split(",")):
            n, dt, cpu = time_decode(ps, a.repeats, w, sampling)
            rows.append((name, w, n, dt, cpu))
    print()
    print(
        "| input | processes | clips | wall s | clips/s (wall) | CPU s | clips per CPU-second (per core) | CPU ms/clip |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, w, n, dt, cpu in rows:
        print(
            f"| {name} | {w} | {n} | {dt:.2f} | {n / dt:.1f} | {cpu:.2f} | {n / cpu:.1f} | "
            f"{1000 * cpu / n:.0f} |"
        )
    print(
        f"\n(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: wall-clock rates "
        "are lower bounds on a busy machine; CPU-time rates are the per-core speed)"
    )
    fields = ", ".join(f"{k}={v}" for k, v in sampling.to_dict().items() if k != "jpeg_quality")
    print(f"\n(decode_clip: {fields}, 1 decoder thread per process)")


if __name__ == "__main__":
    main()
