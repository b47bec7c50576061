"""Perturbed top-k of the token selector (SPEC §4.3), with the original's backward.

Forward (no train/eval distinction in the original: noise is drawn at inference too)::

    pert = s[:, None, :] + sigma * noise          # noise ~ N(0, 1), 'b n d'
    idx  = top-k indices of pert, sorted ascending by position   # slots ordered by patch index
    indicator[b, k, d] = mean_n [idx[b, n, k] == d]

Backward: the *diagonal* estimator of the original (differential_topk.py:47-59)::

    E[b, k, d]  = sum_n Y[b, n, k, d] * noise[b, n, d] / (n_samples * sigma)
    grad_s[b,d] = sum_k g[b, k, d] * E[b, k, d]

The [b, n, k, d] one-hot tensor of the original (113 MB per GPU batch, ~3.5 GB for a 1k-video
test set) is never built: the indicator and E are scatter-adds of the k chosen positions.

Noise generators (``noise_prng``): ``"threefry"`` is ``jax.random.normal(rng, ...)`` (whatever
impl the key has; the default); ``"hash"`` (:func:`hash_normal`) draws the same N(0, 1)
distribution from a counter hash seeded by the key, ~10x cheaper on CPU than threefry (the
threefry bits are ~90% of the selection's noise cost; jax's ``rbg``/``unsafe_rbg`` impls are
*slower* on XLA:CPU). The draws differ, the distribution does not; parity uses stored noise.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

NOISE_PRNGS = ("threefry", "hash")


def mix32(x: jax.Array) -> jax.Array:
    """A bijection of uint32 that spreads every input bit over the output (the "lowbias32"
    integer hash of C. Wellons' hash-prospector: bias ~1.7e-1 of a random permutation's
    avalanche). Used for the hashed selection noise and the checkpoint checksums."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_normal(rng: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """N(0, 1) samples of ``shape`` from a keyed counter hash (explicit-key, deterministic).

    Two 32-bit seeds are taken from ``rng`` with ``jax.random.bits`` (a tiny threefry call);
    element ``i`` (row-major) gets ``u = mix(mix(i + s0) ^ s1)`` (two rounds of a bijective
    avalanche hash), its top 23 bits become a uniform on the open interval (-1, 1) and
    ``sqrt(2) * erfinv(u)`` the normal -- the inverse-CDF transform ``jax.random.normal`` uses.
    Not for cryptography; enough for the perturbed top-k's Monte-Carlo noise. At most 2**32
    elements per call (the counter is 32-bit).
    """
    size = 1
    for n in shape:
        size *= int(n)
    if size >= 2**32:
        raise ValueError(f"hash_normal draws at most 2**32 - 1 values per call, got {size}")
    seeds = jax.random.bits(rng, (2,), jnp.uint32)
    i = jax.lax.iota(jnp.uint32, size).reshape(shape)
    bits = mix32(mix32(i + seeds[0]) ^ seeds[1])
    # 23 random mantissa bits -> [1, 2) -> centred on (-1, 1): (m + 0.5) / 2**22 - 1
    m = (bits >> 9).astype(jnp.float32)
    u = (m + 0.5) * (2.0**-22) - 1.0
    return (jnp.sqrt(jnp.float32(2.0)) * jax.lax.erf_inv(u)).astype(dtype)


# Above these sizes the unrolled insertion below would make a large program; lax.top_k is used.
_INSERTION_MAX_D, _INSERTION_MAX_K = 256, 8


def _topk_by_insertion(x: jax.Array, k: int):
    """Positions of the k largest of x '... d' by one pass of insertion into k running slots.

    Slot s holds the s-th largest value seen so far; a new value displaces the first slot it
    beats strictly and every slot below shifts down, so among equal values the lower position
    ranks higher -- the tie rule of ``lax.top_k``. Everything is elementwise over '...', so
    XLA fuses it into one loop (XLA:CPU's TopK custom call is a serial per-row sort, ~4x
    slower at the selector's '(b f) 500 49'). Returns (k arrays '...' of positions by rank,
    ok '...'): ok is False where the row has a NaN or fewer than k values above -inf, which
    this pass does not rank like ``lax.top_k``.
    """
    d, lead = x.shape[-1], x.shape[:-1]
    vals = [jnp.full(lead, -jnp.inf, x.dtype)] * k
    idxs = [jnp.full(lead, d, jnp.int32)] * k
    has_nan = jnp.zeros(lead, bool)
    for j in range(d):
        cv, ci = x[..., j], jnp.full(lead, j, jnp.int32)
        has_nan = has_nan | jnp.isnan(cv)
        shift = jnp.zeros(lead, bool)
        for s in range(k):
            shift = shift | (cv > vals[s])
            vals[s], cv = jnp.where(shift, cv, vals[s]), jnp.where(shift, vals[s], cv)
            idxs[s], ci = jnp.where(shift, ci, idxs[s]), jnp.where(shift, idxs[s], ci)
    return idxs, (idxs[-1] < d) & ~has_nan


def _sort_small(xs):
    # Ascending order of k arrays, elementwise (odd-even transposition network): fuses into
    # the surrounding loop, where XLA:CPU's sort of a '... k' axis is a separate serial op.
    xs = list(xs)
    for step in range(len(xs)):
        for i in range(step % 2, len(xs) - 1, 2):
            xs[i], xs[i + 1] = jnp.minimum(xs[i], xs[i + 1]), jnp.maximum(xs[i], xs[i + 1])
    return jnp.stack(xs, axis=-1)


def _topk_sorted_indices(x: jax.Array, k: int) -> jax.Array:
    # x: '... d' -> '... k' int32, ascending position order (torch: topk(sorted=False).sort()).
    # Same indices as lax.top_k (ties included); rows the insertion pass cannot rank (NaN,
    # -inf) send the whole array through lax.top_k.
    reference = lambda: jnp.sort(jax.lax.top_k(x, k)[1], axis=-1)
    if x.shape[-1] > _INSERTION_MAX_D or k > _INSERTION_MAX_K:
        return reference()
    ranked, ok = _topk_by_insertion(x, k)
    return jax.lax.cond(jnp.all(ok), lambda: _sort_small(ranked), reference)


def _scatter_mean(idx: jax.Array, values: Optional[jax.Array], d: int) -> jax.Array:
    # idx: 'b n k' positions; values: 'b n k' or None (=1). Returns 'b k d': mean over n of
    # one_hot(idx) * values, as a scatter-add (no 'b n k d' tensor).
    b, n, k = idx.shape
    flat = (jnp.arange(b)[:, None, None] * k + jnp.arange(k)[None, None, :]) * d + idx
    vals = jnp.ones(idx.shape, jnp.float32) if values is None else values.astype(jnp.float32)
    out = jnp.zeros((b * k * d,), jnp.float32).at[flat.reshape(-1)].add(vals.reshape(-1))
    return out.reshape(b, k, d) / n


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _perturbed_topk(scores, noise, k, sigma):
    return _perturbed_topk_fwd(scores, noise, k, sigma)[0]


def _perturbed_topk_fwd(scores, noise, k, sigma):
    # scores 'b d'; noise 'b n d'
    d = scores.shape[-1]
    pert = scores[:, None, :].astype(jnp.float32) + sigma * noise.astype(jnp.float32)
    idx = _topk_sorted_indices(pert, k)  # 'b n k'
    indicator = _scatter_mean(idx, None, d)  # 'b k d'
    return indicator.astype(scores.dtype), (idx, noise)


def _perturbed_topk_bwd(k, sigma, res, g):
    idx, noise = res
    d = noise.shape[-1]
    # noise at the chosen positions: 'b n k'
    z = jnp.take_along_axis(noise.astype(jnp.float32), idx, axis=-1)
    e = _scatter_mean(idx, z, d) / sigma  # 'b k d'
    grad_scores = jnp.sum(g.astype(jnp.float32) * e, axis=1)  # 'b d'
    return grad_scores, jnp.zeros_like(noise)


_perturbed_topk.defvjp(lambda s, z, k, sig: _perturbed_topk_fwd(s, z, k, sig), _perturbed_topk_bwd)


def perturbed_topk(
    scores: jax.Array,
    k: int,
    num_samples: int,
    sigma: float,
    *,
    rng: Optional[jax.Array] = None,
    noise: Optional[jax.Array] = None,
    noise_prng: str = "threefry",
) -> jax.Array:
    """Soft top-k indicator [b, k, d] of ``scores`` [b, d] (differentiable w.r.t. scores).

    Pass either ``rng`` (a PRNG key; noise ~ N(0,1) of shape [b, num_samples, d] is drawn with
    the generator ``noise_prng``, see ``NOISE_PRNGS``) or ``noise`` itself (e.g. the noise the
    original drew, for parity). ``k``, ``num_samples`` and ``sigma`` have no defaults here: the
    head passes its own (config.model.head.{topk, num_samples, sigma}).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [b, d], got shape {tuple(scores.shape)}")
    b, d = scores.shape
    if k > d:
        raise ValueError(f"top-k with k={k} over only {d} candidates")
    if noise is None:
        if rng is None:
            raise ValueError("perturbed_topk needs either `rng` or `noise`")
        if noise_prng == "threefry":
            noise = jax.random.normal(rng, (b, num_samples, d), jnp.float32)
        elif noise_prng == "hash":
            noise = hash_normal(rng, (b, num_samples, d), jnp.float32)
        else:
            raise ValueError(f"noise_prng must be one of {NOISE_PRNGS}, got {noise_prng!r}")
    elif noise.shape[0] != b or noise.shape[2] != d or noise.ndim != 3:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected [{b}, n, {d}]")
    return _perturbed_topk(scores, jax.lax.stop_gradient(noise), k, float(sigma))


def hard_topk(scores: jax.Array, k: int) -> jax.Array:
    """Noise-free indicator: one-hot of the k best positions, slots in position order.

    What the perturbed top-k tends to as sigma -> 0; used at inference when the
    ``selection_noise_at_eval`` quirk flag is off. No gradient (piecewise constant).
    """
    d = scores.shape[-1]
    idx = _topk_sorted_indices(jax.lax.stop_gradient(scores), k)  # 'b k'
    return jax.nn.one_hot(idx, d, dtype=scores.dtype)
