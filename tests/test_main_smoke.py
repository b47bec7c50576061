"""End to end: main on a tiny synthetic set (made and built in the workdir), a few training
steps, evaluation with SK-norm, results.json with the documented keys, the report; then
``--mode=eval`` on the checkpoint, a resume with a changed seed refused; and a bad config key
rejected before anything compiles."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from _tiny import tiny_config

from ucofia_jax import config, main, weights
from ucofia_jax.models import ucofia_names


def _config(workdir):
    c = tiny_config()
    c.mesh.data = 1
    c.data.synthetic.update(
        dict(
            enabled=True,
            num_train=16,
            num_test=8,
            frame_size=16,
            num_seconds=2,
            fps=2,
            captions_per_video=2,
            seed=0,
        )
    )
    c.train.update(
        dict(batch_size=8, epochs=0, num_steps=3, checkpoint_every_steps=2, log_every_steps=1)
    )
    c.eval.update(
        dict(
            batch_size=8,
            text_block=8,
            video_block=8,
            sk_bank_size=16,
            sk_v2t_bank_size=8,
            write_report=True,
        )
    )
    c.model.clip.vocab_size = 49408  # real tokenizer ids
    return c


@pytest.mark.slow
def test_main_train_and_eval_then_eval(tmp_path):
    workdir = str(tmp_path / "run")
    res = main.run(_config(workdir), workdir, "train_and_eval", progress=False)
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert set(saved) == {"t2v", "v2t", "t2v_sk", "v2t_sk", "num_texts", "num_videos", "step"}
    for k in ("t2v", "v2t", "t2v_sk", "v2t_sk"):
        assert set(saved[k]) == {"R@1", "R@5", "R@10", "MdR", "MnR"}
        assert 0 <= saved[k]["R@1"] <= 100
    assert saved["num_texts"] == 8 and saved["num_videos"] == 8 and saved["step"] == 3
    assert res["step"] == 3
    for name in ("results.md", "log.txt", "report/index.html", "report/examples.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    # Evaluate the checkpoint of that workdir.
    res2 = main.run(_config(workdir), workdir, "eval", progress=False)
    assert res2["step"] == 3 and res2["num_videos"] == 8

    # Resuming with another seed is refused before anything is restored or compiled, naming
    # the key, and the workdir's config.json is left as it was.
    with open(os.path.join(workdir, "config.json")) as f:
        before = f.read()
    changed = _config(workdir)
    changed.seed = 5
    changed.train.num_steps = 4
    with pytest.raises(config.ConfigError, match=r"config\.seed 0 -> 5"):
        main.run(changed, workdir, "train", progress=False)
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == before

    # --mode=eval on a checkpoint in the original (PyTorch state_dict) format: our head
    # exported under the original names, read back through the name mapping.
    params = weights.load(_config(workdir), workdir=workdir).params
    sd = ucofia_names.head_params_to_state_dict(jax.device_get(params["head"]))
    path = str(tmp_path / "pytorch_model.bin")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
    c = _config(workdir)
    c.model.ucofia_checkpoint = path
    c.data.data_dir = os.path.join(workdir, "data", "tfds")  # reuse the built set
    c.data.manual_dir = os.path.join(workdir, "data", "raw")
    other = str(tmp_path / "released")
    res3 = main.run(c, other, "eval", progress=False)
    assert os.path.exists(os.path.join(other, "results.json")) and res3["num_videos"] == 8


def test_bad_key_rejected_before_compile(tmp_path):
    c = _config(str(tmp_path))
    c.train.learning_rate = 1e-3  # not a key of the schema
    with pytest.raises(config.ConfigError, match=r"config\.train\.learning_rate"):
        main.run(c, str(tmp_path), "train", progress=False)
    assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))


def test_missing_dataset_names_the_build_command(tmp_path):
    c = _config(str(tmp_path))
    c.data.synthetic.enabled = False
    c.data.data_dir = str(tmp_path / "nothing")
    with pytest.raises(Exception, match="data_pipeline.build"):
        main.run(c, str(tmp_path), "train", progress=False)
