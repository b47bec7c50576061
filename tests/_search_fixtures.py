"""Shared by the search tests: a tiny model saved as a training run's workdir (config.json
+ an Orbax checkpoint of a seeded random init, the format main.py writes), and a folder of
short real mp4 clips with captions (the synthetic dataset's renderer and encoder)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import av
import jax
import numpy as np
from _tiny import tiny_config, tiny_model

from data_pipeline import synthetic
from ucofia_jax.training import checkpoints, optim
from ucofia_jax.training import trainer as train_lib


def search_config(noise_at_eval: bool = True):
    c = tiny_config()
    c.model.clip.vocab_size = 49408  # real tokenizer ids
    c.model.head.selection_noise_at_eval = noise_at_eval
    c.data.update(dict(max_frames=2, image_size=16, max_words=8))
    c.eval.update(dict(batch_size=8, text_block=8, video_block=8, sk_norm=False))
    c.mesh.data = 1
    return c


def save_workdir(workdir: str | Path, config, seed_offset: int = 0, edit_params=None) -> str:
    """config.json + checkpoint step 1 of a random init (seed ``config.seed + seed_offset``),
    its params passed through ``edit_params`` (params -> params) where given."""
    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    model = tiny_model(config)
    state = train_lib.create_train_state(model, config.seed + seed_offset)
    if edit_params is not None:
        state["params"] = edit_params(state["params"])
    tx = optim.make_optimizer(config.train, optim.group_schedules(config.train, 1))
    state["opt_state"] = tx.init(state["params"])
    state["step"] = np.asarray(1, np.int32)
    ck = checkpoints.Checkpointer(workdir, keep=1, async_save=False)
    try:
        ck.save(1, jax.device_get(state), {"step": 1, "epoch": 0, "step_in_epoch": 1}, force=True)
    finally:
        ck.close()
    return workdir


def make_clips(folder: str | Path, n: int, seed: int = 0) -> dict[str, str]:
    """``n`` 2-second 16 px clips video0..; returns {file name: first caption}."""
    tmp = Path(str(folder) + ".raw")
    synthetic.make_synthetic_dataset(
        str(tmp),
        num_train=0,
        num_test=n,
        frame_size=16,
        num_seconds=2,
        fps=2,
        seed=seed,
        captions_per_video=1,
    )
    data = json.loads((tmp / "MSRVTT_data.json").read_text())
    Path(folder).mkdir(parents=True, exist_ok=True)
    captions = {}
    for s in data["sentences"]:
        name = s["video_id"] + ".mp4"
        shutil.move(str(tmp / "videos" / name), str(Path(folder) / name))
        captions[name] = s["caption"]
    shutil.rmtree(tmp)
    return captions


def write_bad_files(folder: str | Path) -> dict[str, str]:
    """Broken inputs -> the decoder's reason for each."""
    folder = Path(folder)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(400))
    # A container with an audio stream only.
    with av.open(str(folder / "audio_only.mkv"), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for p in stream.encode(frame):
            out.mux(p)
        for p in stream.encode():
            out.mux(p)
    # Zero length: one frame at 2 fps is half a second.
    synthetic.write_clip(str(folder / "zero_length.mp4"), np.zeros((1, 16, 16, 3), np.uint8), 2)
    return {
        "empty.mp4": "empty file",
        "corrupt.mp4": "unreadable container",
        "audio_only.mkv": "unreadable container",
        "zero_length.mp4": "shorter than one second",
    }
