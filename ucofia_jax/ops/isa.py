"""ISA (interactive similarity aggregation), SPEC §6 / §16.1.

``ISA_a(s; W) = softmax_a( softmax_a(s / tau) ._a W / tau )`` where ``._a W`` contracts the
axis ``a`` with the *first* index of ``W`` (row vector times matrix, ``out_i = sum_j p_j W_ji``).
The weights multiply the *raw* similarity, never the softmax. tau = 0.01 in the original.

Both softmaxes are computed in one pass each: subtract the max, ``exp`` once, divide by the
sum (``jax.nn.softmax`` does the same but also builds a custom JVP we don't need here).
With tau = 0.01 and CLIP-like gaps most ``exp`` results underflow; the values that land in
the float32 denormal range are harmless for the result (they are < 1e-38 of the max term)
but can slow CPUs that do not flush them, see benchmarks/similarity.py.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def stable_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """Softmax along ``axis`` whose VJP stays exact when the softmax saturates.

    The usual VJP ``w * (g - <g, w>)`` cancels catastrophically at the winning entry when
    ``w_max`` rounds to 1 - 6e-8 instead of 1 (XLA computes ``e * (1/sum)``): with tau = 0.01
    that float32 noise becomes a ~1e-5 gradient where the true one is ~1e-12..1e-30. Since the
    VJP sums to zero over the axis (shift invariance), the winner's entry is set to minus the sum
    of the others, which are accurate because each carries its small ``w``.
    """
    m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    e = jnp.exp(x - m)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _stable_softmax_fwd(x, axis):
    w = stable_softmax(x, axis)
    return w, w


def _stable_softmax_bwd(axis, w, g):
    dx = w * (g - jnp.sum(g * w, axis=axis, keepdims=True))
    winner = w == jnp.max(w, axis=axis, keepdims=True)
    # first winner only (ties): cumulative count along the axis
    winner = winner & (jnp.cumsum(winner, axis=axis) == 1)
    others = jnp.where(winner, 0.0, dx)
    return (jnp.where(winner, -jnp.sum(others, axis=axis, keepdims=True), others),)


stable_softmax.defvjp(_stable_softmax_fwd, _stable_softmax_bwd)


def _softmax_axis(x: jax.Array, axis: int, mask: Optional[jax.Array] = None) -> jax.Array:
    # x: any rank, softmax along `axis`; mask (bool, broadcastable): False -> probability 0.
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    return stable_softmax(x, axis)


def _contract_first_index(p: jax.Array, w: jax.Array, axis: int) -> jax.Array:
    # out[..., i, ...] = sum_j p[..., j, ...] w[j, i]. Written as one 2-D GEMM [rows, a] x [a, a]
    # (the axis moved last first when it is not): XLA:CPU lowers the batched einsum form of this
    # small-matrix product ~4x slower at 't v w p' = 100 x 100 x 32 x 48.
    a = p.shape[axis]
    x = p if axis == p.ndim - 1 else jnp.moveaxis(p, axis, -1)
    y = (x.reshape(-1, a) @ w.astype(p.dtype)).reshape(x.shape)
    return y if axis == p.ndim - 1 else jnp.moveaxis(y, -1, axis)


def isa_weights(
    s: jax.Array, w: jax.Array, axis: int = -1, *, tau: float, mask: Optional[jax.Array] = None
) -> jax.Array:
    """ISA weights of ``s`` along ``axis`` with the square matrix ``w`` [a, a].

    ``tau``: the temperature of both softmaxes, no default here (the head passes its
    ``tau``, config.model.head.tau). ``mask`` (optional, bool, broadcastable to ``s``) removes
    positions from both softmaxes (not in the original: its softmaxes are unmasked).
    """
    axis = axis % s.ndim
    a = s.shape[axis]
    if w.shape != (a, a):
        raise ValueError(
            f"ISA matrix has shape {tuple(w.shape)}, expected {(a, a)} for axis "
            f"{axis} of a similarity of shape {tuple(s.shape)}"
        )
    m = None if mask is None else jnp.broadcast_to(mask, s.shape)
    p = _softmax_axis(s / tau, axis, m)
    q = _contract_first_index(p, w, axis)  # p @ W along axis
    return _softmax_axis(q / tau, axis, m)


def isa_aggregate(
    s: jax.Array, w: jax.Array, axis: int = -1, *, tau: float, mask: Optional[jax.Array] = None
) -> jax.Array:
    """``sum_a s * ISA_a(s; w)``: the axis ``a`` is reduced."""
    return jnp.sum(s * isa_weights(s, w, axis, tau=tau, mask=mask), axis=axis)
