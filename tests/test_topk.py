"""Perturbed top-k: exact indicator given the original's noise, and its diagonal VJP."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ucofia_jax.ops.topk import (
    _topk_by_insertion,
    _topk_sorted_indices,
    hard_topk,
    hash_normal,
    perturbed_topk,
)

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ucofia_reference", "case_3.npz")


def test_indicator_reproduces_the_original_with_its_noise():
    z = np.load(FIX)
    s = jnp.asarray(z["train.tokensel_pred_score"][:, 1:])
    ind = perturbed_topk(s, 3, 500, 0.05, noise=jnp.asarray(z["train.tokensel_noise"]))
    np.testing.assert_allclose(np.asarray(ind), z["train.tokensel_topk_indicator"], atol=1e-6)


def _numpy_reference(s, noise, k, sigma, g):
    pert = s[:, None, :] + sigma * noise
    idx = np.sort(np.argsort(-pert, axis=-1)[..., :k], axis=-1)  # 'b n k'
    y = np.eye(s.shape[-1])[idx]  # 'b n k d'
    ind = y.mean(1)
    e = (y * noise[:, :, None, :]).sum(1) / (noise.shape[1] * sigma)  # diagonal estimator
    return ind, (g * e).sum(1)


def test_vjp_is_the_diagonal_estimator():
    r = np.random.RandomState(0)
    s = r.randn(5, 9).astype(np.float32) * 0.1
    noise = r.randn(5, 40, 9).astype(np.float32)
    g = r.randn(5, 2, 9).astype(np.float32)
    ind_ref, grad_ref = _numpy_reference(s, noise, 2, 0.05, g)
    ind, vjp = jax.vjp(
        lambda s: perturbed_topk(s, 2, 40, 0.05, noise=jnp.asarray(noise)), jnp.asarray(s)
    )
    np.testing.assert_allclose(np.asarray(ind), ind_ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), grad_ref, rtol=1e-5, atol=1e-5)


def test_rng_path_and_slot_order():
    s = jnp.asarray([[0.9, -1.0, 0.8, -1.0, 0.7]], jnp.float32)
    ind = perturbed_topk(s, 3, 100, 0.01, rng=jax.random.PRNGKey(0))
    # slots are ordered by position: slot 0 -> index 0, slot 1 -> 2, slot 2 -> 4
    assert np.argmax(np.asarray(ind)[0], axis=-1).tolist() == [0, 2, 4]
    np.testing.assert_array_equal(np.asarray(hard_topk(s, 3)), np.asarray(ind).round())
    with pytest.raises(ValueError, match="rng"):
        perturbed_topk(s, 3, 100, 0.01)


def test_hash_normal_is_standard_normal_and_keyed():
    k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    x = np.asarray(hash_normal(k0, (200, 500, 49))).ravel()
    assert abs(x.mean()) < 5e-3 and abs(x.std() - 1) < 5e-3
    assert stats.kstest(x[:200_000], "norm").pvalue > 1e-3
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 5e-3  # neighbours
    np.testing.assert_array_equal(x[:1000], np.asarray(hash_normal(k0, (1000,))))  # row-major
    y = np.asarray(hash_normal(k1, (200, 500, 49))).ravel()
    assert abs(np.corrcoef(x, y)[0, 1]) < 5e-3 and not np.array_equal(x, y)


def test_noise_prng_hash_draws_hash_normal():
    s = jnp.asarray(np.random.RandomState(1).randn(4, 9) * 0.1, jnp.float32)
    k = jax.random.PRNGKey(3)
    a = perturbed_topk(s, 2, 50, 0.05, rng=k, noise_prng="hash")
    b = perturbed_topk(s, 2, 50, 0.05, noise=hash_normal(k, (4, 50, 9)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = perturbed_topk(s, 2, 50, 0.05, rng=k)  # threefry default
    d = perturbed_topk(s, 2, 50, 0.05, noise=jax.random.normal(k, (4, 50, 9)))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    with pytest.raises(ValueError, match="noise_prng"):
        perturbed_topk(s, 2, 50, 0.05, rng=k, noise_prng="mt19937")


@pytest.mark.parametrize("k", [1, 3, 4])
def test_sorted_indices_equal_lax_top_k_ties_included(k):
    # The insertion pass must pick exactly lax.top_k's set (lower position first among equal
    # values) -- heavy ties from rounding, and rows lax.top_k ranks that insertion cannot
    # (NaN, too many -inf) going through the fallback.
    r = np.random.RandomState(k)
    x = np.round(r.randn(3000, 49) * 2) / 2  # many ties
    x[:5] = 1.0  # all equal
    x = x.astype(np.float32)
    ref = np.sort(np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1]), -1)
    fast, ok = jax.jit(lambda a: _topk_by_insertion(a, k))(jnp.asarray(x))
    assert bool(np.all(np.asarray(ok)))
    np.testing.assert_array_equal(np.sort(np.stack(fast, -1), -1), ref)
    np.testing.assert_array_equal(np.asarray(_topk_sorted_indices(jnp.asarray(x), k)), ref)
    bad = x.copy()
    bad[7, 3] = np.nan
    bad[9, : 49 - k + 1] = -np.inf  # only k-1 finite
    ok = np.asarray(_topk_by_insertion(jnp.asarray(bad), k)[1])
    assert not ok[7] and not ok[9] and ok[8]
    np.testing.assert_array_equal(
        np.asarray(_topk_sorted_indices(jnp.asarray(bad), k)),
        np.sort(np.asarray(jax.lax.top_k(jnp.asarray(bad), k)[1]), -1),
    )
