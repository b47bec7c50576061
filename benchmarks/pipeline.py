"""Training-pipeline throughput on the synthetic dataset: batches/s (and clips/s, frames/s).

    python benchmarks/pipeline.py [--num_train 64 --frame_size 224 --max_frames F
                                   --image_size S --batch 16 --epochs 2 --workers N]

(--max_frames / --image_size default to base_config()'s data: the training sampling.)

Builds the synthetic MSR-VTT-format dataset into a temp dir (timed separately: that is the
decode cost), then iterates `VideoTextData.train_batches` for a few epochs. The first batch
of each epoch includes tf.data start-up, so it is reported apart from the steady rate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from configs import demo
from data_pipeline import build as build_lib
from data_pipeline import pipeline, synthetic
from data_pipeline.sampling import FrameSampling
from ucofia_jax import config as config_lib


def main(argv=None):
    base = config_lib.base_config().data
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_train", type=int, default=64)
    p.add_argument("--num_test", type=int, default=8)
    p.add_argument("--frame_size", type=int, default=224)
    p.add_argument("--max_frames", type=int, default=base.max_frames)
    p.add_argument("--image_size", type=int, default=base.image_size)
    p.add_argument("--max_words", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--expand_sentences", action="store_true")
    p.add_argument("--tmp", default=None, help="work dir (default: a fresh temp dir)")
    args = p.parse_args(argv)

    work = args.tmp or tempfile.mkdtemp(prefix="ucofia_bench_")
    raw, out = os.path.join(work, "raw"), os.path.join(work, "tfds")
    t = time.perf_counter()
    if not os.path.exists(os.path.join(raw, "MSRVTT_data.json")):  # --tmp reuse
        synthetic.make_synthetic_dataset(
            raw,
            num_train=args.num_train,
            num_test=args.num_test,
            frame_size=args.frame_size,
            seed=0,
        )
    t_synth = time.perf_counter() - t
    data_cfg = demo.get_config().data  # the config schema; the sampling below replaces its own
    data_cfg.update(
        dict(
            dataset="msrvtt",
            data_dir=out,
            max_words=args.max_words,
            max_frames=args.max_frames,
            image_size=args.image_size,
            expand_sentences=args.expand_sentences,
        )
    )
    t = time.perf_counter()
    summary = build_lib.build(
        "msrvtt",
        manual_dir=raw,
        data_dir=out,
        sampling=FrameSampling.from_config(data_cfg),
        workers=args.workers,
        progress=False,
        log=lambda *_: None,
    )
    t_build = time.perf_counter() - t
    clips = sum(summary["written"].values())
    build_rate = "reused" if summary["reused"] else f"{clips / t_build:.1f} clips/s"

    # This process imported TensorFlow with the pipeline; a fresh one shows what that costs.
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tensorflow"], check=True)
    t_tf = time.perf_counter() - t
    t = time.perf_counter()
    data = pipeline.VideoTextData(data_cfg, split="train", process_index=0, process_count=1)
    t_load = time.perf_counter() - t

    first, steady, steady_batches = [], 0.0, 0
    for epoch in range(args.epochs):
        t = time.perf_counter()
        it = data.train_batches(epoch=epoch, seed=0, global_batch=args.batch)
        next(it)
        first.append(time.perf_counter() - t)
        t = time.perf_counter()
        n = sum(1 for _ in it)
        steady += time.perf_counter() - t
        steady_batches += n

    bps = steady_batches / steady if steady > 0 else float("nan")
    rows = [
        ("cpus (os.cpu_count)", f"{os.cpu_count()}"),
        (
            "synthetic clips",
            f"{args.num_train} train + {args.num_test} test, {args.frame_size}px, 4 s at 6 fps",
        ),
        ("frames x size", f"{args.max_frames} x {args.image_size}px, batch {args.batch}"),
        ("synthesis", f"{t_synth:.1f} s"),
        ("build (decode+JPEG+write)", f"{t_build:.1f} s = {build_rate}"),
        ("import tensorflow (new process)", f"{t_tf:.1f} s"),
        ("tables + tokenise", f"{t_load:.2f} s"),
        ("first batch (mean/epoch)", f"{sum(first) / len(first):.2f} s"),
        ("steady batches", f"{steady_batches} in {steady:.2f} s"),
        ("batches/s", f"{bps:.2f}"),
        ("clips/s", f"{bps * args.batch:.1f}"),
        ("frames/s (JPEG decodes)", f"{bps * args.batch * args.max_frames:.0f}"),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"| {'measure'.ljust(w)} | value")
    print(f"|{'-' * (w + 2)}|------")
    for k, v in rows:
        print(f"| {k.ljust(w)} | {v}")


if __name__ == "__main__":
    main()
