"""Blockwise N x M similarity == one-shot, with padding, several block sizes and a 4-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ucofia_jax.kernels import native
from ucofia_jax.models.head import UCoFiAHead
from ucofia_jax.ops.blockwise import blockwise_similarity, map_in_blocks
from ucofia_jax.ops.similarity import (
    IsaMatrices,
    PairConstants,
    TextPairInputs,
    VideoPairInputs,
    pair_levels,
    prepare_video_block,
)

D, F, NW, NTOK = 64, 3, 5, 6
P = 4 * F


def _inputs(n, m, seed=0):
    r = np.random.RandomState(seed)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    text = TextPairInputs(
        sentence=norm(r.randn(n, D)),
        sentence_g=r.randn(n, D) * 0.2,
        words_l=norm(r.randn(n, NW, D)),
    )
    video = VideoPairInputs(
        video_g=r.randn(m, D) * 0.2,
        frames=norm(r.randn(m, F, D)),
        pixels_l=r.randn(m, P, D) * 0.3,
    )
    mats = IsaMatrices(*[np.eye(k) + 0.1 * r.randn(k, k) for k in (F, NW, P, P, NW)])
    cast = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t)
    consts = PairConstants(mats=mats, scale=100.0, scale3=1.0, tau=0.01)
    return cast(text), cast(video), cast(consts)


@pytest.mark.slow
@pytest.mark.parametrize("tb,vb", [(4, 3), (32, 32)])
def test_blockwise_equals_one_shot(tb, vb):
    text, video, shared = _inputs(13, 10)
    ref = pair_levels(text, video, shared)
    got = blockwise_similarity(pair_levels, text, video, shared, text_block=tb, video_block=vb)
    for r, g in zip(ref, got):
        assert g.shape == (13, 10)
        # Blocks change XLA's float32 summation order; the rounding scales with the largest
        # terms summed (|scores| up to ~50 here), not with each entry, hence atol relative to
        # the matrix's largest entry (a 1.15 entry was 6.9e-6 off on an AMD EPYC host).
        r = np.asarray(r)
        np.testing.assert_allclose(np.asarray(g), r, rtol=2e-6, atol=2e-6 * np.abs(r).max())


@pytest.mark.slow
def test_blockwise_sharded_over_mesh():
    devices = np.array(jax.devices()[:4])
    if devices.size < 4:
        pytest.skip("needs 4 (virtual) devices, see conftest")
    mesh = Mesh(devices, ("data",))
    text, video, shared = _inputs(9, 7, seed=1)
    ref = pair_levels(text, video, shared)
    got = blockwise_similarity(
        pair_levels, text, video, shared, text_block=2, video_block=4, mesh=mesh
    )
    for r, g in zip(ref, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-6, atol=2e-6)


def test_blockwise_rejects_ragged_inputs():
    text, video, shared = _inputs(5, 4)
    text = text._replace(sentence=text.sentence[:3])
    with pytest.raises(ValueError, match="same leading"):
        blockwise_similarity(pair_levels, text, video, shared, text_block=2, video_block=2)


def test_map_in_blocks_crops_and_matches():
    x = jnp.arange(22.0).reshape(11, 2)
    out = map_in_blocks(lambda b: {"y": b["x"] * 2}, {"x": x}, block=4)
    np.testing.assert_array_equal(np.asarray(out["y"]), np.asarray(x) * 2)


@pytest.mark.slow
@pytest.mark.parametrize("level3_kernel", ["xla", "auto"])
def test_head_pair_inputs_blockwise_equal_one_shot(level3_kernel):
    # 'auto' is the evaluation's default: the native level-3 kernel where it builds (CPU).
    pair_fn = native.pair_levels_for(level3_kernel, mask_padding=False)
    head = UCoFiAHead(embed_dim=D, max_frames=F, max_words=NW, seq_layers=1)
    r = np.random.RandomState(3)
    n, m = 6, 5
    tc, tt = jnp.asarray(r.randn(n, D), jnp.float32), jnp.asarray(r.randn(n, NW, D), jnp.float32)
    fc = jnp.asarray(r.randn(m, F, D), jnp.float32)
    pt = jnp.asarray(r.randn(m, F * NTOK, D), jnp.float32)
    vm = jnp.ones((m, F), jnp.int32)
    params = head.init(
        jax.random.PRNGKey(0),
        tc[:1],
        tt[:1],
        fc[:1],
        pt[:1],
        vm[:1],
        0.0,
        rng=jax.random.PRNGKey(1),
    )

    def run(mod):
        t = mod.encode_text(tc, tt)
        v = mod.encode_video(fc, pt, vm, rng=jax.random.PRNGKey(2))
        inputs = mod.pair_inputs(t, v, jnp.log(100.0), train=False)
        one = pair_fn(*inputs)
        blk = blockwise_similarity(
            pair_fn,
            *inputs,
            text_block=4,
            video_block=2,
            video_block_fn=prepare_video_block,
        )
        return one, blk

    one, blk = jax.jit(lambda p: head.apply(p, method=run))(params)
    for a, b in zip(one, blk):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-6, atol=2e-6)
