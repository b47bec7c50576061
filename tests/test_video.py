"""PyAV decoding: the original sampling rule, resize/crop, padding + mask, and broken input."""

import fractions
import os
import re

import av
import numpy as np
import pytest
from PIL import Image

from data_pipeline import video
from data_pipeline.sampling import FrameSampling
from data_pipeline.video import VideoDecodeError
from ucofia_jax import config as config_lib
from ucofia_jax.errors import DataError

# The training sampling (base_config's data); a test changes only the fields it is about.
BASE = FrameSampling.from_config(config_lib.base_config().data)


def _sampling(**changes) -> FrameSampling:
    return BASE.replace(**changes)


# Expected indices worked out by hand from the rule (docs/data.md, SPEC section 11): integer
# fps; seconds 0 .. ceil(n / fps) (or start .. min(end, ceil(n / fps))), both ends inclusive;
# in each second the frames sec * fps + j * (fps // feature_framerate) for
# j < feature_framerate; indices past the last frame are dropped.
@pytest.mark.parametrize(
    "n,fps,start,end,ff,want",
    [
        # 10 s exactly: second 10 would be frame 300, one past the end.
        (300, 30, None, None, 1, list(range(0, 300, 30))),
        # ceil(299 / 30) = 10: the same ten frames, the last second is partial.
        (299, 30, None, None, 1, list(range(0, 300, 30))),
        # ceil(301 / 30) = 11: frame 300 exists and is taken.
        (301, 30, None, None, 1, list(range(0, 301, 30))),
        (45, 3, None, None, 1, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42]),
        # feature_framerate = fps: every frame.
        (45, 3, None, None, 3, list(range(45))),
        # Window 2..7 s, both ends included.
        (45, 3, 2, 7, 1, [6, 9, 12, 15, 18, 21]),
        # end beyond the file is clipped to ceil(45 / 3) = 15 s, whose frame 45 does not exist.
        (45, 3, 2, 100, 1, [6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42]),
        # 2 per second at 25 fps: offsets 0 and 25 // 2 = 12 within seconds 3, 4, 5.
        (250, 25, 3, 5, 2, [75, 87, 100, 112, 125, 137]),
        # A one-second file: second 1 would be frame 29, past the end.
        (29, 29, None, None, 1, [0]),
        # DiDeMo's 0..31 s window on a 10 s file.
        (100, 10, 0, 31, 1, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]),
        # interval 3 // 2 = 1: offsets 0, 1 of seconds 0, 1, 2 (frames 7 and up are past the end).
        (7, 3, None, None, 2, [0, 1, 3, 4, 6]),
        # interval 30 // 4 = 7: offsets 0, 7, 14, 21, not spread over the whole second.
        (60, 30, None, None, 4, [0, 7, 14, 21, 30, 37, 44, 51]),
    ],
)
def test_frame_indices_by_hand(n, fps, start, end, ff, want):
    got = video.frame_indices(n, fps, start=start, end=end, feature_framerate=ff)
    assert got.tolist() == want


# decode_clip refuses feature_framerate above the fps, so those pairs are left out.
@pytest.mark.parametrize(
    "fps,ff", [(f, r) for f in (1, 3, 10, 25, 29, 30) for r in (1, 2, 3) if r <= f]
)
def test_frame_indices_properties(fps, ff):
    interval = fps // ff
    for n in [fps, fps + 1, 2 * fps - 1, 7 * fps, 7 * fps + fps // 2]:
        got = video.frame_indices(n, fps, feature_framerate=ff).tolist()
        assert got == sorted(set(got)) and got[0] == 0 and got[-1] < n
        # Every second the file touches (the partial last one too) gives its first `ff`
        # offsets on the `interval` grid, as many as fit before the end.
        seconds = -(-n // fps)
        assert sorted({i // fps for i in got}) == list(range(seconds))
        for s in range(seconds):
            offsets = [i % fps for i in got if i // fps == s]
            fit = [j * interval for j in range(ff) if s * fps + j * interval < n]
            assert offsets == fit, (n, s)
        if ff == 1:
            assert len(got) == seconds
        # A window keeps exactly the frames of its seconds, its first frame at start * fps.
        win = video.frame_indices(n, fps, start=1, end=3, feature_framerate=ff).tolist()
        assert win == [i for i in got if 1 <= i // fps <= 3]
        assert win[:1] == ([fps] if n > fps else [])


def test_subsample_slice_framepos():
    # No more frames than max_frames: all of them, whatever slice_framepos.
    for pos in (0, 1, 2):
        assert video.subsample(5, 12, pos).tolist() == [0, 1, 2, 3, 4]
        assert video.subsample(12, 12, pos).tolist() == list(range(12))
    assert video.subsample(20, 4, 0).tolist() == [0, 1, 2, 3]  # head
    assert video.subsample(20, 4, 1).tolist() == [16, 17, 18, 19]  # tail
    # Uniform: position k at k * (n - 1) / (max_frames - 1), truncated.
    assert video.subsample(20, 4, 2).tolist() == [0, 6, 12, 19]  # 0, 6.33, 12.67, 19
    assert video.subsample(10, 4, 2).tolist() == [0, 3, 6, 9]
    assert video.subsample(11, 4, 2).tolist() == [0, 3, 6, 10]  # 3.33, 6.67: truncated
    # 13 frames to 12: step 12 / 11, only frame 11 falls out.
    assert video.subsample(13, 12, 2).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
    assert video.subsample(16, 12, 2).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 15]
    with pytest.raises(ValueError):
        video.subsample(20, 4, 3)


def test_subsample_properties():
    for m in (2, 3, 4, 12, 15):
        for n in range(m + 1, 200):
            head, tail = video.subsample(n, m, 0).tolist(), video.subsample(n, m, 1).tolist()
            assert head == list(range(m)) and tail == list(range(n - m, n))
            got = video.subsample(n, m, 2).tolist()
            assert len(got) == m and got[0] == 0 and got[-1] == n - 1
            assert all(a < b for a, b in zip(got, got[1:]))
            for k, i in enumerate(got):
                ideal = k * (n - 1) / (m - 1)
                # Truncation of the evenly spaced position. The original's float np.linspace
                # can land just below a whole position (n = 123, m = 15, k = 7:
                # 60.99999999999999 -> 60), hence one frame of slack below.
                assert ideal - 1 - 1e-9 <= i <= ideal + 1e-9, (n, m, k)
    assert video.subsample(123, 15, 2).tolist()[7] == 60


def _gray_video(path, num_frames, fps, size=(48, 32), step=7):
    """Frame i is flat gray (i * step) % 256 so decoded frames identify their index."""
    w, h = size
    frames = [np.full((h, w, 3), (i * step) % 256, np.uint8) for i in range(num_frames)]
    return video.write_video(str(path), frames, fps, crf=0)


def _frame_ids(frames, mask, step=7):
    return [int(round(float(f.mean()) / step)) for f, m in zip(frames, mask) if m]


def test_decode_samples_pads_and_masks(tmp_path):
    p = _gray_video(tmp_path / "v.mp4", 35, 10)  # 3.5 s at 10 fps -> frames 0, 10, 20, 30
    frames, mask = video.decode_clip(p, _sampling(max_frames=6, image_size=16))
    assert frames.shape == (6, 16, 16, 3) and frames.dtype == np.uint8
    assert mask.dtype == np.int32
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
    assert _frame_ids(frames, mask) == [0, 10, 20, 30]
    assert not frames[4:].any()  # padding is zeros, flagged by the mask


def test_decode_linspace_head_tail_and_window(tmp_path):
    p = _gray_video(tmp_path / "v.mp4", 35, 10)
    # 4 taken -> linspace [0, 1, 3]
    f, m = video.decode_clip(p, _sampling(max_frames=3, image_size=8, slice_framepos=2))
    assert _frame_ids(f, m) == [0, 10, 30]
    f, m = video.decode_clip(p, _sampling(max_frames=3, image_size=8, slice_framepos=0))
    assert _frame_ids(f, m) == [0, 10, 20]
    f, m = video.decode_clip(p, _sampling(max_frames=3, image_size=8, slice_framepos=1))
    assert _frame_ids(f, m) == [10, 20, 30]
    f, m = video.decode_clip(p, _sampling(max_frames=4, image_size=8), start=1, end=2)
    assert _frame_ids(f, m) == [10, 20]
    f, m = video.decode_clip(p, _sampling(max_frames=4, image_size=8, feature_framerate=2))
    assert _frame_ids(f, m) == list(np.array([0, 5, 10, 15, 20, 25, 30])[[0, 2, 4, 6]])


def test_resize_shorter_side_bicubic_then_center_crop():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (30, 71, 3), dtype=np.uint8))  # h=30, w=71
    got = video.resize_center_crop(img, 20)
    # torchvision Resize(20): short side 20, long int(20 * 71 / 30) = 47; CenterCrop(20):
    # top = round((20 - 20) / 2) = 0, left = round((47 - 20) / 2) = round(13.5) = 14 (half-even).
    ref = np.asarray(img.resize((47, 20), Image.BICUBIC))[0:20, 14:34]
    np.testing.assert_array_equal(got, ref)
    tall = Image.fromarray(rng.integers(0, 255, (50, 24, 3), dtype=np.uint8))
    ref = np.asarray(tall.resize((16, 33), Image.BICUBIC))[8:24, 0:16]  # round(8.5) = 8
    np.testing.assert_array_equal(video.resize_center_crop(tall, 16), ref)


def test_decode_crop_keeps_the_centre(tmp_path):
    # Left third red, middle green, right third blue: the centre crop of a wide frame is green.
    frame = np.zeros((32, 96, 3), np.uint8)
    frame[:, :32, 0] = 255
    frame[:, 32:64, 1] = 255
    frame[:, 64:, 2] = 255
    p = video.write_video(str(tmp_path / "c.mp4"), [frame] * 10, 10, crf=0)
    f, m = video.decode_clip(p, _sampling(max_frames=2, image_size=16))
    centre = f[0].reshape(-1, 3).mean(0)
    assert centre[1] > 200 and centre[0] < 40 and centre[2] < 40


def test_missing_file(tmp_path):
    with pytest.raises(VideoDecodeError, match="missing file") as e:
        video.decode_clip(str(tmp_path / "nope.mp4"), BASE)
    assert isinstance(e.value, DataError) and e.value.reason == "missing file"


def test_zero_length_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty file"):
        video.decode_clip(str(p), BASE)


def test_garbage_file(tmp_path):
    p = tmp_path / "junk.mp4"
    p.write_bytes(os.urandom(4096))
    # FFmpeg's probing may take random bytes for a raw stream of a frame or two; whatever it
    # makes of them, the result must be an error, not frames.
    with pytest.raises(VideoDecodeError):
        video.decode_clip(str(p), BASE)


def test_truncated_file_moov_at_end(tmp_path):
    p = _gray_video(tmp_path / "t.mp4", 40, 10)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError) as e:
        video.decode_clip(p, BASE)
    assert e.value.reason == "unreadable container"


def test_truncated_file_moov_at_front(tmp_path):
    # faststart puts the index first: FFmpeg opens the file, so truncation must be caught by
    # counting frames against the declared count.
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(40)]
    p = video.write_video(
        str(tmp_path / "f.mp4"), frames, 10, container_options={"movflags": "faststart"}
    )
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError) as e:
        video.decode_clip(p, BASE)
    assert e.value.reason in ("truncated", "corrupt stream")


def test_shorter_than_one_second(tmp_path):
    p = _gray_video(tmp_path / "short.mp4", 9, 10)  # 0.9 s
    with pytest.raises(VideoDecodeError, match="shorter than one second"):
        video.decode_clip(p, BASE)
    p = _gray_video(tmp_path / "one.mp4", 10, 10)  # exactly 1 s is fine
    _, m = video.decode_clip(p, BASE)
    assert m.sum() == 1


def test_empty_window(tmp_path):
    p = _gray_video(tmp_path / "v.mp4", 20, 10)
    with pytest.raises(VideoDecodeError, match="empty window"):
        video.decode_clip(p, BASE, start=5, end=8)
    with pytest.raises(VideoDecodeError, match="empty window"):
        video.decode_clip(p, BASE, start=2, end=1)


def test_find_video_extensions(tmp_path):
    (tmp_path / "a.webm").write_bytes(b"x")
    (tmp_path / "b.mp4").write_bytes(b"x")
    assert video.find_video(str(tmp_path), "a").endswith("a.webm")
    assert video.find_video(str(tmp_path), "b").endswith("b.mp4")
    assert video.find_video(str(tmp_path), "c") is None


def test_ntsc_rate_truncates_to_integer_fps(tmp_path):
    # 29.97 fps -> fps 29 as OpenCV's int(CAP_PROP_FPS): frames 0, 29, 58 of 70.
    p = str(tmp_path / "ntsc.mp4")
    with av.open(p, mode="w") as out:
        s = out.add_stream("libx264", rate=fractions.Fraction(30000, 1001), options={"crf": "0"})
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        for i in range(70):
            img = np.full((16, 16, 3), (i * 3) % 256, np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    f, m = video.decode_clip(p, _sampling(max_frames=4, image_size=8))
    assert _frame_ids(f, m, step=3) == [0, 29, 58]


def _spy_decode_passes(monkeypatch) -> list:
    """The sorted frame indices each decoder pass keeps, appended as ``decode_clip`` runs."""
    passes = []
    real_pass = video._decode_pass

    def spy_pass(*args):
        out = real_pass(*args)
        passes.append(sorted(out[2]))
        return out

    monkeypatch.setattr(video, "_decode_pass", spy_pass)
    return passes


def test_keeps_only_predicted_frames_and_repairs_a_wrong_prediction(tmp_path, monkeypatch):
    p = _gray_video(tmp_path / "v.mp4", 35, 10)
    passes = _spy_decode_passes(monkeypatch)
    real_final = video._final_indices
    f, m = video.decode_clip(p, _sampling(max_frames=3, image_size=8))
    assert _frame_ids(f, m) == [0, 10, 30] and passes == [[0, 10, 30]]  # not every candidate

    # A container whose declared count is wrong: the prediction misses, a second pass fixes it.
    calls = []

    def wrong_first_prediction(n, *args):
        calls.append(n)
        return real_final(n - 12 if len(calls) == 1 else n, *args)

    monkeypatch.setattr(video, "_final_indices", wrong_first_prediction)
    passes.clear()
    f, m = video.decode_clip(p, _sampling(max_frames=3, image_size=8))
    assert _frame_ids(f, m) == [0, 10, 30] and len(passes) == 2


@pytest.mark.parametrize("ext,codec", [(".mkv", "libx264"), (".webm", "libvpx")])
def test_truncated_matroska_is_rejected(tmp_path, ext, codec):
    """Matroska/WebM declare no frame count, but their header keeps the full duration: a file
    cut at 50% (10 s declared, ~5 s decodable) is refused; the whole file decodes."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(50)]
    p = video.write_video(str(tmp_path / f"whole{ext}"), frames, 5, codec=codec)
    with av.open(p) as c:  # the premise: no declared count, a declared duration
        assert int(c.streams.video[0].frames or 0) == 0 and c.duration
    _, m = video.decode_clip(p, _sampling(max_frames=12, image_size=16))
    assert m.sum() == 10  # seconds 0..10 at 1 fps; second 10 (frame 50) is past the end
    cut = str(tmp_path / f"cut{ext}")
    data = open(p, "rb").read()
    open(cut, "wb").write(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError) as e:
        video.decode_clip(cut, _sampling(max_frames=12, image_size=16))
    assert e.value.reason == "truncated", e.value
    assert re.search(r"decoded [45]\.\d+ s of the 10\.00 s", str(e.value)), e.value
    # An explicit window that ends early never reaches the end: no duration verdict there.
    _, m = video.decode_clip(cut, _sampling(max_frames=12, image_size=16), start=0, end=2)
    assert m.sum() == 3


@pytest.mark.parametrize("declares_duration", [True, False])
def test_matroska_keeps_only_predicted_frames(tmp_path, monkeypatch, declares_duration):
    """No declared frame count: the count is predicted from the declared duration, or
    without one from a demux-only packet count; only the predicted frames are kept (the
    decoder used to keep one frame per second of video)."""
    p = _gray_video(tmp_path / "v.mkv", 200, 10, step=1)  # 20 s at 10 fps
    with av.open(p) as c:
        assert int(c.streams.video[0].frames or 0) == 0
    if not declares_duration:
        monkeypatch.setattr(video, "_declared_duration", lambda container, stream: None)
    passes = _spy_decode_passes(monkeypatch)
    f, m = video.decode_clip(p, _sampling(max_frames=4, image_size=8))
    # Seconds 0..20 at 1 fps: frames 0, 10, ..., 190 (200 is past the end); linspace keeps 4.
    want = [0, 60, 120, 190]
    assert passes == [want]  # one pass, keeping exactly the frames sampled
    # Gray levels come back within 1 of the frame index (YUV rounding at step 1).
    assert np.abs(np.asarray(_frame_ids(f, m, step=1)) - want).max() <= 1
