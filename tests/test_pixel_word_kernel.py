"""The native CPU level-3 kernel (ucofia_jax/kernels) against the pure-JAX reference.

Tolerance: the kernel sums in another order and uses its own exp, so it agrees with XLA to
float32 rounding, not bitwise; the 1/tau = 100 amplification of the softmax inputs makes that a
few 1e-7 relative on the level. We assert rtol 1e-5 / atol 1e-6 (10x tighter than the parity
bar of the head, rtol 1e-4 / atol 1e-5).

The kernel is built with the system C++ compiler; where there is none these tests skip (and
'auto' falls back to XLA, tested below). Where a compiler exists, a build failure fails here.
"""

import inspect
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucofia_jax.kernels import native
from ucofia_jax.models.head import UCoFiAHead
from ucofia_jax.models.model import Model
from ucofia_jax.ops import similarity as S
from ucofia_jax.ops.blockwise import blockwise_similarity

RTOL, ATOL = 1e-5, 1e-6

needs_compiler = pytest.mark.skipif(
    not any(map(shutil.which, ("c++", "g++", "clang++"))), reason="no C++ compiler here"
)


@pytest.fixture(scope="module")
def kernel():
    ok, reason = native.load()
    assert ok, f"native kernel did not build although a compiler exists: {reason}"
    return native


def _inputs(t, w, v, p, d=64, seed=0, pixel_scale=0.3):
    k = jax.random.split(jax.random.PRNGKey(seed), 8)
    words = S.l2_normalize(jax.random.normal(k[0], (t, w, d)))
    pixels = jax.random.normal(k[1], (v, p, d)) * pixel_scale
    near_eye = lambda i, n: jnp.eye(n) + 0.05 * jax.random.normal(k[i], (n, n))
    mats = S.IsaMatrices(jnp.eye(3), near_eye(2, w), near_eye(3, p), near_eye(4, p), near_eye(5, w))
    return words, pixels, mats


@needs_compiler
@pytest.mark.parametrize(
    "t,w,v,p",
    [
        (3, 32, 5, 48),  # MSR-VTT sizes (whole vectors)
        (4, 7, 19, 20),  # nothing a multiple of 16
        (1, 1, 1, 1),  # degenerate
        (2, 17, 33, 5),
    ],
)  # > 2 vectors of videos
def test_native_equals_xla(kernel, t, w, v, p):
    words, pixels, mats = _inputs(t, w, v, p, seed=t + w)
    ref = jax.jit(S.pixel_word)(words, pixels, mats, 0.01)
    got = jax.jit(lambda a, b, m: S.pixel_word(a, b, m, 0.01, after_gemm=native.level3_native))(
        words, pixels, mats
    )
    assert got.shape == (t, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@needs_compiler
def test_native_changes_when_a_matrix_changes(kernel):
    # Each of the four matrices must reach the output (a swapped or ignored argument would not).
    # A weight of 2 off the diagonal moves the argmax of the saturated second softmax.
    words, pixels, mats = _inputs(2, 8, 3, 12, seed=3)
    base = np.asarray(S.pixel_word(words, pixels, mats, 0.01, after_gemm=native.level3_native))
    for field in ("word_mat_weight", "pixel_mat_weight", "pixel_mat_weight2", "word_mat_weight2"):
        m = getattr(mats, field)
        changed = mats._replace(**{field: m + 2.0 * jnp.roll(jnp.eye(m.shape[0]), 1, axis=1)})
        got = np.asarray(
            S.pixel_word(words, pixels, changed, 0.01, after_gemm=native.level3_native)
        )
        ref = np.asarray(S.pixel_word(words, pixels, changed, 0.01))
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL, err_msg=field)
        assert np.abs(got - base).max() > 1e-4, field


@pytest.mark.slow
@needs_compiler
def test_native_tau_and_saturated_softmaxes(kernel):
    # tau = 0.01 with large gaps saturates the softmaxes (exp underflow); tau = 1 does not.
    words, pixels, mats = _inputs(3, 9, 4, 10, seed=7, pixel_scale=3.0)
    for tau in (0.01, 1.0):
        ref = S.pixel_word(words, pixels, mats, tau)
        got = S.pixel_word(words, pixels, mats, tau, after_gemm=native.level3_native)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=RTOL, atol=ATOL)


@needs_compiler
def test_native_nan_stays_in_its_pair(kernel):
    words, pixels, mats = _inputs(3, 6, 4, 8, seed=1)
    pixels = pixels.at[2, 5, 0].set(jnp.nan)  # video 2 only
    got = np.asarray(S.pixel_word(words, pixels, mats, 0.01, after_gemm=native.level3_native))
    assert np.isnan(got[:, 2]).all()
    assert np.isfinite(np.delete(got, 2, axis=1)).all()


@needs_compiler
def test_native_under_vmap_and_shape_errors(kernel):
    words, pixels, mats = _inputs(2, 5, 3, 6, seed=2)
    stacked = jnp.stack([pixels, 2 * pixels])
    got = jax.vmap(lambda px: S.pixel_word(words, px, mats, 0.01, after_gemm=native.level3_native))(
        stacked
    )
    ref = jax.vmap(lambda px: S.pixel_word(words, px, mats, 0.01))(stacked)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=RTOL, atol=ATOL)
    g = jnp.zeros((2, 5, 3, 6))
    with pytest.raises(ValueError, match=r"word_mat_weight2 has shape \(6, 6\), expected \(5, 5\)"):
        native.pixel_word_isa(
            g, mats.pixel_mat_weight, jnp.eye(6), mats.word_mat_weight, mats.pixel_mat_weight2, 0.01
        )
    with pytest.raises(ValueError, match="no masks"):
        S.pixel_word(
            words,
            pixels,
            mats,
            0.01,
            word_mask=jnp.ones((2, 5), bool),
            after_gemm=native.level3_native,
        )


@pytest.mark.slow
@needs_compiler
def test_head_blockwise_native_equals_xla(kernel):
    d, f, w, ntok, n_text, n_video = 64, 4, 8, 10, 7, 5
    h = UCoFiAHead(embed_dim=d, max_frames=f, max_words=w, seq_layers=1)
    r = np.random.default_rng(0)
    z = lambda *s: jnp.asarray(r.standard_normal(s, np.float32))
    params = h.init(
        jax.random.PRNGKey(0),
        z(1, d),
        z(1, w, d),
        z(1, f, d),
        z(1, f * ntok, d),
        jnp.ones((1, f)),
        0.0,
        rng=jax.random.PRNGKey(1),
    )
    txt = h.apply(params, z(n_text, d), z(n_text, w, d), method=h.encode_text)
    vid = h.apply(
        params,
        z(n_video, f, d),
        z(n_video, f * ntok, d),
        jnp.ones((n_video, f)),
        rng=jax.random.PRNGKey(2),
        method=h.encode_video,
        train=False,
    )
    inputs = h.apply(params, txt, vid, jnp.log(100.0), train=False, method=h.pair_inputs)
    pair_fns = {
        "xla": native.pair_levels_for("xla", mask_padding=False),
        "native": native.pair_levels_for("native", mask_padding=False),
    }
    out = {
        k: blockwise_similarity(
            fn,
            *inputs,
            text_block=3,
            video_block=2,
            video_block_fn=S.prepare_video_block,
        )
        for k, fn in pair_fns.items()
    }
    for level, (a, b) in enumerate(zip(out["native"], out["xla"])):
        tol = (RTOL, ATOL) if level == 2 else (0, 0)  # levels 1, 2 are the same XLA code
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=tol[0], atol=tol[1], err_msg=f"level {level + 1}"
        )
    assert native.resolve_level3_kernel("auto") == "native"  # on this CPU backend
    assert pair_fns["native"] is native.pair_levels_native
    assert pair_fns["xla"] is S.pair_levels
    assert native.pair_levels_for("auto", mask_padding=False) is native.pair_levels_native


def test_pair_function_choice():
    # Masked padding needs the XLA code: 'auto' falls back to it, 'native' is refused.
    assert native.pair_levels_for("auto", mask_padding=True) is S.pair_levels
    assert native.pair_levels_for("xla", mask_padding=True) is S.pair_levels
    with pytest.raises(ValueError, match="takes no masks"):
        native.pair_levels_for("native", mask_padding=True)
    with pytest.raises(ValueError, match="level3_kernel must be one of"):
        native.pair_levels_for("fast", mask_padding=False)
    # Training scores with the XLA code: the door's default pair function (Model.loss passes
    # none), never the kernel.
    assert inspect.signature(Model.score).parameters["pair_fn"].default is S.pair_levels


def test_auto_falls_back_without_compiler_and_native_says_why(tmp_path):
    # A fresh process with no compiler and an empty cache: 'auto' -> XLA (the evaluation's
    # pair function is the XLA one), 'native' -> an error naming the missing compiler.
    code = """
from ucofia_jax.kernels import native
from ucofia_jax.ops import similarity
print("auto:", native.resolve_level3_kernel("auto"))
print("auto pair function is XLA:", native.pair_levels_for("auto", mask_padding=False)
      is similarity.pair_levels)
try:
    native.resolve_level3_kernel("native")
except RuntimeError as e:
    print("native error:", e)
try:
    native.pair_levels_for("native", mask_padding=False)
except RuntimeError as e:
    print("native pair function error:", e)
try:
    native.resolve_level3_kernel("fast")
except ValueError as e:
    print("bad choice:", e)
"""
    env = {
        "CXX": "/nonexistent/c++",
        "UCOFIA_KERNEL_CACHE": str(tmp_path / "cache"),
        "JAX_PLATFORMS": "cpu",
        "PATH": "/usr/bin:/bin",
    }
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    assert "auto: xla" in p.stdout
    assert (
        "native error: level3_kernel='native' but the kernel is unavailable: no C++ "
        "compiler: '/nonexistent/c++' not found" in p.stdout
    )
    assert "auto pair function is XLA: True" in p.stdout
    assert "native pair function error: level3_kernel='native' but" in p.stdout
    assert (
        "bad choice: level3_kernel must be one of ('auto', 'xla', 'native'), got 'fast'" in p.stdout
    )


@pytest.mark.slow
@needs_compiler
def test_build_is_cached_per_source_and_reports_compile_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("UCOFIA_KERNEL_CACHE", str(tmp_path))
    first = native._build()
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == mtime  # cache hit
    assert not list(tmp_path.glob("*.partial"))
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(RuntimeError, match="building bad.cc failed"):
        native._build()
    assert not list(tmp_path.glob("*.partial"))  # no debris


@pytest.mark.slow
@needs_compiler
def test_native_gradient_is_the_xla_gradient(kernel):
    # The kernel has no derivative of its own: its custom VJP recomputes the XLA code's.
    words, pixels, mats = _inputs(2, 6, 3, 8, seed=4)
    loss = lambda after_gemm: (
        lambda a, b, m: jnp.sum(
            S.pixel_word(a, b, m, 0.01, after_gemm=after_gemm) * jnp.arange(1.0, 4.0)
        )
    )
    got = jax.grad(loss(native.level3_native), argnums=(0, 1, 2))(words, pixels, mats)
    ref = jax.grad(loss(None), argnums=(0, 1, 2))(words, pixels, mats)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(got)) > 0
