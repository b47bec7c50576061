"""The sharded train step (batch over 4 virtual CPU devices) equals the single-device step,
and a non-finite loss stops the run naming the step and the videos."""

import os
import signal

import jax
import numpy as np
import pytest
from _tiny import random_arrays, tiny_config, tiny_model
from _train_data import ArrayData, check_finite_loss

from ucofia_jax import errors
from ucofia_jax.runtime import sharding
from ucofia_jax.training import checkpoints, loop
from ucofia_jax.training import trainer as train

# Float32 reductions are ordered differently once XLA splits the batch and gathers; after
# two Adam steps of lr 1e-3 the params agree to ~1e-6 absolute.
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-5


def _setup(config, devices):
    mesh = sharding.make_mesh(config.mesh, devices)
    model = tiny_model(config)
    state = train.create_train_state(model, 0)
    trainer = train.make_trainer(
        model,
        config.train,
        mesh,
        state,
        schedule_total=10,
        axis_rules=config.mesh.logical_axis_rules,
    )
    return mesh, trainer, state


@pytest.fixture(scope="module")
def single_device():
    """One compiled single-device trainer shared by the tests (compiling is the slow part)."""
    c = tiny_config()
    c.mesh.data = 1
    return c, _setup(c, jax.devices()[:1])


def _run(config, setup, steps=2):
    mesh, trainer, state = setup
    state = train.place_state(trainer, state)
    data = random_arrays(config.train.batch_size * steps, config)
    losses = []
    for s in range(steps):
        batch = {k: v[s * 8 : (s + 1) * 8] for k, v in data.items()}
        state, m = trainer.train_step(state, sharding.shard_batch(train.model_inputs(batch), mesh))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"])


@pytest.mark.slow
def test_sharded_step_equals_single_device(single_device):
    assert jax.device_count() >= 4, "tests/conftest.py sets 4 virtual CPU devices"
    c, setup1 = single_device
    loss1, p1 = _run(c, setup1)
    c = tiny_config()
    c.mesh.data = 4
    loss4, p4 = _run(c, _setup(c, jax.devices()[:4]))
    np.testing.assert_allclose(loss4, loss1, rtol=LOSS_RTOL)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p4)):
        np.testing.assert_allclose(b, a, atol=PARAM_ATOL, err_msg=jax.tree_util.keystr(path))
    # The step did something (lr is constant 1e-3 here, no warmup).
    p0 = jax.device_get(train.create_train_state(tiny_model(c), 0)["params"])
    diffs = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1))]
    assert max(diffs) > 1e-4


def test_nonfinite_loss_stops_with_step_and_videos():
    batch = {"video_id": np.array([b"video3", b"video7"])}
    with pytest.raises(errors.NonFiniteLossError, match=r"step 12.*video3.*video7"):
        check_finite_loss(float("nan"), 12, batch)
    check_finite_loss(1.0, 12, batch)


@pytest.mark.slow
def test_nan_in_loop_is_reported(tmp_path, single_device):
    c, (mesh, trainer, state) = single_device
    # NaN in the params -> NaN loss at the first step.
    state = {**state, "params": {**state["params"], "head": dict(state["params"]["head"])}}
    state["params"]["head"]["global_mat_weight"] = (
        state["params"]["head"]["global_mat_weight"] * np.nan
    )
    state = train.place_state(trainer, state)
    data = ArrayData(random_arrays(16, c), batch_size=8)
    with pytest.raises(errors.NonFiniteLossError, match="step 0"):
        loop.train_loop(trainer, state, data, total_steps=2, progress=False)


def test_sigterm_saves_and_stops(tmp_path, single_device):
    """SIGTERM mid-epoch: the loop finishes the current step, saves it and returns."""
    c, (mesh, trainer, state) = single_device
    arrays = ArrayData(random_arrays(32, c), batch_size=8)  # 4 steps per epoch

    class SignalOnSecondBatch:
        steps_per_epoch = arrays.steps_per_epoch

        def epoch(self, epoch, start_step=0):
            for i, b in enumerate(arrays.epoch(epoch, start_step)):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield b

    guard = checkpoints.PreemptionGuard()
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2)
    try:
        out = loop.train_loop(
            trainer,
            train.place_state(trainer, state),
            SignalOnSecondBatch(),
            total_steps=4,
            checkpointer=ckpt,
            guard=guard,
            progress=False,
        )
    finally:
        guard.restore()
        ckpt.close()
    assert guard.requested and guard.signal_name == "SIGTERM"
    assert int(jax.device_get(out["step"])) == 2
    assert checkpoints.Checkpointer(str(tmp_path)).latest_step() == 2


@pytest.mark.slow
def test_nonfinite_step_returns_the_input_state(single_device):
    """An absurd lr (1e39 is inf in float32) makes the new params non-finite: the jitted step
    reports finite=False and returns its input state bit for bit (step not counted), so no
    checkpoint can hold it. A sane step reports finite=True."""
    c = tiny_config()
    c.mesh.data = 1
    c.train.update(dict(lr=1e39, clip_lr=1e39))
    mesh, trainer, state = _setup(c, jax.devices()[:1])
    batch = sharding.shard_batch(train.model_inputs(random_arrays(8, c)), mesh)
    placed = train.place_state(trainer, state)
    before = jax.device_get(placed)  # host copies: the step donates its input
    new, metrics = trainer.train_step(placed, batch)
    assert not bool(metrics["finite"])
    after = jax.device_get(new)
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)
    ):
        np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
    assert int(after["step"]) == 0

    c1, (mesh1, trainer1, state1) = single_device
    batch1 = sharding.shard_batch(train.model_inputs(random_arrays(8, c1)), mesh1)
    new1, metrics1 = trainer1.train_step(train.place_state(trainer1, state1), batch1)
    assert bool(metrics1["finite"]) and int(jax.device_get(new1["step"])) == 1
