"""Training loss of UCoFiA (SPEC §7): symmetric cross-entropy, no extra temperature."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_diag(logits: jax.Array) -> jax.Array:
    """``CrossEn`` of the original: mean_i -log_softmax(logits, axis=1)[i, i]."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be square [n, n], got {tuple(logits.shape)}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=1)
    return -jnp.mean(jnp.diagonal(logp))


def symmetric_cross_entropy(logits: jax.Array) -> jax.Array:
    """½ [CE(S) + CE(Sᵀ)] on the (global) text x video similarity matrix [n, n]."""
    return 0.5 * (cross_entropy_diag(logits) + cross_entropy_diag(logits.T))
