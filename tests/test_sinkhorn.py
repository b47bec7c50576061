"""Sinkhorn-Knopp: the original plain form on fixture banks, log == plain where finite,
the log form finite where plain overflows, NaN/inf reported, SK priors and their use."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucofia_jax.ops.sinkhorn import (
    apply_sk_norm,
    sinkhorn_knopp,
    sinkhorn_knopp_log,
    sk_prior_t2v,
    sk_prior_v2t,
)

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ucofia_reference")


def _np_sk(s, n=4):  # the original, in float64
    m = s.max()
    k = np.exp(s - m)
    b = 1 / k.sum(0)
    for _ in range(n):
        a = 1 / (k @ b)
        b = 1 / (a @ k)
    ls = lambda x: x - np.log(np.exp(x - x.max()).sum()) - x.max()
    return ls(np.log(a)), ls(np.log(b) - m), a, b


@pytest.mark.parametrize("case", ["case_1", "case_3"])
def test_plain_matches_fixture(case):
    z = np.load(os.path.join(FIX, case + ".npz"))
    for l in (1, 2, 3):
        r = sinkhorn_knopp(jnp.asarray(z[f"sk_t2v.train_sim_{l}"]))
        for ours, key in [(r.a, "a"), (r.b, "b")]:
            ref = z[f"sk_t2v.{key}_{l}"]
            assert np.all(np.abs(np.asarray(ours) - ref) <= 1e-5 * np.abs(ref))
        np.testing.assert_allclose(
            np.asarray(r.col_log_prior), z[f"sk_t2v.video_bias_{l}"], atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(r.row_log_prior), z[f"sk_t2v.text_bias_{l}"], atol=1e-4
        )


def test_log_equals_plain_where_finite_and_survives_overflow():
    r = np.random.RandomState(0)
    s = r.randn(30, 7).astype(np.float32) * 3
    p, l = sinkhorn_knopp(jnp.asarray(s)), sinkhorn_knopp_log(jnp.asarray(s))
    for a, b in zip(p, l):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)
    ref = _np_sk(s.astype(np.float64))
    np.testing.assert_allclose(np.asarray(l.col_log_prior), ref[1], atol=2e-5)
    # Scaled logits with a 200-nat spread: exp underflows, 1/(K b) overflows in the plain form.
    s_big = s.copy()
    s_big[0] += 200.0
    plain = sinkhorn_knopp(jnp.asarray(s_big))
    assert not np.all(np.isfinite(np.asarray(plain.row_log_prior)))
    lg = sinkhorn_knopp_log(jnp.asarray(s_big))
    assert np.all(np.isfinite(np.asarray(lg.row_log_prior)))
    assert np.all(np.isfinite(np.asarray(lg.col_log_prior)))
    np.testing.assert_allclose(np.exp(np.asarray(lg.col_log_prior)).sum(), 1.0, rtol=1e-5)


def test_nan_and_inf_are_reported():
    s = np.zeros((3, 4), np.float32)
    s[1, 2] = np.nan
    with pytest.raises(FloatingPointError, match="1 NaN"):
        sinkhorn_knopp(jnp.asarray(s))
    s[1, 2] = np.inf
    with pytest.raises(FloatingPointError, match="1 inf"):
        sinkhorn_knopp_log(jnp.asarray(s))
    with pytest.raises(Exception, match="NaN"):  # also under jit (runtime callback)
        jax.block_until_ready(
            jax.jit(lambda x: sinkhorn_knopp(x).a)(jnp.asarray(np.where(np.isinf(s), np.nan, s)))
        )


def test_priors_and_apply_on_fixture():
    z = np.load(os.path.join(FIX, "case_2.npz"))
    banks = [jnp.asarray(z[f"sk_t2v.train_sim_{l}"]) for l in (1, 2, 3)]
    tests = [
        jnp.asarray(z[f"evalt2v.sim_{k}"])
        for k in ("video_sentence", "sentence_frame", "pixel_word")
    ]
    final = apply_sk_norm(tests, sk_prior_t2v(banks), "t2v")
    np.testing.assert_allclose(np.asarray(final), z["sk_t2v.final_sim"], atol=1e-4)
    banks = [jnp.asarray(z[f"sk_v2t.train_sim_{l}"]) for l in (1, 2, 3)]
    tests = [
        jnp.asarray(z[f"evalv2t.sim_{k}"])
        for k in ("video_sentence", "sentence_frame", "pixel_word")
    ]
    pri = sk_prior_v2t(banks)
    for l, p in enumerate(pri, 1):
        np.testing.assert_allclose(np.asarray(p), z[f"sk_v2t.text_bias_{l}"], atol=1e-5)
    final = apply_sk_norm(tests, pri, "v2t")
    np.testing.assert_allclose(np.asarray(final), z["sk_v2t.final_sim"], atol=1e-4)
    # log domain gives the same priors here
    pri_log = sk_prior_v2t(banks, domain="log")
    for a, b in zip(pri, pri_log):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="v2t prior"):
        apply_sk_norm(tests, sk_prior_t2v([jnp.ones((2, 5))] * 3), "v2t")
