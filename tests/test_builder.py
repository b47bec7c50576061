"""TFDS builder + build CLI on the synthetic MSR-VTT-format dataset (12 train / 6 test clips).

One training video is corrupted and one test video deleted, so every build below also checks
that bad input is skipped, counted and named in the report.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import build as build_lib
from data_pipeline import builder as builder_lib
from data_pipeline import datasets, synthetic
from data_pipeline import video as video_lib
from data_pipeline.records import DataError
from data_pipeline.sampling import FrameSampling
from ucofia_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F, S = 4, 32
BASE = FrameSampling.from_config(config_lib.base_config().data)
SAMPLING = BASE.replace(max_frames=F, image_size=S)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    synthetic.make_synthetic_dataset(root, num_train=12, num_test=6, frame_size=32, seed=0)
    # video1 (train): garbage bytes with an mp4 name; video13 (test): missing file.
    with open(os.path.join(root, "videos", "video1.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    os.remove(os.path.join(root, "videos", "video13.mp4"))
    return root


def _read_split(data_dir, split):
    b = builder_lib.get_builder("msrvtt", data_dir=data_dir, sampling=SAMPLING)
    assert b.is_prepared()
    src = b.as_data_source(split)
    out = []
    for i in range(len(src)):
        e = dict(src[i])
        e["frames"] = np.stack(e["frames"])  # numpy decoding gives a list for a Sequence
        out.append(e)
    return out


@pytest.mark.slow
def test_cli_builds_reads_back_and_reports(raw, tmp_path):
    out = str(tmp_path / "tfds")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.build",
            "--dataset=msrvtt",
            f"--manual_dir={raw}",
            f"--data_dir={out}",
            f"--max_frames={F}",
            f"--image_size={S}",
            "--workers=2",
            "--no_progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 16 clips (train 11, test 5)" in proc.stdout, proc.stdout
    assert "skipped: 2" in proc.stdout

    root = os.path.join(out, builder_lib.BUILDER_NAME, "msrvtt_f4_s32")
    with open(os.path.join(root, "skip_report.json")) as f:
        report = json.load(f)
    files = {os.path.basename(e["file"]): e["reason"] for e in report["entries"]}
    assert set(files) == {"video1.mp4", "video13"}, files
    assert files["video13"] == "missing video"
    # The decode cache is removed after a successful build.
    assert not os.path.exists(os.path.join(out, builder_lib.CACHE_DIRNAME, "msrvtt_f4_s32"))

    train = _read_split(out, "train")
    test = _read_split(out, "test")
    assert len(train) == 11 and len(test) == 5
    ids = [e["video_id"].decode() for e in train]
    assert len(set(ids)) == 11 and "video1" not in ids
    # Stored frames are decode_clip's output after JPEG (quality 95): close, not bit-exact.
    with open(os.path.join(raw, "MSRVTT_data.json")) as f:
        sentences = json.load(f)["sentences"]
    for e in train[:4]:
        vid = e["video_id"].decode()
        frames, mask = video_lib.decode_clip(os.path.join(raw, "videos", vid + ".mp4"), SAMPLING)
        assert e["frames"].shape == (F, S, S, 3) and e["frames"].dtype == np.uint8
        np.testing.assert_array_equal(e["frame_mask"], mask)
        diff = np.abs(e["frames"].astype(np.int32) - frames.astype(np.int32))
        assert diff.mean() < 3.0 and np.percentile(diff, 99) < 40, (diff.mean(), diff.max())
        caps = [c.decode() for c in e["captions"]]
        assert caps == [s["caption"] for s in sentences if s["video_id"] == vid]
        assert e["start"] == -1 and e["end"] == -1
    # Test split: one JSFusion sentence per video.
    assert all(len(e["captions"]) == 1 for e in test)


def test_missing_annotation_files_are_named(tmp_path, capsys):
    manual = tmp_path / "raw"
    manual.mkdir()
    (manual / "MSRVTT_data.json").write_text("{}")
    rc = build_lib.main(
        [
            "--dataset=msrvtt",
            f"--manual_dir={manual}",
            f"--data_dir={tmp_path / 'out'}",
            "--no_progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert str(manual / "MSRVTT_train.9k.csv") in err
    assert str(manual / "MSRVTT_JSFUSION_test.csv") in err
    assert "videos/" in err and "--video_dir" in err
    assert "MSRVTT_data.json" not in err.split("Expected layout")[0]  # present: not listed


def test_strict_fails_on_bad_video_and_leaves_nothing(raw, tmp_path):
    out = str(tmp_path / "tfds")

    def strict_build(manual_dir):
        build_lib.build(
            "msrvtt",
            manual_dir=manual_dir,
            data_dir=out,
            strict=True,
            workers=0,
            progress=False,
            log=lambda *_: None,
            sampling=SAMPLING,
        )

    # The missing test video is found while the annotations are read: listed before any
    # video is decoded (the corrupt video1 is not reached).
    with pytest.raises(DataError) as info:
        strict_build(raw)
    msg = str(info.value)
    assert msg.startswith("--strict: 1 problem(s) in the annotations of msrvtt"), msg
    assert f"{os.path.join(raw, 'videos', 'video13')}: missing video" in msg, msg
    # With it back, the corrupt training video fails its decode: listed at the split's end.
    raw2 = str(tmp_path / "raw2")
    shutil.copytree(raw, raw2)
    shutil.copy(
        os.path.join(raw2, "videos", "video2.mp4"), os.path.join(raw2, "videos", "video13.mp4")
    )
    with pytest.raises(DataError) as info:
        strict_build(raw2)
    msg = str(info.value)
    assert msg.startswith("--strict: 1 problem(s) in the videos of msrvtt train"), msg
    assert os.path.join(raw2, "videos", "video1.mp4") in msg, msg
    b = builder_lib.get_builder("msrvtt", data_dir=out, sampling=SAMPLING)
    assert not b.is_prepared()
    leftovers = os.listdir(b.dataset_root) if os.path.isdir(b.dataset_root) else []
    assert not [n for n in leftovers if n.startswith(("1.0.0", "incomplete."))], leftovers


_KILL_SCRIPT = """
import os, signal, sys
from data_pipeline import build, video
real, n = video.decode_clip, [0]
def decode(path, *args, **kw):
  n[0] += 1
  if n[0] == int(sys.argv[3]):
    os.kill(os.getpid(), signal.SIGKILL)  # as a pre-empted machine or the OOM killer would
  return real(path, *args, **kw)
video.decode_clip = decode
sampling = build.default_sampling("msrvtt").replace(max_frames=4, image_size=32)
build.build("msrvtt", manual_dir=sys.argv[1], data_dir=sys.argv[2], sampling=sampling,
            workers=0, progress=False)
"""


def test_killed_build_resumes_without_duplicates(raw, tmp_path, monkeypatch):
    out = str(tmp_path / "tfds")
    # 1) SIGKILL during the 8th decode: TFDS's temp dir and the decode cache stay behind.
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, raw, out, "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    b = builder_lib.get_builder("msrvtt", data_dir=out, sampling=SAMPLING)
    assert not b.is_prepared()
    stale = [n for n in os.listdir(b.dataset_root) if n.startswith("incomplete.")]
    assert len(stale) == 1, os.listdir(b.dataset_root)
    cached = [f for _, _, fs in os.walk(b.default_cache_dir()) for f in fs]
    assert len(cached) == 6  # 7 decodes finished, one of them the corrupt video1

    calls = []
    real_decode = video_lib.decode_clip

    def counting_decode(path, *args, **kw):
        calls.append(os.path.basename(path))
        return real_decode(path, *args, **kw)

    monkeypatch.setattr(video_lib, "decode_clip", counting_decode)
    quiet = dict(workers=0, progress=False, log=lambda *_: None, sampling=SAMPLING)
    # 2) An exception after 3 written clips: TFDS removes its own temp dir.
    with pytest.raises(RuntimeError, match="simulated interruption"):
        build_lib.build("msrvtt", manual_dir=raw, data_dir=out, fail_after=3, **quiet)
    assert not b.is_prepared()
    assert calls == ["video1.mp4"]  # only the failure is retried; the rest come from the cache

    # 3) The rebuild: stale dir gone, every clip exactly once, cached clips not decoded again.
    calls.clear()
    summary = build_lib.build("msrvtt", manual_dir=raw, data_dir=out, **quiet)
    assert summary["written"] == {"train": 11, "test": 5}
    assert not [n for n in os.listdir(b.dataset_root) if n.startswith("incomplete.")]
    assert len(calls) == 16 + 1 - 6, calls  # 16 good clips + video1, minus the 6 cached
    for split, n in (("train", 11), ("test", 5)):
        ids = [e["video_id"].decode() for e in _read_split(out, split)]
        assert len(ids) == n and len(set(ids)) == n
    assert not os.path.exists(b.default_cache_dir())

    # 4) Building again reuses the finished dataset.
    again = build_lib.build("msrvtt", manual_dir=raw, data_dir=out, **quiet)
    assert again["reused"] and again["written"] == {"train": 11, "test": 5}


def test_config_names_and_instructions():
    # The names of datasets built before FrameSampling: unchanged.
    assert builder_lib.config_name("msrvtt", BASE) == "msrvtt_f12_s224"
    assert builder_lib.config_name("msrvtt", SAMPLING) == "msrvtt_f4_s32"
    didemo = build_lib.default_sampling("didemo")
    assert builder_lib.config_name("didemo", didemo) == "didemo_f64_s224"
    assert (
        builder_lib.config_name(
            "msvd", BASE.replace(max_frames=8, image_size=112, slice_framepos=0)
        )
        == "msvd_f8_s112_pos0"
    )
    # Every field that changes the stored frames is in the name.
    assert (
        builder_lib.config_name("msvd", BASE.replace(feature_framerate=2)) == "msvd_f12_s224_fps2"
    )
    assert builder_lib.config_name("msvd", BASE.replace(jpeg_quality=90)) == "msvd_f12_s224_q90"
    # One list of datasets, in this order: the readers, the builder and the CLI agree.
    assert builder_lib.DATASETS == ("msrvtt", "msvd", "lsmdc", "activitynet", "didemo", "vatex")
    assert tuple(datasets.READERS) == tuple(datasets.SPLITS) == builder_lib.DATASETS
    dataset_flag = next(a for a in build_lib._parser()._actions if a.dest == "dataset")
    assert tuple(dataset_flag.choices) == builder_lib.DATASETS
    text = builder_lib.UcofiaVideoText.MANUAL_DOWNLOAD_INSTRUCTIONS
    for name in builder_lib.DATASETS:
        assert f"{name}:" in text
        for f in builder_lib.required_files(name):
            assert f in text
    with pytest.raises(ValueError, match="unknown dataset"):
        builder_lib.config_name("kinetics", BASE)


def test_didemo_paragraphs_and_clip_window(tmp_path):
    """A paragraph-to-video dataset: one record per video, 0-31 s window clipped to the file."""
    raw = str(tmp_path / "didemo")
    synth = str(tmp_path / "synth")
    synthetic.make_synthetic_dataset(synth, num_train=3, num_test=2, frame_size=32, seed=2)
    os.makedirs(os.path.join(raw, "videos"))
    splits = {"train": [0, 1, 2], "val": [3], "test": [4]}
    for split, ids in splits.items():
        rows = []
        for i in ids:
            shutil.copy(
                os.path.join(synth, "videos", f"video{i}.mp4"),
                os.path.join(raw, "videos", f"clip{i}.mp4"),
            )
            rows += [
                {"video": f"clip{i}.mp4", "description": f"first thing {i}.", "times": [[0, 1]]},
                {"video": f"clip{i}.mp4", "description": f"then another {i}", "times": [[1, 2]]},
            ]
        with open(os.path.join(raw, f"{split}_list.txt"), "w") as f:
            f.write("".join(f"clip{i}.mp4\n" for i in ids))
        with open(os.path.join(raw, f"{split}_data.json"), "w") as f:
            json.dump(rows, f)
    out = str(tmp_path / "tfds")
    summary = build_lib.build(
        "didemo",
        manual_dir=raw,
        data_dir=out,
        workers=0,
        progress=False,
        log=lambda *_: None,
        sampling=SAMPLING,
    )
    assert summary["config"] == "didemo_f4_s32"
    assert summary["written"] == {"train": 3, "val": 1, "test": 1}
    b = builder_lib.get_builder("didemo", data_dir=out, sampling=SAMPLING)
    (e,) = [b.as_data_source("test")[0]]
    assert [c.decode() for c in e["captions"]] == ["first thing 4. then another 4"]
    assert e["start"] == 0 and e["end"] == 31
    frames, mask = video_lib.decode_clip(
        os.path.join(raw, "videos", "clip4.mp4"), SAMPLING, start=0, end=31
    )
    np.testing.assert_array_equal(e["frame_mask"], mask)


def test_extra_split_train_7k_and_missing_split_message(raw, tmp_path):
    out = str(tmp_path / "tfds")
    quiet = dict(workers=0, progress=False, log=lambda *_: None, sampling=SAMPLING)
    summary = build_lib.build(
        "msrvtt", manual_dir=raw, data_dir=out, splits=("test", "train_7k"), **quiet
    )
    assert summary["written"] == {"test": 5, "train_7k": 8}  # 9 ids, video1 is corrupt
    with pytest.raises(DataError, match="without split.*'train'.*--splits=test,train,train_7k"):
        build_lib.build("msrvtt", manual_dir=raw, data_dir=out, splits=("train",), **quiet)
    with pytest.raises(ValueError, match="unknown split"):
        build_lib.build(
            "msrvtt", manual_dir=raw, data_dir=str(tmp_path / "x"), splits=("training",), **quiet
        )


def test_build_flags_default_to_base_config(monkeypatch, capsys):
    """``python -m data_pipeline.build`` without sampling flags builds base_config's sampling
    (the paragraph datasets their spec's frame count); a flag changes only its field."""
    seen = []
    monkeypatch.setattr(build_lib, "build", lambda dataset, **kw: seen.append(kw["sampling"]))
    common = ["--manual_dir=raw", "--data_dir=out"]
    assert build_lib.main(["--dataset=msrvtt", *common]) == 0
    assert build_lib.main(["--dataset=msrvtt", *common, "--max_frames=3", "--jpeg_quality=80"]) == 0
    assert build_lib.main(["--dataset=didemo", *common]) == 0
    assert build_lib.main(["--dataset=didemo", *common, "--slice_framepos=0"]) == 0
    assert seen == [
        BASE,
        BASE.replace(max_frames=3, jpeg_quality=80),
        BASE.replace(max_frames=64),
        BASE.replace(max_frames=64, slice_framepos=0),
    ]
    assert build_lib.default_sampling("msrvtt") == BASE
    assert build_lib.main(["--dataset=msrvtt", *common, "--max_frames=0"]) == 2
    assert "error: --max_frames must be >= 1, got 0" in capsys.readouterr().err
    assert len(seen) == 4


def test_the_job_sampling_reaches_the_decoder_and_the_jpeg_encoder(raw):
    """Each field of the builder's sampling changes what is stored: max_frames=3 stores 3
    frames of image_size px, and a lower jpeg_quality smaller JPEGs of the same frames."""
    path = os.path.join(raw, "videos", "video2.mp4")

    def stored(sampling):
        job = builder_lib._Job(0, "video2", path, None, None, sampling, None)
        index, jpegs, mask, error = builder_lib.process_clip(job)
        assert error is None, error
        return jpegs, mask

    jpegs, mask = stored(SAMPLING.replace(max_frames=3))
    assert len(jpegs) == 3 and mask.shape == (3,)
    frames, _ = video_lib.decode_clip(path, SAMPLING.replace(max_frames=3))
    assert frames.shape == (3, S, S, 3)
    # The stored JPEGs are decode_clip's frames at the sampling's quality.
    want = [builder_lib._encode_jpeg(f, SAMPLING.jpeg_quality) for f in frames]
    assert jpegs == want
    low, _ = stored(SAMPLING.replace(max_frames=3, jpeg_quality=30))
    assert sum(map(len, low)) < sum(map(len, jpegs))
    config = builder_lib.VideoTextConfig(dataset="msrvtt", sampling=SAMPLING)
    assert config.sampling is SAMPLING and config.name == "msrvtt_f4_s32"
