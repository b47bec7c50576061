"""PyAV decoding: the original sampling rule, resize/crop, padding + mask, and broken input."""

import os

import numpy as np
import pytest
from PIL import Image

from data_pipeline import video
from data_pipeline.records import DataError
from data_pipeline.video import VideoDecodeError


def original_indices(frame_count, fps, start_time=None, end_time=None, sample_fp=1):
    """rawvideo_util.video_to_tensor's loop, restated (its cap.read() fails past the end)."""
    total_duration = (frame_count + fps - 1) // fps
    start_sec, end_sec = 0, total_duration
    if start_time is not None:
        start_sec, end_sec = start_time, end_time if end_time <= total_duration else total_duration
    interval = fps // sample_fp if sample_fp > 0 else 1
    if sample_fp <= 0:
        sample_fp = fps
    if interval == 0:
        interval = 1
    inds = [ind for ind in np.arange(0, fps, interval)][:sample_fp]
    out, ret = [], True
    for sec in np.arange(start_sec, end_sec + 1):
        if not ret:
            break
        sec_base = int(sec * fps)
        for ind in inds:
            if sec_base + ind >= frame_count:  # cap.read() returns False
                ret = False
                break
            out.append(sec_base + ind)
    return out


@pytest.mark.parametrize(
    "n,fps,start,end,ff",
    [
        (300, 30, None, None, 1),
        (299, 30, None, None, 1),
        (301, 30, None, None, 1),
        (45, 3, None, None, 1),
        (45, 3, None, None, 3),
        (45, 3, 2, 7, 1),
        (45, 3, 2, 100, 1),
        (250, 25, 3, 5, 2),
        (29, 29, None, None, 1),
        (100, 10, 0, 31, 1),
        (7, 3, None, None, 2),
    ],
)
def test_frame_indices_match_original(n, fps, start, end, ff):
    got = video.frame_indices(n, fps, start=start, end=end, feature_framerate=ff)
    np.testing.assert_array_equal(got, original_indices(n, fps, start, end, ff))


def test_subsample_slice_framepos():
    np.testing.assert_array_equal(video.subsample(5, 12, 2), np.arange(5))
    np.testing.assert_array_equal(video.subsample(20, 4, 0), [0, 1, 2, 3])
    np.testing.assert_array_equal(video.subsample(20, 4, 1), [16, 17, 18, 19])
    np.testing.assert_array_equal(video.subsample(20, 4, 2), np.linspace(0, 19, 4, dtype=int))
    with pytest.raises(ValueError):
        video.subsample(20, 4, 3)


def _gray_video(path, num_frames, fps, size=(48, 32), step=7):
    """Frame i is flat gray (i * step) % 256 so decoded frames identify their index."""
    w, h = size
    frames = [np.full((h, w, 3), (i * step) % 256, np.uint8) for i in range(num_frames)]
    return video.write_video(str(path), frames, fps, crf=0)


def _frame_ids(frames, mask, step=7):
    return [int(round(float(f.mean()) / step)) for f, m in zip(frames, mask) if m]


def test_decode_samples_pads_and_masks(tmp_path):
    p = _gray_video(tmp_path / "v.mp4", 35, 10)  # 3.5 s at 10 fps -> frames 0, 10, 20, 30
    frames, mask = video.decode_clip(p, max_frames=6, image_size=16)
    assert frames.shape == (6, 16, 16, 3) and frames.dtype == np.uint8
    assert mask.dtype == np.int32
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
    assert _frame_ids(frames, mask) == [0, 10, 20, 30]
    assert not frames[4:].any()  # padding is zeros, flagged by the mask


def test_decode_linspace_head_tail_and_window(tmp_path):
    p = _gray_video(tmp_path / "v.mp4", 35, 10)
    f, m = video.decode_clip(p, max_frames=3, image_size=8)  # 4 taken -> linspace [0, 1, 3]
    assert _frame_ids(f, m) == [0, 10, 30]
    f, m = video.decode_clip(p, max_frames=3, image_size=8, slice_framepos=0)
    assert _frame_ids(f, m) == [0, 10, 20]
    f, m = video.decode_clip(p, max_frames=3, image_size=8, slice_framepos=1)
    assert _frame_ids(f, m) == [10, 20, 30]
    f, m = video.decode_clip(p, max_frames=4, image_size=8, start=1, end=2)
    assert _frame_ids(f, m) == [10, 20]
    f, m = video.decode_clip(p, max_frames=4, image_size=8, feature_framerate=2)
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
    f, m = video.decode_clip(p, max_frames=2, image_size=16)
    centre = f[0].reshape(-1, 3).mean(0)
    assert centre[1] > 200 and centre[0] < 40 and centre[2] < 40


def test_missing_file(tmp_path):
    with pytest.raises(VideoDecodeError, match="missing file") as e:
        video.decode_clip(str(tmp_path / "nope.mp4"))
    assert isinstance(e.value, DataError) and e.value.reason == "missing file"


def test_zero_length_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty file"):
        video.decode_clip(str(p))


def test_garbage_file(tmp_path):
    p = tmp_path / "junk.mp4"
    p.write_bytes(os.urandom(4096))
    # FFmpeg's probing may take random bytes for a raw stream of a frame or two; whatever it
    # makes of them, the result must be an error, not frames.
    with pytest.raises(VideoDecodeError):
        video.decode_clip(str(p))


def test_truncated_file_moov_at_end(tmp_path):
    p = _gray_video(tmp_path / "t.mp4", 40, 10)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError) as e:
        video.decode_clip(p)
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
        video.decode_clip(p)
    assert e.value.reason in ("truncated", "corrupt stream")


def test_shorter_than_one_second(tmp_path):
    p = _gray_video(tmp_path / "short.mp4", 9, 10)  # 0.9 s
    with pytest.raises(VideoDecodeError, match="shorter than one second"):
        video.decode_clip(p)
    p = _gray_video(tmp_path / "one.mp4", 10, 10)  # exactly 1 s is fine
    _, m = video.decode_clip(p)
    assert m.sum() == 1


def test_empty_window(tmp_path):
    p = _gray_video(tmp_path / "v.mp4", 20, 10)
    with pytest.raises(VideoDecodeError, match="empty window"):
        video.decode_clip(p, start=5, end=8)
    with pytest.raises(VideoDecodeError, match="empty window"):
        video.decode_clip(p, start=2, end=1)


def test_find_video_extensions(tmp_path):
    (tmp_path / "a.webm").write_bytes(b"x")
    (tmp_path / "b.mp4").write_bytes(b"x")
    assert video.find_video(str(tmp_path), "a").endswith("a.webm")
    assert video.find_video(str(tmp_path), "b").endswith("b.mp4")
    assert video.find_video(str(tmp_path), "c") is None


def test_ntsc_rate_truncates_to_integer_fps(tmp_path):
    # 29.97 fps -> fps 29 as OpenCV's int(CAP_PROP_FPS): frames 0, 29, 58 of 70.
    import fractions

    import av

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
    f, m = video.decode_clip(p, max_frames=4, image_size=8)
    assert _frame_ids(f, m, step=3) == [0, 29, 58]


def test_keeps_only_predicted_frames_and_repairs_a_wrong_prediction(tmp_path, monkeypatch):
    p = _gray_video(tmp_path / "v.mp4", 35, 10)
    passes = []
    real_pass, real_final = video._decode_pass, video._final_indices

    def spy_pass(*args):
        out = real_pass(*args)
        passes.append(sorted(out[2]))
        return out

    monkeypatch.setattr(video, "_decode_pass", spy_pass)
    f, m = video.decode_clip(p, max_frames=3, image_size=8)
    assert _frame_ids(f, m) == [0, 10, 30] and passes == [[0, 10, 30]]  # not every candidate

    # A container whose declared count is wrong: the prediction misses, a second pass fixes it.
    calls = []

    def wrong_first_prediction(n, *args):
        calls.append(n)
        return real_final(n - 12 if len(calls) == 1 else n, *args)

    monkeypatch.setattr(video, "_final_indices", wrong_first_prediction)
    passes.clear()
    f, m = video.decode_clip(p, max_frames=3, image_size=8)
    assert _frame_ids(f, m) == [0, 10, 30] and len(passes) == 2
