"""Peak memory and time of one decode worker on a long video (``index``'s moments).

Writes a synthetic Matroska file (no declared frame count: the case that used to keep one
decoded frame per second) of each ``--seconds`` at ``--height`` p (16:9) and ``--fps``, then
runs the decode worker's work on it in a fresh process: ``decoding.decode_file`` (streaming
decode into windows of the sampling's ``max_frames / feature_framerate`` seconds, JPEG round
trip, thumbnail strips), and ``decode_clip`` of the whole file for comparison. Prints a table:
peak RSS (VmHWM) of that process, wall seconds, moments.

    python benchmarks/search_long_video.py --seconds 60 240 --height 480
    python benchmarks/search_long_video.py --seconds 3600 --height 1080   # the hour of 1080p

Generated files are kept in ``--dir`` (default /tmp/ucofia_long_video) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline import video as video_lib  # noqa: E402 -- after the repo is on the path

# The training sampling of the configs (ucofia_jax/config.py base_config().data).
SAMPLING = dict(
    max_frames=12, image_size=224, feature_framerate=1, slice_framepos=2, jpeg_quality=95
)

_WORKER = """
import json, sys, time
from data_pipeline import video
from data_pipeline.sampling import FrameSampling
from ucofia_jax.search import decoding
what, path, sampling = sys.argv[1], sys.argv[2], FrameSampling(**json.loads(sys.argv[3]))
t0 = time.time()
if what == "moments":
    window, stride = decoding.window_of(sampling, None, None)
    job = dict(path=path, rel="long.mkv", sampling=sampling, window=window, stride=stride)
    messages = [m["kind"] for m in decoding.decode_file(job)]
    assert messages[-1] == "done", messages[-1]
    count = messages.count("moment")
else:
    video.decode_clip(path, sampling)
    count = 1
with open("/proc/self/status") as f:
    hwm = int([line.split()[1] for line in f if line.startswith("VmHWM:")][0]) // 1024
print(json.dumps({"moments": count, "seconds": time.time() - t0, "peak_rss_mb": hwm}))
"""


def make_video(path: Path, seconds: int, height: int, fps: int) -> None:
    """A moving bright square on a gradient: cheap to encode at any size."""
    width = (height * 16 // 9) // 2 * 2
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8)
    side = max(height // 6, 2)

    def frames():
        for i in range(seconds * fps):
            img = base.copy()
            x = (i * 7) % (width - side)
            y = (i * 3) % (height - side)
            img[y : y + side, x : x + side] = (255, (i * 5) % 256, 40)
            yield img

    tmp = path.with_suffix(".part.mkv")
    video_lib.write_video(str(tmp), frames(), fps, options={"preset": "ultrafast"})
    os.replace(tmp, path)


def run_worker(what: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, what, str(path), json.dumps(SAMPLING)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, nargs="+", default=[60, 240])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=int, default=2)
    p.add_argument("--dir", default="/tmp/ucofia_long_video")
    a = p.parse_args(argv)
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for seconds in a.seconds:
        path = folder / f"long_{seconds}s_{a.height}p_{a.fps}fps.mkv"
        if not path.exists():
            t0 = time.time()
            make_video(path, seconds, a.height, a.fps)
            print(f"wrote {path} in {time.time() - t0:.0f} s", file=sys.stderr)
        for what in ("moments", "clip"):
            r = run_worker(what, path)
            rows.append(
                (seconds, a.height, a.fps, what, r["moments"], r["seconds"], r["peak_rss_mb"])
            )
    print(
        f"{'seconds':>8} {'height':>6} {'fps':>4} {'decode':>8} {'rows':>6} {'wall s':>8} {'peak RSS MB':>12}"
    )
    for seconds, height, fps, what, count, wall, rss in rows:
        print(f"{seconds:8d} {height:6d} {fps:4d} {what:>8} {count:6d} {wall:8.1f} {rss:12d}")


if __name__ == "__main__":
    main()
