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

from typing import Optional

import jax
import jax.numpy as jnp

TAU = 0.01


@jax.custom_vjp
def stable_softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis whose VJP stays exact when the softmax saturates.

    The usual VJP ``w * (g - <g, w>)`` cancels catastrophically at the winning entry when
    ``w_max`` rounds to 1 - 6e-8 instead of 1 (XLA computes ``e * (1/sum)``): with tau = 0.01
    that float32 noise becomes a ~1e-5 gradient where the true one is ~1e-12..1e-30. Since the
    VJP sums to zero over the axis (shift invariance), the winner's entry is set to minus the sum
    of the others, which are accurate because each carries its small ``w``.
    """
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    e = jnp.exp(x - m)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _stable_softmax_fwd(x):
    w = stable_softmax(x)
    return w, w


def _stable_softmax_bwd(w, g):
    dx = w * (g - jnp.sum(g * w, axis=-1, keepdims=True))
    winner = jax.nn.one_hot(jnp.argmax(w, axis=-1), w.shape[-1], dtype=bool)
    others = jnp.where(winner, 0.0, dx)
    return (jnp.where(winner, -jnp.sum(others, axis=-1, keepdims=True), others),)


stable_softmax.defvjp(_stable_softmax_fwd, _stable_softmax_bwd)


def _softmax_last(x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    # x: '... a'; mask (bool, broadcastable): False entries get probability 0.
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    return stable_softmax(x)


def isa_weights(s: jax.Array, w: jax.Array, axis: int = -1, tau: float = TAU,
                mask: Optional[jax.Array] = None) -> jax.Array:
    """ISA weights of ``s`` along ``axis`` with the square matrix ``w`` [a, a].

    ``mask`` (optional, bool, broadcastable to ``s`` with the ISA axis at ``axis``) removes
    positions from both softmaxes (not in the original: its softmaxes are unmasked).
    """
    a = s.shape[axis]
    if w.shape != (a, a):
        raise ValueError(f"ISA matrix has shape {tuple(w.shape)}, expected {(a, a)} for axis "
                         f"{axis} of a similarity of shape {tuple(s.shape)}")
    s_last = jnp.moveaxis(s, axis, -1)                                   # '... a'
    m_last = None if mask is None else jnp.moveaxis(
        jnp.broadcast_to(mask, s.shape), axis, -1)
    p = _softmax_last(s_last / tau, m_last)                              # '... a'
    q = jnp.einsum("...j,ji->...i", p, w.astype(p.dtype))                # p @ W
    out = _softmax_last(q / tau, m_last)
    return jnp.moveaxis(out, -1, axis)


def isa_aggregate(s: jax.Array, w: jax.Array, axis: int = -1, tau: float = TAU,
                  mask: Optional[jax.Array] = None) -> jax.Array:
    """``sum_a s * ISA_a(s; w)``: the axis ``a`` is reduced."""
    return jnp.sum(s * isa_weights(s, w, axis, tau, mask), axis=axis)
