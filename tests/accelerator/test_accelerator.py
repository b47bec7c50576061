"""On a GPU/TPU, at sizes the CPU suite cannot afford (ViT-B/32 widths, 4 frames, batch 16):
the bf16 step against f32, remat and exact accumulation against the plain step, the sharded
evaluation against one device. Skipped on CPU (tests/accelerator/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import random_arrays, tiny_config, tiny_model

from ucofia_jax.evaluation import evaluator as evaluate
from ucofia_jax.runtime import sharding
from ucofia_jax.training import trainer as train

pytestmark = pytest.mark.gpu

BATCH = 16


def _config(**train_overrides):
    """ViT-B/32 widths with fewer layers (random weights), 4 frames x 16 words at 224 px."""
    c = tiny_config()
    c.model.clip.update(
        dict(
            embed_dim=512,
            image_resolution=224,
            vision_layers=4,
            vision_width=768,
            vision_patch_size=32,
            vocab_size=49408,
            text_width=512,
            text_heads=8,
            text_layers=4,
            token_shift_blocks=(2, 3),
            token_shift_n_div=7,
        )
    )
    c.model.head.update(dict(num_samples=100, seq_layers=2))
    c.data.update(dict(max_words=16, max_frames=4, image_size=224))
    c.train.update(dict(batch_size=BATCH, **train_overrides))
    c.mesh.data = 1
    return c


def _step(c, batch, devices=1):
    c.mesh.data = devices
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:devices])
    model = tiny_model(c)
    state = train.create_train_state(model, 0)
    p0 = jax.device_get(state["params"])
    trainer = train.make_trainer(
        model, c.train, mesh, state, schedule_total=10, axis_rules=c.mesh.logical_axis_rules
    )
    new, m = trainer.train_step(
        train.place_state(trainer, state), sharding.shard_batch(batch, mesh)
    )
    assert bool(m["finite"])
    return float(m["loss"]), jax.device_get(new["params"]), p0


def _batch(c, seed=0):
    return train.model_inputs(random_arrays(BATCH, c, seed=seed))


def _assert_params_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_bf16_step_vs_f32():
    c = _config()
    batch = _batch(c)
    loss32, p32, p0 = _step(c, batch)
    c16 = _config()
    c16.model.clip.dtype = "bfloat16"
    loss16, p16, _ = _step(c16, batch)
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)  # bf16: 8-bit mantissa
    d32 = np.concatenate(
        [(a - b).ravel() for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p0))]
    )
    d16 = np.concatenate(
        [(a - b).ravel() for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p0))]
    )
    assert d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32)) > 0.9
    np.testing.assert_allclose(np.linalg.norm(d16), np.linalg.norm(d32), rtol=0.15)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_step_equals_plain_step(policy):
    # GPU float32 matmuls may use TF32 unless disabled: compare at highest precision.
    with jax.default_matmul_precision("highest"):
        c = _config()
        batch = _batch(c, seed=1)
        loss0, p0, _ = _step(c, batch)
        c.model.remat = policy
        loss1, p1, _ = _step(c, batch)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    _assert_params_close(p0, p1, rtol=1e-5, atol=1e-6)


def test_accumulated_step_equals_full_batch_step():
    with jax.default_matmul_precision("highest"):
        c = _config()
        batch = _batch(c, seed=2)
        loss1, p1, _ = _step(c, batch)
        loss4, p4, _ = _step(_config(accumulate_steps=4), batch)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    _assert_params_close(p1, p4, rtol=1e-5, atol=1e-6)


def test_sharded_evaluation_equals_one_device():
    n = jax.device_count()
    if n < 2:
        pytest.skip(f"needs >= 2 accelerator devices for a sharded evaluation, found {n}")
    c = _config()
    c.eval.update(dict(text_block=8, video_block=8))
    model = tiny_model(c)
    params = train.create_train_state(model, 0)["params"]
    a = random_arrays(24, c, seed=3)
    text = jax.device_get(model.encode_text(params, jnp.asarray(a["input_ids"])))
    video = jax.device_get(
        model.encode_video(
            params, jnp.asarray(a["frames"]), jnp.asarray(a["frame_mask"]), jax.random.PRNGKey(0)
        )
    )
    out = {}
    for devices in (1, n):
        c.mesh.data = devices
        mesh = sharding.make_mesh(c.mesh, jax.devices()[:devices])
        out[devices] = evaluate.retrieval_fns(model, mesh, c.eval).score(params, text, video)
    np.testing.assert_allclose(out[n], out[1], rtol=1e-5, atol=1e-5)
