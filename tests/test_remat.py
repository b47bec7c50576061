"""Rematerialisation (config.model.remat) changes memory and time, never the model: the same
parameter tree (names and shapes) and the same gradients as the plain step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import random_arrays, tiny_config, tiny_model

from ucofia_jax.models import layers

# float32; remat recomputes the same ops, so only XLA's fusion choices can differ.
GRAD_RTOL = 1e-6
GRAD_ATOL = 1e-9


def _model(remat):
    c = tiny_config()
    c.model.remat = remat
    c.model.head.seq_layers = 2
    c.model.clip.text_layers = 2
    return c, tiny_model(c)


@pytest.fixture(scope="module")
def plain():
    c, model = _model("none")
    params = model.init(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in random_arrays(4, c, seed=1).items()}
    return model, params, batch, _grads(model, params, batch)


def _shapes(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (jax.tree_util.keystr(path), x.shape), tree
    )


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_parameter_names(policy):
    c, model = _model(policy)
    _, plain_model = _model("none")
    assert model.clip.remat == policy and model.head.remat == policy
    # Flax's nn.remat keeps module names: init of the remat modules gives the same tree.
    rng = jax.random.PRNGKey(0)
    assert _shapes(jax.eval_shape(model.init, rng)) == _shapes(
        jax.eval_shape(plain_model.init, rng)
    )  # the head's temporal encoder (Model.init builds CLIP's params with init_clip)
    res = c.model.clip.image_resolution
    args = (jnp.zeros((1, res, res, 3)), jnp.zeros((1, 2), jnp.int32))
    clip_tree = lambda m: _shapes(jax.eval_shape(lambda r: m.clip.init(r, *args), rng))
    assert clip_tree(model) == clip_tree(plain_model)  # CLIP's towers with remat


def _grads(model, params, batch):
    return jax.jit(jax.grad(lambda p, b, r: model.loss(p, b, r)[0]))(
        params, batch, jax.random.PRNGKey(2)
    )


def _assert_grads_match(got, want):
    """The check: the same tree and, leaf by leaf, the same gradient."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_allclose(
            b, a, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.slow
def test_remat_gradients_equal_the_plain_step(plain):
    """'full' remat (the memory policy); 'dots' is compared in tests/accelerator/."""
    _, params, batch, grads0 = plain
    _, model = _model("full")
    _assert_grads_match(_grads(model, params, batch), grads0)
    # the gradients are not trivially zero
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads0)) > 1e-3


# Wrong remat wrappers, each a bug a hand-written or mis-wired rematerialisation could have,
# put in place of flax's nn.remat where layers.Transformer wraps its blocks. Each takes the
# remat-wrapped block's call, the block input and the attention mask.


def _input_saved_as_a_constant(call, x, mask):
    """The forward is unchanged, but the backward treats the saved block input as a constant:
    no gradient flows from the block into earlier layers (only along the residual)."""
    return call(jax.lax.stop_gradient(x), mask) + (x - jax.lax.stop_gradient(x))  # + exactly 0


def _mask_not_passed_on(call, x, mask):
    """The wrapper forwards the input but not the attention mask (the text tower's causal
    mask): the recomputed block attends to later tokens."""
    return call(x, None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "wrong",
    [_input_saved_as_a_constant, _mask_not_passed_on],
    ids=["input_saved_as_a_constant", "mask_not_passed_on"],
)
def test_check_catches_a_wrong_remat(plain, monkeypatch, wrong):
    _, params, batch, grads0 = plain
    real_remat = nn.remat
    wrapped = []

    def remat(block, **kwargs):
        lifted = real_remat(block, **kwargs)
        wrapped.append(block)

        class WrongRemat(lifted):
            def __call__(self, x, mask=None):
                return wrong(super().__call__, x, mask)

        return WrongRemat

    monkeypatch.setattr(nn, "remat", remat)
    _, model = _model("full")
    grads = _grads(model, params, batch)
    assert wrapped, "layers.Transformer no longer calls nn.remat"
    with pytest.raises(AssertionError):
        _assert_grads_match(grads, grads0)


def test_remat_is_in_the_program():
    """The remat program really differs (a checkpoint in the jaxpr), so the test above
    compares two different computations."""
    c, model = _model("full")
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in random_arrays(2, c).items()}
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: model.loss(p, batch, jax.random.PRNGKey(0))[0]))(
        params
    )
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)
    _, plain_model = _model("none")
    plain_jaxpr = jax.make_jaxpr(
        jax.grad(lambda p: plain_model.loss(p, batch, jax.random.PRNGKey(0))[0])
    )(params)
    assert "remat" not in str(plain_jaxpr) and "checkpoint" not in str(plain_jaxpr)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat must be one of"):
        layers.Transformer(8, 1, 1, remat="everything", activation="quick_gelu").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 2, 8))
        )


def _saved_for_backward(model, params, batch) -> int:
    # The loss's vjp closes over what the backward needs: its leaves are the residuals.
    rng = jax.random.PRNGKey(0)
    vjp_fn = jax.eval_shape(
        lambda p, b: jax.vjp(lambda q: model.loss(q, b, rng)[0], p)[1], params, batch
    )
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(vjp_fn))


@pytest.mark.slow
def test_remat_saves_less_for_the_backward():
    """What remat is for: the forward keeps fewer bytes for the backward ('full' keeps
    block inputs only, 'dots' also the matmul outputs). XLA:CPU's memory_analysis cannot
    show this (it expands the optimization barriers before scheduling), jax's trace can."""
    saved = {}
    for policy in ("none", "dots", "full"):
        c, model = _model(policy)
        c.model.clip.vision_layers = 4
        model = tiny_model(c)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in random_arrays(8, c).items()}
        saved[policy] = _saved_for_backward(model, params, batch)
    assert saved["full"] < saved["dots"] < saved["none"], saved
    assert saved["full"] < 0.6 * saved["none"], saved
