"""A bfloat16 train step (model.clip.dtype='bfloat16': the towers' matmuls in bf16, params,
LayerNorm, softmaxes and the loss in float32) against the float32 step: the same loss and
the same parameter update, to bf16's precision."""

import jax
import numpy as np
import pytest
from _tiny import random_arrays, tiny_config, tiny_model

from ucofia_jax.runtime import sharding
from ucofia_jax.training import trainer as train

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3 per op); through two tiny
# towers and the head the loss moves by ~1e-3 relative.
LOSS_RTOL = 2e-2
# BertAdam's first update is ~lr * g / |g| per element, so elements whose gradient is near 0
# can flip; the update as a whole must point the same way and have the same size.
DELTA_COSINE_MIN = 0.95
DELTA_NORM_RTOL = 0.1


def _step(dtype, batch):
    c = tiny_config()
    c.mesh.data = 1
    c.model.clip.dtype = dtype
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = tiny_model(c)
    state = train.create_train_state(model, 0)
    p0 = jax.device_get(state["params"])
    trainer = train.make_trainer(
        model, c.train, mesh, state, schedule_total=10, axis_rules=c.mesh.logical_axis_rules
    )
    new, metrics = trainer.train_step(
        train.place_state(trainer, state), sharding.shard_batch(batch, mesh)
    )
    delta = jax.tree.map(
        lambda a, b: np.asarray(a, np.float64) - b, jax.device_get(new["params"]), p0
    )
    return float(metrics["loss"]), delta, new


@pytest.mark.slow
def test_bf16_step_matches_f32_step():
    batch = train.model_inputs(random_arrays(8, tiny_config(), seed=6))
    loss32, d32, _ = _step("float32", batch)
    loss16, d16, new16 = _step("bfloat16", batch)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(new16["params"]))  # f32 params
    np.testing.assert_allclose(loss16, loss32, rtol=LOSS_RTOL)
    v32 = np.concatenate([x.ravel() for x in jax.tree.leaves(d32)])
    v16 = np.concatenate([x.ravel() for x in jax.tree.leaves(d16)])
    cosine = v16 @ v32 / (np.linalg.norm(v16) * np.linalg.norm(v32))
    assert cosine > DELTA_COSINE_MIN, cosine
    np.testing.assert_allclose(np.linalg.norm(v16), np.linalg.norm(v32), rtol=DELTA_NORM_RTOL)
    assert np.linalg.norm(v32) > 1e-3  # the step moved the params
    # and bf16 really ran: the loss is not bitwise the float32 one
    assert loss16 != loss32
