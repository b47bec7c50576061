"""The weights door (ucofia_jax/weights.py): each source, params-only restores, and errors
that name the file.

Arrays are random values of the tiny model's shapes (``jax.eval_shape``: nothing compiles)
except where random init itself is the source.
"""

import os

import jax
import numpy as np
import pytest
import torch
from _tiny import tiny_config, tiny_model
from orbax.checkpoint import type_handlers
from safetensors.numpy import save_file
from test_ucofia_names import _openai_clip_state_dict

from ucofia_jax import errors, weights
from ucofia_jax.models import ucofia_names
from ucofia_jax.training import checkpoints


def _random_params(config, seed):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(tiny_model(config).init, jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _save(workdir, params, step, *, best=False, opt_state=None):
    """A train-state checkpoint as the train loop writes it. ``opt_state``: by default one
    that no optimizer of the config makes (other structure, other shapes)."""
    if opt_state is None:
        opt_state = {"not_this_optimizer": [np.ones((3, 5), np.float32), np.zeros(7, np.int32)]}
    state = {
        "step": np.asarray(step, np.int32),
        "params": params,
        "opt_state": opt_state,
        "rng": np.asarray(jax.random.PRNGKey(1)),
    }
    ck = checkpoints.Checkpointer(workdir, keep=2, async_save=False)
    try:
        meta = {"step": step, "epoch": 0, "step_in_epoch": step}
        if best:
            ck.save_best(step, state, meta, r1=50.0)
        else:
            ck.save(step, state, meta, force=True)
    finally:
        ck.close()


def _save_clip(path, clip):
    """Our CLIP params as an OpenAI-layout safetensors file."""
    sd = _openai_clip_state_dict(clip)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
    assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.fixture
def read_keys(monkeypatch):
    """The key paths Orbax deserializes (every type handler, spied)."""
    seen = []
    for cls in (
        type_handlers.NumpyHandler,
        type_handlers.ArrayHandler,
        type_handlers.ScalarHandler,
    ):
        original = cls.deserialize

        def spy(self, infos, args=None, _original=original):
            seen.extend(str(i.name) for i in infos)
            return _original(self, infos, args)

        monkeypatch.setattr(cls, "deserialize", spy)
    return seen


# ------------------------------------------------------------------ a run's workdir


def test_workdir_restores_only_the_params(tmp_path, read_keys):
    c = tiny_config()
    params = _random_params(c, seed=1)
    _save(str(tmp_path), params, step=7)
    loaded = weights.load(c, workdir=str(tmp_path))
    assert loaded.step == 7 and loaded.model == tiny_model(c)
    _assert_same(loaded.params, params)
    # Only the params were read: not the optimizer state (which no optimizer of this config
    # would even fit), the step or the PRNG key.
    assert read_keys and all(k.startswith("params.") for k in read_keys), read_keys
    assert len(read_keys) == len(jax.tree.leaves(params))


def test_workdir_prefers_the_best_checkpoint(tmp_path):
    c = tiny_config()
    best, last = _random_params(c, seed=2), _random_params(c, seed=3)
    _save(str(tmp_path), best, step=4, best=True)
    _save(str(tmp_path), last, step=9)
    loaded = weights.load(c, workdir=str(tmp_path))
    assert loaded.step == 4
    _assert_same(loaded.params, best)


def test_workdir_without_checkpoint_names_it(tmp_path):
    with pytest.raises(errors.CheckpointError, match=f"no checkpoint under {tmp_path}"):
        weights.load(tiny_config(), workdir=str(tmp_path))
    assert issubclass(errors.CheckpointError, errors.UserError)


def test_damaged_checkpoint_names_the_file(tmp_path):
    c = tiny_config()
    _save(str(tmp_path), _random_params(c, seed=4), step=5)
    os.remove(tmp_path / "checkpoints" / "5" / "state" / "_METADATA")
    step_dir = os.path.join(tmp_path, "checkpoints", "5")
    with pytest.raises(errors.CheckpointError, match=f"{step_dir}: missing state/_METADATA"):
        weights.load(c, workdir=str(tmp_path))


def test_checkpoint_of_another_model_names_the_file(tmp_path):
    c = tiny_config()
    _save(str(tmp_path), _random_params(c, seed=5), step=2)
    c.data.max_frames = 4  # other head shapes than the saved ones
    with pytest.raises(
        errors.CheckpointError,
        match=r"checkpoints/2: the params of another model .*"
        r"head/frame_logit_weight: saved \(2, 2\) now \(4, 4\)",
    ):
        weights.load(c, workdir=str(tmp_path))


# ------------------------------------------------------------------ released / CLIP / random


def _write_released_head(path, head):
    sd = ucofia_names.head_params_to_state_dict(head)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)


def test_released_head_over_clip_weights(tmp_path):
    """The released file's head; CLIP from config.model.clip.checkpoint (the file has none)."""
    c = tiny_config()
    want = _random_params(c, seed=6)
    clip_path = str(tmp_path / "clip.safetensors")
    _save_clip(clip_path, want["clip"])
    released = str(tmp_path / "pytorch_model.bin")
    _write_released_head(released, want["head"])
    c.model.clip.checkpoint = clip_path
    c.model.ucofia_checkpoint = released
    loaded = weights.load(c)
    assert loaded.step == 0
    _assert_same(loaded.params, want)


def test_released_file_of_another_head_names_the_file(tmp_path):
    c = tiny_config()
    released = str(tmp_path / "pytorch_model.bin")
    _write_released_head(released, _random_params(c, seed=7)["head"])
    c.data.max_frames = 4  # the file's head has 2 frames
    c.model.ucofia_checkpoint = released
    with pytest.raises(errors.CheckpointError, match=f"{released}: shape mismatch"):
        weights.load(c)


def test_unreadable_released_file_names_it(tmp_path):
    c = tiny_config()
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"not a checkpoint")
    c.model.ucofia_checkpoint = str(bad)
    with pytest.raises(errors.CheckpointError, match=str(bad)):
        weights.load(c)


def test_clip_alone_and_random_init(tmp_path):
    """Without a run or a released file: Model.init(PRNGKey(config.seed)), with CLIP from
    config.model.clip.checkpoint when set."""
    c = tiny_config()
    random_init = weights.load(c)
    assert random_init.step == 0
    _assert_same(random_init.params, tiny_model(c).init(jax.random.PRNGKey(c.seed)))

    clip = _random_params(c, seed=8)["clip"]
    path = str(tmp_path / "clip.safetensors")
    _save_clip(path, clip)
    c.model.clip.checkpoint = path
    with_clip = weights.load(c)
    _assert_same(with_clip.params["clip"], clip)
    # The head is the same random init (its temporal encoder starts from CLIP's blocks).
    assert jax.tree.structure(with_clip.params["head"]) == jax.tree.structure(
        random_init.params["head"]
    )
