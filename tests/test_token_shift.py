"""Token shift against a literal numpy statement of SPEC §3 and the original's golden outputs.

``data/patchshift_cases.npz`` holds ``patchshift.in``/``patchshift.out`` copied from the
golden fixtures (``case_{1,2,3}``: N = 50, 17, 10 tokens; F = 12, 6, 4 frames), layout
``[N, F, C]`` (sequence-first, one video), what ``PatchShiftModule`` hands to attention.
"""

import os

import jax
import numpy as np
import pytest

from ucofia_jax.ops.token_shift import token_shift

DATA = os.path.join(os.path.dirname(__file__), "data", "patchshift_cases.npz")


def spec_shift(x, num_frames, n_div=7):
    """SPEC §3 written as loops: x 'bf n c'."""
    bf, n, c = x.shape
    v = x.reshape(bf // num_frames, num_frames, n, c)
    out = v.copy()
    fold = n // n_div
    for t in range(num_frames):
        if t >= 1:
            for j in range(1, n, fold):
                out[:, t, j] = v[:, t - 1, j]
    for t in range(num_frames):
        if t <= num_frames - 2:
            for j in range(4, n, fold):  # right shift written last
                out[:, t, j] = v[:, t + 1, j]
    return out.reshape(bf, n, c)


@pytest.mark.parametrize(
    "b,f,n,c",
    [
        (2, 12, 50, 5),
        (3, 6, 17, 3),
        (1, 4, 10, 2),
        (2, 3, 8, 4),
        (2, 1, 50, 3),
        (1, 8, 197, 2),
        (1, 2, 257, 1),
    ],
)
def test_matches_spec_rule(b, f, n, c):
    x = np.random.default_rng(n).normal(size=(b * f, n, c)).astype(np.float32)
    got = np.asarray(jax.jit(token_shift, static_argnums=(1,))(x, f))
    np.testing.assert_array_equal(got, spec_shift(x, f))


@pytest.mark.parametrize("case", [1, 2, 3])
def test_matches_golden_fixture(case):
    z = np.load(DATA)
    x_in, x_out = z[f"case_{case}.in"], z[f"case_{case}.out"]  # [N, F, C]
    n, f, c = x_in.shape
    got = np.asarray(token_shift(x_in.transpose(1, 0, 2), f))  # 'f n c', one video
    np.testing.assert_array_equal(got.transpose(1, 0, 2), x_out)


def test_errors():
    with pytest.raises(ValueError, match="token_shift.py"):
        token_shift(np.zeros((5, 50, 2), np.float32), 2)
    with pytest.raises(ValueError, match="token_shift.py"):
        token_shift(np.zeros((2, 5, 2), np.float32), 2)


def test_gradient_is_the_transposed_shift():
    # token_shift is linear, so its VJP moves cotangents back to the source tokens.
    x = np.random.default_rng(0).normal(size=(6, 17, 3)).astype(np.float32)
    g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    _, vjp = jax.vjp(lambda v: token_shift(v, 3), x)
    (gx,) = vjp(g)
    # <shift(x), g> == <x, shift^T(g)>
    np.testing.assert_allclose(np.sum(spec_shift(x, 3) * g), np.sum(x * np.asarray(gx)), rtol=1e-5)
