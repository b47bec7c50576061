"""Compression tool: output rate/size, mirrored layout, resumability, failures reported."""

import os

import av
import numpy as np
import pytest

from data_pipeline import compress
from data_pipeline.sampling import FrameSampling
from data_pipeline.video import decode_clip, write_video
from ucofia_jax import config as config_lib


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "in"
    (d / "movie").mkdir(parents=True)
    frames = [np.full((60, 80, 3), i * 4, np.uint8) for i in range(60)]  # 2 s at 30 fps
    write_video(str(d / "wide.mp4"), frames, 30)
    write_video(str(d / "movie" / "tall.mkv"), [f.transpose(1, 0, 2) for f in frames], 30)
    (d / "broken.avi").write_bytes(b"\x00junk" * 50)
    (d / "notes.txt").write_text("not a video")
    return d


def _info(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return int(s.average_rate), s.codec_context.width, s.codec_context.height, n


def test_output_fps_size_and_layout(raw, tmp_path):
    out = tmp_path / "out"
    r = compress.compress_dir(str(raw), str(out), fps=3, size=32, workers=2, progress=False)
    assert (
        len(r["done"]) == 2 and len(r["failed"]) == 1 and r["failed"][0][0].endswith("broken.avi")
    )
    assert _info(out / "wide.mp4") == (3, 42, 32, 6)  # 80x60 -> shorter 32, longer int(42.67) even
    assert _info(out / "movie" / "tall.mp4") == (3, 32, 42, 6)
    assert "broken.avi" in (out / "compress_failures.txt").read_text()
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".partial")]
    # Frames at whole seconds are the input frames at whole seconds (value 4 * index).
    sampling = FrameSampling.from_config(config_lib.base_config().data)
    frames, mask = decode_clip(str(out / "wide.mp4"), sampling.replace(max_frames=4, image_size=16))
    assert mask.tolist() == [1, 1, 0, 0]
    assert abs(int(frames[1].mean()) - 120) <= 3


def test_resumable(raw, tmp_path):
    out = tmp_path / "out"
    # A killed run leaves at most a hidden .partial file, which is neither an output nor an input.
    (out).mkdir()
    (out / ".wide.mp4.partial").write_bytes(b"half")
    r = compress.compress_dir(str(raw), str(out), size=32, workers=1, progress=False)
    assert sorted(os.path.basename(s) for s, _ in r["done"]) == ["tall.mkv", "wide.mp4"]
    assert not (out / ".wide.mp4.partial").exists()
    mtime = os.path.getmtime(out / "wide.mp4")
    os.remove(out / "movie" / "tall.mp4")
    r = compress.compress_dir(str(raw), str(out), size=32, workers=1, progress=False)
    assert [os.path.basename(s) for s, _ in r["skipped"]] == ["wide.mp4"]
    assert [os.path.basename(s) for s, _ in r["done"]] == ["tall.mkv"]
    assert os.path.getmtime(out / "wide.mp4") == mtime


def test_cli_exit_status(raw, tmp_path, capsys):
    rc = compress.main(
        [
            "--input_dir",
            str(raw),
            "--output_dir",
            str(tmp_path / "o"),
            "--size",
            "32",
            "--workers",
            "1",
            "--preset",
            "veryfast",
        ]
    )
    assert rc == 1  # broken.avi failed
    assert "failed 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="must differ"):
        compress.compress_dir(str(raw), str(raw))
    assert compress.output_size(320, 240, 224) == (298, 224)
    assert compress.output_size(240, 320, 224) == (224, 298)
