"""Sinkhorn-Knopp SK-norm (SPEC §8), inference only.

``sinkhorn_knopp`` is the original plain-domain form exactly (eval_*/main_ucofia.py:342-357)::

    m = max(S); K = exp(S - m); b = 1 / K.sum(0)
    repeat n: a = 1 / (K b); b = 1 / (aᵀ K)
    return log_softmax(log a), log_softmax(log b - m)

With level-1/2 logits scaled by 100, ``exp(S - m)`` underflows for rows far below the max, and
then ``1/(K b)`` overflows to inf: ``sinkhorn_knopp_log`` runs the same iteration on
log-scalings with logsumexp and stays finite; where the plain one is finite both agree.

SK prior: per level, the column scaling of the balanced (query bank x gallery) kernel gives a
log-prior over the gallery that is added to that level's test similarity before averaging.
t2v: bank = training texts x test videos, prior over videos. v2t: bank = test texts x training
videos, *transposed* to [training videos, test texts], prior over test texts.
"""

from __future__ import annotations

from functools import partial
from typing import List, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class SinkhornResult(NamedTuple):
    row_log_prior: jax.Array  # [M]  log_softmax(log a)
    col_log_prior: jax.Array  # [N]  log_softmax(log b - m)
    a: jax.Array  # [M]  row scaling (plain domain; exp(log a) in the log form)
    b: jax.Array  # [N]  column scaling


def check_finite(x, name: str = "S") -> None:
    """Raise FloatingPointError if ``x`` holds NaN/inf (eagerly, or at run time under jit)."""

    def _check(v):
        v = np.asarray(v)
        bad = ~np.isfinite(v)
        if bad.any():
            raise FloatingPointError(
                f"{name} of shape {v.shape} holds {int(np.isnan(v).sum())} NaN and "
                f"{int(np.isinf(v).sum())} inf values (first at index "
                f"{tuple(int(i) for i in np.argwhere(bad)[0])}); Sinkhorn would propagate them"
            )

    if isinstance(x, jax.core.Tracer):
        jax.debug.callback(_check, x)
    else:
        _check(x)


@partial(jax.jit, static_argnames=("n_iters",))
def _sk_plain(s, n_iters):
    s = s.astype(jnp.float32)
    m = jnp.max(s)
    k = jnp.exp(s - m)  # 'm n'
    b = 1.0 / jnp.sum(k, axis=0)  # 'n'

    def body(_, ab):
        _, b = ab
        a = 1.0 / (k @ b)  # 'm'
        b = 1.0 / (a @ k)  # 'n'
        return a, b

    a0 = jnp.zeros((s.shape[0],), jnp.float32)
    a, b = jax.lax.fori_loop(0, n_iters, body, (a0, b))
    return SinkhornResult(
        jax.nn.log_softmax(jnp.log(a), axis=0), jax.nn.log_softmax(jnp.log(b) - m, axis=0), a, b
    )


@partial(jax.jit, static_argnames=("n_iters",))
def _sk_log(s, n_iters):
    s = s.astype(jnp.float32)
    m = jnp.max(s)
    lk = s - m  # log K
    lb = -jax.nn.logsumexp(lk, axis=0)

    def body(_, ab):
        _, lb = ab
        la = -jax.nn.logsumexp(lk + lb[None, :], axis=1)
        lb = -jax.nn.logsumexp(lk + la[:, None], axis=0)
        return la, lb

    la0 = jnp.zeros((s.shape[0],), jnp.float32)
    la, lb = jax.lax.fori_loop(0, n_iters, body, (la0, lb))
    return SinkhornResult(
        jax.nn.log_softmax(la, axis=0), jax.nn.log_softmax(lb - m, axis=0), jnp.exp(la), jnp.exp(lb)
    )


def _validate(s, n_iters):
    if s.ndim != 2:
        raise ValueError(f"Sinkhorn expects a 2-D [queries, gallery] matrix, got {s.shape}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    check_finite(s, "Sinkhorn input")


def sinkhorn_knopp(s: jax.Array, n_iters: int = 4) -> SinkhornResult:
    """The original plain-domain Sinkhorn-Knopp on logits ``s`` [M, N] (temperature 1)."""
    _validate(s, n_iters)
    return _sk_plain(s, n_iters)


def sinkhorn_knopp_log(s: jax.Array, n_iters: int = 4) -> SinkhornResult:
    """Log-domain Sinkhorn-Knopp: same fixed point and iterates, finite where plain overflows."""
    _validate(s, n_iters)
    return _sk_log(s, n_iters)


SK_DOMAINS = ("plain", "log")  # config.eval.sk_domain


def _sk(domain):
    if domain == "plain":
        return sinkhorn_knopp
    if domain == "log":
        return sinkhorn_knopp_log
    raise ValueError(f"unknown Sinkhorn domain {domain!r} (use 'plain' or 'log')")


def sk_prior_t2v(
    bank_sims_per_level: Sequence[jax.Array], n_iters: int = 4, domain: str = "plain"
) -> List[jax.Array]:
    """Per level, the log-prior [Nv] over test videos from a [Nq_train_texts, Nv] bank."""
    return [_sk(domain)(s, n_iters).col_log_prior for s in bank_sims_per_level]


def sk_prior_v2t(
    bank_sims_per_level: Sequence[jax.Array], n_iters: int = 4, domain: str = "plain"
) -> List[jax.Array]:
    """Per level, the log-prior [Nt] over test texts from a [Nt_test, Nv_train] bank.

    The bank is transposed first, as the original does, so the texts are the columns.
    """
    return [_sk(domain)(jnp.asarray(s).T, n_iters).col_log_prior for s in bank_sims_per_level]


def apply_sk_norm(
    test_sims_per_level: Sequence[jax.Array], priors: Sequence[jax.Array], direction: str = "t2v"
) -> jax.Array:
    """Mean over levels of ``S_l + prior_l`` (t2v: prior over columns; v2t: over rows)."""
    if len(test_sims_per_level) != len(priors):
        raise ValueError(f"{len(test_sims_per_level)} similarity levels but {len(priors)} priors")
    biased = []
    for s, p in zip(test_sims_per_level, priors):
        if direction == "t2v":
            if p.shape != (s.shape[1],):
                raise ValueError(f"t2v prior of shape {p.shape} for similarity {s.shape}")
            biased.append(s + p[None, :])
        elif direction == "v2t":
            if p.shape != (s.shape[0],):
                raise ValueError(f"v2t prior of shape {p.shape} for similarity {s.shape}")
            biased.append(s + p[:, None])
        else:
            raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}")
    return sum(biased) / len(biased)
