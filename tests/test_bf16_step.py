"""A bfloat16 train step (model.clip.dtype='bfloat16': the towers' matmuls in bf16, params,
LayerNorm, softmaxes and the loss in float32) against the float32 step: the same loss and
the same parameter update, to bf16's precision.

The companions inject wrong casts into the code the step runs and the same check must fail.
What it cannot see: one more bf16 rounding (of the updated weights, the gradients or the
logits) moves the numbers less than the bf16 towers themselves do. Measured on this batch:
weights rounded to bf16 after the update move the update's cosine from 0.988 to 0.985; the
loss on bf16 logits moves the loss's relative error from 1.2e-3 to 1.8e-3; gradients
rounded to bf16 change neither visibly. Those are not tested here."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import random_arrays, tiny_config, tiny_model

from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models.model import Model
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


@pytest.fixture(scope="module")
def f32_step():
    batch = train.model_inputs(random_arrays(8, tiny_config(), seed=6))
    return batch, _step("float32", batch)


def _assert_steps_match(bf16, f32):
    """The check: (loss, update, new state) of the bf16 step against the float32 step's."""
    loss16, d16, new16 = bf16
    loss32, d32, _ = f32
    dtypes = {str(x.dtype) for x in jax.tree.leaves(new16["params"])}
    assert dtypes == {"float32"}, f"params must stay float32, got {dtypes}"
    np.testing.assert_allclose(loss16, loss32, rtol=LOSS_RTOL)
    v32 = np.concatenate([x.ravel() for x in jax.tree.leaves(d32)])
    v16 = np.concatenate([x.ravel() for x in jax.tree.leaves(d16)])
    cosine = v16 @ v32 / (np.linalg.norm(v16) * np.linalg.norm(v32))
    assert cosine > DELTA_COSINE_MIN, cosine
    np.testing.assert_allclose(np.linalg.norm(v16), np.linalg.norm(v32), rtol=DELTA_NORM_RTOL)
    assert np.linalg.norm(v32) > 1e-3  # the step moved the params
    # and bf16 really ran: the loss is not bitwise the float32 one
    assert loss16 != loss32, "the bf16 loss is bitwise the float32 one: bf16 did not run"


@pytest.mark.slow
def test_bf16_step_matches_f32_step(f32_step):
    batch, f32 = f32_step
    _assert_steps_match(_step("bfloat16", batch), f32)


# --------------------------------------------------------------------------- wrong casts


def _bf16_means_float32(monkeypatch):
    """'bfloat16' resolves to float32: the config's dtype silently does nothing."""
    monkeypatch.setitem(clip_lib.DTYPES, "bfloat16", jnp.float32)


class _DenseParamsInComputeDtype(nn.Dense):
    """A Dense whose parameters are stored in its compute dtype (param_dtype = dtype)."""

    def __post_init__(self):
        # object.__setattr__: a Flax module's fields cannot be assigned after construction.
        object.__setattr__(self, "param_dtype", self.dtype or jnp.float32)
        super().__post_init__()


def _params_in_compute_dtype(monkeypatch):
    """The towers' weights stored (and updated) in bfloat16 instead of float32."""
    monkeypatch.setattr(nn, "Dense", _DenseParamsInComputeDtype)


def _token_ids_through_compute_dtype(monkeypatch):
    """The token ids cast to the compute dtype with the rest of the batch: bf16 holds the
    integers exactly only up to 256, so larger ids become other tokens."""
    real = Model.encode_text

    def encode_text(self, params, input_ids):
        cast = input_ids.astype(self.clip.cfg.compute_dtype).astype(input_ids.dtype)
        return real(self, params, cast)

    monkeypatch.setattr(Model, "encode_text", encode_text)


@pytest.mark.slow
@pytest.mark.parametrize(
    "wrong_cast, caught_by",
    [
        (_bf16_means_float32, "bf16 did not run"),
        (_params_in_compute_dtype, "params must stay float32"),
        (_token_ids_through_compute_dtype, "Not equal to tolerance"),  # the loss: NaN (id 512)
    ],
    ids=["bf16_means_float32", "params_in_compute_dtype", "token_ids_through_compute_dtype"],
)
def test_check_catches_a_wrong_cast(f32_step, monkeypatch, wrong_cast, caught_by):
    batch, f32 = f32_step
    wrong_cast(monkeypatch)
    with pytest.raises(AssertionError, match=caught_by):
        _assert_steps_match(_step("bfloat16", batch), f32)
