"""The commands speak in our own lines: ``python -m ucofia_jax.main`` (the dataset build,
training, evaluation) and ``python -m data_pipeline.build`` print progress, summaries, results
and real problems, not the libraries' log lines, unless ``--verbose``. The pipeline reads the
stored records itself (TFDS's SkipDecoding goes through deprecated calls that warn) and gets
what TFDS decodes."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from _env import one_device_env

from configs import demo
from data_pipeline import build as build_lib
from data_pipeline import pipeline, synthetic
from data_pipeline.sampling import FrameSampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a new user saw on `make demo` (issue 20): TFDS's absl warnings, its "download" lines
# on stdout, the deprecation warnings of TFDS's decoding, our checkpointer's INFO lines in
# absl's format, TensorFlow's C++ start-up lines.
CHATTER = (
    "Using custom data configuration",
    "has no dataset_info.json",
    "Downloading and preparing dataset",
    "downloaded and prepared to",
    "TensorInfo.dtype",
    "map_fn_v2",
    "fn_output_signature",
    "queued in",
    "cpu_feature_guard",
    "WARNING:absl:",
    "WARNING:tensorflow:",
)
# absl's line format: I1206 10:00:05.419075 139870211259264 checkpoints.py:404] ...
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\]", re.M)
# The demo, small: 16 + 8 clips of 2 frames, two training steps (a checkpoint each), eval.
SMALL_DEMO = (
    "--config=configs/demo.py",
    "--progress=false",
    "--config.data.synthetic.num_train=16",
    "--config.data.synthetic.num_test=8",
    "--config.data.synthetic.num_seconds=2",
    "--config.data.max_frames=2",
    "--config.model.clip.text_layers=1",
    "--config.model.head.num_samples=8",
    "--config.train.batch_size=8",
    "--config.train.epochs=0",
    "--config.train.num_steps=2",
    "--config.train.checkpoint_every_steps=1",
    "--config.eval.batch_size=8",
    "--config.eval.sk_norm=False",
    "--config.eval.write_report=False",
)
# Clips of 2 s at 2 fps give 2 frames at 1 frame/s: a 4-frame mask is [1, 1, 0, 0].
SHORT_CLIPS = dict(num_train=6, num_test=4, frame_size=32, num_seconds=2, fps=2, seed=0)
MAX_FRAMES = 4


def _chatter(text: str) -> list:
    return [ln for ln in text.splitlines() if any(c in ln for c in CHATTER)] + ABSL_LINE.findall(
        text
    )


def _run(args, **env):
    env = one_device_env(PYTHONPATH=REPO, **env)
    env.pop("UCOFIA_VERBOSE", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as in a user's shell
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_main_says_only_our_lines_unless_verbose(tmp_path):
    workdir = str(tmp_path / "run")
    quiet = _run(["-m", "ucofia_jax.main", f"--workdir={workdir}", *SMALL_DEMO])
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert _chatter(quiet.stdout + quiet.stderr) == [], quiet.stderr[-3000:]
    for ours in ("wrote 24 clips", "trained to step 2/2", "results.json", "| t2v |"):
        assert ours in quiet.stdout, quiet.stdout

    # --verbose: the libraries' log lines again (TFDS's absl warning on opening the dataset,
    # Orbax's INFO lines on restoring), in absl's format; the deprecated calls are gone at
    # their source, so not even --verbose shows their warnings.
    loud = _run(
        ["-m", "ucofia_jax.main", f"--workdir={workdir}", "--mode=eval", *SMALL_DEMO, "--verbose"]
    )
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Using custom data configuration" in loud.stderr, loud.stderr[-3000:]
    assert len(ABSL_LINE.findall(loud.stderr)) >= 2, loud.stderr[-3000:]
    for fixed in ("TensorInfo.dtype", "map_fn_v2"):
        assert fixed not in loud.stderr, loud.stderr[-3000:]


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    raw = str(tmp_path_factory.mktemp("raw"))
    synthetic.make_synthetic_dataset(raw, **SHORT_CLIPS)
    return raw


def _build_cli(raw_dir, data_dir, *extra):
    return _run(
        [
            "-m",
            "data_pipeline.build",
            "--dataset=msrvtt",
            f"--manual_dir={raw_dir}",
            f"--data_dir={data_dir}",
            f"--max_frames={MAX_FRAMES}",
            "--image_size=32",
            "--workers=0",
            *extra,
        ]
    )


def test_build_command_says_only_our_lines_unless_verbose(tmp_path, raw_dir):
    quiet = _build_cli(raw_dir, tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert _chatter(quiet.stdout + quiet.stderr) == [], quiet.stdout + quiet.stderr
    assert "Generating splits" not in quiet.stderr  # TFDS's bars; ours stay
    assert "msrvtt_f4_s32 train: 100%" in quiet.stderr, quiet.stderr
    assert "msrvtt_f4_s32: wrote 10 clips (train 6, test 4)" in quiet.stdout, quiet.stdout

    loud = _build_cli(raw_dir, tmp_path / "loud", "--verbose", "--no_progress")
    assert loud.returncode == 0, loud.stderr[-3000:]
    for library_line in ("Using custom data configuration", "TFDS: preparing ucofia_video_text"):
        assert library_line in loud.stderr, loud.stderr
    assert "msrvtt_f4_s32: wrote 10 clips" in loud.stdout, loud.stdout


@pytest.fixture(scope="module")
def short_clips(tmp_path_factory, raw_dir):
    """Test split of the short clips (4 frames, the last 2 padding), as the pipeline reads it."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    d = demo.get_config().data
    d.update(dict(data_dir=data_dir, max_frames=MAX_FRAMES))
    build_lib.build(
        d.dataset,
        manual_dir=raw_dir,
        data_dir=data_dir,
        sampling=FrameSampling.from_config(d),
        workers=0,
        progress=False,
        log=lambda *_: None,
    )
    return pipeline.VideoTextData(d, split="test", process_index=0, process_count=1)


def test_pipeline_reads_the_records_as_tfds_decodes_them(short_clips):
    stored = short_clips.builder.as_data_source("test")  # TFDS's own decoding
    (batch,) = short_clips.eval_video_batches(global_batch=4)
    assert batch["frame_mask"].dtype == np.int32 and batch["frames"].dtype == np.uint8
    for row, v in enumerate(batch["video_index"]):
        ex = stored[int(v)]
        np.testing.assert_array_equal(batch["frame_mask"][row], ex["frame_mask"])
        np.testing.assert_array_equal(batch["frames"][row], np.stack(ex["frames"]))
    # The padding frames are masked: the test above compares masks that are not all ones.
    np.testing.assert_array_equal(batch["frame_mask"], [[1, 1, 0, 0]] * 4)
