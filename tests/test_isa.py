"""ISA: first-index contraction, two tau-softmaxes, masking, and the saturation-exact VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucofia_jax.ops.isa import isa_aggregate, isa_weights, stable_softmax


def _np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_isa_matches_numpy_with_non_symmetric_w():
    r = np.random.RandomState(0)
    s = r.randn(3, 5, 4) * 0.02
    w = np.eye(5) + 0.3 * r.randn(5, 5)  # non-symmetric: a transposed W would differ
    p = _np_softmax(np.moveaxis(s, 1, -1) / 0.01)
    ref = np.moveaxis(_np_softmax((p @ w) / 0.01), -1, 1)
    got = isa_weights(jnp.asarray(s, jnp.float32), jnp.asarray(w, jnp.float32), axis=1, tau=0.01)
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5)
    wrong = np.moveaxis(_np_softmax((p @ w.T) / 0.01), -1, 1)
    assert np.abs(wrong - ref).max() > 1e-2
    agg = isa_aggregate(jnp.asarray(s, jnp.float32), jnp.asarray(w, jnp.float32), axis=1, tau=0.01)
    np.testing.assert_allclose(np.asarray(agg), (s * ref).sum(1), atol=1e-6)


def test_isa_mask_removes_positions():
    s = jnp.asarray([[0.01, 0.02, 0.5]], jnp.float32)
    mask = jnp.asarray([[True, True, False]])
    w = isa_weights(s, jnp.eye(3), tau=0.01, mask=mask)
    assert float(w[0, 2]) == 0.0 and abs(float(w.sum()) - 1.0) < 1e-6


def test_isa_rejects_wrong_matrix_shape():
    with pytest.raises(ValueError, match="ISA matrix has shape"):
        isa_weights(jnp.ones((2, 4)), jnp.eye(3), tau=0.01)


def test_stable_softmax_grad_exact_when_saturated():
    # Saturated: the true gradient is ~exp(-40); the plain VJP gives float32 noise under jit.
    x = jnp.asarray([[0.0, -40.0, -45.0, -60.0]], jnp.float32) + 3.0
    g = jnp.asarray([[1.0, -2.0, 0.5, 3.0]], jnp.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(stable_softmax(x) * g)))(x)
    x64 = np.asarray(x, np.float64)
    w = _np_softmax(x64)
    ref = w * (np.asarray(g) - (np.asarray(g) * w).sum(-1, keepdims=True))
    # float64 also cancels at the winner; the exact value there is minus the others' sum
    # (the softmax VJP sums to zero over the axis).
    ref[0, 0] = -ref[0, 1:].sum()
    assert np.all(np.abs(np.asarray(grad) - ref) <= 1e-5 * np.abs(ref) + 1e-35)
    # and it is the ordinary softmax gradient in the soft regime
    xs = jnp.asarray([[0.1, -0.3, 0.2]], jnp.float32)
    a = jax.grad(lambda x: jnp.sum(stable_softmax(x) * g[:, :3]))(xs)
    b = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x) * g[:, :3]))(xs)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
