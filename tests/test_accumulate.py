"""Exact gradient accumulation (config.train.accumulate_steps, GradCache-style): the gradient
of 4 micro-batches is the full batch's gradient, where summing the micro-batches' own losses
would not be (the contrastive loss needs all B x B pairs).

The gradients are compared themselves, before clipping and the optimizer: global-norm
clipping and BertAdam's first step (~lr * sign(g)) would hide a wrong scale. Each wrong
variant below is injected into the code the train step runs and must make the same check
fail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import random_arrays, tiny_config, tiny_model

from ucofia_jax.runtime import sharding
from ucofia_jax.training import trainer as train

BATCH, ACCUMULATE = 8, 4
# float32; the accumulated gradient sums the same terms in another order: ~1e-6 relative
# where a gradient is large; where it is a small difference of large terms (or zero) the
# error is a fraction of the largest gradient element (the atol, relative to that element).
GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-5, 1e-5
LOSS_RTOL = 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-7


def _config(accumulate):
    c = tiny_config()
    c.mesh.data = 1
    c.train.batch_size = BATCH
    c.train.accumulate_steps = accumulate
    return c


@pytest.fixture(scope="module")
def setup():
    """The tiny model, its initial params, a batch, the step's rng and the full batch's
    ``((loss, logits), grads)`` -- the reference every test here compares with."""
    c = _config(1)
    model = tiny_model(c)
    state = train.create_train_state(model, 0)
    batch = {k: jnp.asarray(v) for k, v in train.model_inputs(random_arrays(BATCH, c, 4)).items()}
    rng = jax.random.fold_in(state["rng"], 0)  # the first step's key, as the train step
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    full = _loss_and_grads(model, state["params"], batch, rng, 1, mesh)
    return model, state["params"], batch, rng, mesh, full


def _loss_and_grads(model, params, batch, rng, steps, mesh):
    """The train step's own gradient function (trainer.loss_and_grads), jitted."""
    fn = jax.jit(lambda p, b, r: train.loss_and_grads(model, p, b, r, steps, mesh))
    return jax.device_get(fn(params, batch, rng))


def _assert_grads_match(got, want):
    """The check: the same loss and, leaf by leaf, the same gradient."""
    (loss_got, _), grads_got = got
    (loss_want, _), grads_want = want
    np.testing.assert_allclose(loss_got, loss_want, rtol=LOSS_RTOL)
    assert jax.tree.structure(grads_got) == jax.tree.structure(grads_want)
    atol = GRAD_ATOL_OF_MAX * max(float(np.abs(w).max()) for w in jax.tree.leaves(grads_want))
    for (path, w), g in zip(
        jax.tree_util.tree_flatten_with_path(grads_want)[0], jax.tree.leaves(grads_got)
    ):
        np.testing.assert_allclose(
            g,
            w,
            rtol=GRAD_RTOL,
            atol=atol,
            err_msg=jax.tree_util.keystr(path),
        )


def _accumulated(setup):
    model, params, batch, rng, mesh, _ = setup
    return _loss_and_grads(model, params, batch, rng, ACCUMULATE, mesh)


@pytest.mark.slow
def test_accumulated_gradients_equal_full_batch_gradients(setup):
    full = setup[-1]
    _assert_grads_match(_accumulated(setup), full)
    # not trivially zero (measured: a global norm of 26.6 on this batch)
    squares = sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(full[1]))
    assert np.sqrt(squares) > 1.0


# --------------------------------------------------------------------------- wrong variants


def _scaled_by_steps(real):
    """Dividing the summed micro-batch gradients by the number of micro-batches (as if each
    were a mean over its micro-batch): 0.25 x the gradient, which clipping hides."""

    def wrong(model, params, batch, rng, steps, mesh=None):
        aux, grads = real(model, params, batch, rng, steps, mesh)
        return aux, jax.tree.map(lambda g: g / steps, grads)

    return wrong


def _per_micro_batch_losses(real):
    """The usual accumulation: the mean of each micro-batch's own loss and gradient (only its
    own 2 x 2 pairs), not the gradient of the loss over the whole batch."""

    def wrong(model, params, batch, rng, steps, mesh=None):
        parts = [
            jax.value_and_grad(model.loss, has_aux=True)(
                params, {k: v[m::steps] for k, v in batch.items()}, rng
            )
            for m in range(steps)
        ]
        loss = sum(p[0][0] for p in parts) / steps
        grads = jax.tree.map(lambda *g: sum(g) / steps, *(p[1] for p in parts))
        return (loss, parts[0][0][1]), grads

    return wrong


def _patch_pull_back(monkeypatch, change_xs):
    """Runs the real accumulation with ``change_xs`` applied to what its backward scan (the
    ``pull_back`` over micro-batches) iterates on: (micro-batches, row indices, text feature
    gradients, video feature gradients), each with the micro-batch on axis 0."""
    real_scan = jax.lax.scan
    seen = []

    def scan(f, init, xs, *args, **kwargs):
        if getattr(f, "__name__", "") == "pull_back":
            seen.append(True)
            xs = change_xs(*xs)
        return real_scan(f, init, xs, *args, **kwargs)

    monkeypatch.setattr(jax.lax, "scan", scan)
    return seen


def _drop_last_micro_batch(micro, index, g_text, g_video):
    """An off-by-one in the backward loop: the last micro-batch's gradient is never added."""
    return jax.tree.map(lambda x: x[:-1], (micro, index, g_text, g_video))


def _misaligned_feature_grads(micro, index, g_text, g_video):
    """The feature gradients split in another order than the micro-batches (e.g. contiguous
    rows against the strided micro-batches): each is pulled back through the wrong rows."""
    roll = lambda t: jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), t)
    return micro, index, roll(g_text), roll(g_video)


def _other_rows_noise(micro, index, g_text, g_video):
    """The re-encoding draws another row's token-selection noise than the forward did
    (``example_index`` not passed through): the backward differentiates other features."""
    return micro, jnp.roll(index, 1, axis=0), g_text, g_video


# What a gradient mismatch reports: the leaf's path (the loss's mismatch has none).
GRADIENT_LEAF = r"\['(clip|head)'\]"


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, caught_by",
    [
        (_scaled_by_steps, GRADIENT_LEAF),  # the loss is the right one
        (_per_micro_batch_losses, "Not equal to tolerance"),  # the loss already differs
    ],
    ids=["scaled_by_steps", "per_micro_batch_losses"],
)
def test_check_catches_a_wrong_accumulation(setup, monkeypatch, variant, caught_by):
    monkeypatch.setattr(
        train, "accumulated_loss_and_grads", variant(train.accumulated_loss_and_grads)
    )
    with pytest.raises(AssertionError, match=caught_by):
        _assert_grads_match(_accumulated(setup), setup[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    [_drop_last_micro_batch, _misaligned_feature_grads, _other_rows_noise],
    ids=["drop_last_micro_batch", "misaligned_feature_grads", "other_rows_noise"],
)
def test_check_catches_a_wrong_backward_loop(setup, monkeypatch, change):
    seen = _patch_pull_back(monkeypatch, change)
    wrong = _accumulated(setup)
    assert seen, "trainer.accumulated_loss_and_grads no longer scans a 'pull_back' function"
    with pytest.raises(AssertionError, match=GRADIENT_LEAF):
        _assert_grads_match(wrong, setup[-1])


# --------------------------------------------------------------------------- the whole step


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
    """The train step reads config.train.accumulate_steps and gives the full-batch step's
    params. (This alone cannot see a wrong gradient scale: clipping and BertAdam's first
    step remove it; the gradient tests above do.)"""
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
