"""Exact gradient accumulation (config.train.accumulate_steps, GradCache-style): one step
over 4 micro-batches gives the parameters of the full-batch step, where summing the
micro-batches' own losses would not (the contrastive loss needs all B x B pairs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import random_arrays, tiny_config, tiny_model

from ucofia_jax.runtime import sharding
from ucofia_jax.training import trainer as train

BATCH, ACCUMULATE = 8, 4
# float32; the accumulated gradient sums the same terms in another order.
LOSS_RTOL = 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-7


def _config(accumulate):
    c = tiny_config()
    c.mesh.data = 1
    c.train.batch_size = BATCH
    c.train.accumulate_steps = accumulate
    return c


def _one_step(accumulate, batch):
    c = _config(accumulate)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = tiny_model(c)
    state = train.create_train_state(model, 0)
    trainer = train.make_trainer(
        model, c.train, mesh, state, schedule_total=10, axis_rules=c.mesh.logical_axis_rules
    )
    state = train.place_state(trainer, state)
    new, metrics = trainer.train_step(state, sharding.shard_batch(batch, mesh))
    return float(metrics["loss"]), jax.device_get(new["params"]), model


@pytest.mark.slow
def test_accumulated_step_equals_full_batch_step():
    c = _config(1)
    batch = train.model_inputs(random_arrays(BATCH, c, seed=4))
    loss1, p1, model = _one_step(1, batch)
    loss4, p4, _ = _one_step(ACCUMULATE, batch)
    np.testing.assert_allclose(loss4, loss1, rtol=LOSS_RTOL)
    p0 = jax.device_get(train.create_train_state(model, 0)["params"])
    moved = 0.0
    for (path, a), b, z in zip(
        jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p4), jax.tree.leaves(p0)
    ):
        np.testing.assert_allclose(
            b, a, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=jax.tree_util.keystr(path)
        )
        moved = max(moved, float(np.abs(a - z).max()))
    assert moved > 1e-4  # the step changed the params (lr 1e-3)

    # Summing the micro-batches' own losses (each with only its 2 x 2 pairs) is a different
    # objective: its value is far from the full-batch loss, so the equality above can fail.
    rng = jax.random.fold_in(train.create_train_state(model, 0)["rng"], 0)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    naive = np.mean(
        [
            float(model.loss(model.init(jax.random.PRNGKey(0)), _rows(arrays, m), rng)[0])
            for m in range(ACCUMULATE)
        ]
    )
    assert abs(naive - loss1) > 100 * LOSS_RTOL * abs(loss1), (naive, loss1)


def _rows(batch, m):
    return {k: v[m::ACCUMULATE] for k, v in batch.items()}


def test_training_noise_does_not_depend_on_the_split():
    """A video's token-selection noise is a function of its row in the batch only."""
    model = tiny_model(_config(1))
    head = model.head
    rng = jax.random.PRNGKey(3)
    full = head.training_noise(rng, BATCH, 4)
    f = head.max_frames
    for m in range(ACCUMULATE):
        rows = np.arange(m, BATCH, ACCUMULATE)
        part = head.training_noise(rng, len(rows), 4, example_index=jnp.asarray(rows))
        expect = np.asarray(full).reshape(BATCH, f, *full.shape[1:])[rows]
        np.testing.assert_array_equal(np.asarray(part).reshape(expect.shape), expect)
    # different rows, different noise
    assert not np.array_equal(np.asarray(full[:f]), np.asarray(full[f : 2 * f]))


def test_batch_not_divisible_by_accumulation_is_refused():
    c = _config(3)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = tiny_model(c)
    with pytest.raises(ValueError, match="accumulate_steps"):
        train.make_trainer(
            model,
            c.train,
            mesh,
            {"params": None},
            schedule_total=10,
            axis_rules=c.mesh.logical_axis_rules,
        )
