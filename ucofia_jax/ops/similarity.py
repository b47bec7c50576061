"""The three similarity levels of UCoFiA (SPEC §6) as pure functions.

Inputs are *prepared* features (what ``UCoFiAHead.encode_text`` / ``encode_video`` return,
after the D x D projections of ``project_text`` / ``project_video``), so that this module can
run on any (text block, video block) pair: every softmax lives inside one (text, video) pair,
which is what makes blockwise evaluation exact.

Shapes: t texts, v videos, w words, f frames, p kept visual tokens (4 per frame), d width.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ucofia_jax.ops.isa import TAU, isa_aggregate, isa_weights


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    # torch `x / x.norm(dim=-1, keepdim=True)` (no epsilon, as the original).
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


class IsaMatrices(NamedTuple):
    frame_logit_weight: jax.Array  # [f, f]
    word_mat_weight: jax.Array  # [w, w]  words, per pixel
    pixel_mat_weight: jax.Array  # [p, p]  pixels, per word
    pixel_mat_weight2: jax.Array  # [p, p]  second stage over pixels
    word_mat_weight2: jax.Array  # [w, w]  second stage over words


def video_sentence(sent_g: jax.Array, video_g: jax.Array, scale: jax.Array) -> jax.Array:
    """Level 1: ``scale * (sent Wg) . (video Wg1)``; inputs already projected.

    sent_g 't d', video_g 'v d' -> 't v'.
    """
    return scale * jnp.einsum("td,vd->tv", sent_g, video_g)


def sentence_frame(
    sent: jax.Array,
    frames: jax.Array,
    w_frame: jax.Array,
    scale: jax.Array,
    tau: float = TAU,
    frame_mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Level 2: ISA over frames of the sentence-frame cosines.

    sent 't d' (normalised), frames 'v f d' (normalised raw CLIP frame CLS) -> 't v'.
    ``frame_mask`` 'v f' (bool) only when padded frames are excluded (not the original).
    """
    s = jnp.einsum("td,vfd->tvf", sent, frames)
    mask = None if frame_mask is None else frame_mask[None, :, :]
    return scale * isa_aggregate(s, w_frame, axis=-1, tau=tau, mask=mask)


def fine_grained(words_l: jax.Array, pixels_l: jax.Array) -> jax.Array:
    """G = (words Wl) . (pixels Wl1): 't w d', 'v p d' -> 't v w p'."""
    return jnp.einsum("twd,vpd->tvwp", words_l, pixels_l)


def prepare_video_block(video: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """Once per video block (``blockwise_similarity(video_block_fn=...)``): the selected tokens
    as the level-3 GEMM wants its right operand, 'd (v p)'. Without it, XLA:CPU transposes
    the block's 'v p d' tokens again for every text block (7-9% of level 3 in block-level
    runs at 50 x 50).
    """
    v, p, d = video["pixels_l"].shape
    return dict(video, pixels_dvp=video["pixels_l"].reshape(v * p, d).T)


def pixel_word(
    words_l: jax.Array,
    pixels_l: jax.Array,
    mats: IsaMatrices,
    tau: float = TAU,
    word_mask: Optional[jax.Array] = None,
    pixel_mask: Optional[jax.Array] = None,
    return_intermediates: bool = False,
    pixels_dvp: Optional[jax.Array] = None,
    native: bool = False,
):
    """Level 3 (no logit scale in the original): two ISA stages in two directions.

    words_l 't w d' (normalised words times Wl), pixels_l 'v p d' (selected tokens, not
    normalised, times Wl1 in training) -> 't v'. Masks ('t w', 'v p' bool) only when padding
    is excluded (not the original). ``pixels_dvp``: the same tokens as 'd (v p)' (see
    ``prepare_video_block``), used for the GEMM when given. ``native``: everything after the
    GEMM runs in the fused CPU kernel ``kernels.native.pixel_word_isa`` (no masks, no
    intermediates; same values to float32 rounding; gradients are the XLA code's).
    """
    # Layouts are chosen so that every softmax / ISA GEMM / weighted sum runs along the last
    # (contiguous) axis: G comes out of the GEMM as 't w v p' (dot_general's natural order, no
    # transpose) for the pixel direction, and is transposed once to 't v p w' for the word
    # direction (before: 't v w p' plus two transposes inside the word-axis ISA; ~1.5x slower
    # on CPU, same values up to float32 summation order).
    if pixels_dvp is None:
        g = jnp.einsum("twd,vpd->twvp", words_l, pixels_l)  # 't w v p'
    else:
        (t, w, d), (v, p) = words_l.shape, pixels_l.shape[:2]
        g = (words_l.reshape(t * w, d) @ pixels_dvp).reshape(t, w, v, p)
    if native:
        if word_mask is not None or pixel_mask is not None or return_intermediates:
            raise ValueError(
                "the native pixel-word kernel takes no masks and returns no "
                "intermediates; use native=False"
            )
        return _level3_native(g, mats, jnp.asarray(tau, jnp.float32))
    return _level3_from_g(g, mats, tau, word_mask, pixel_mask, return_intermediates)


def _level3_from_g(
    g, mats: IsaMatrices, tau, word_mask=None, pixel_mask=None, return_intermediates: bool = False
):
    # g 't w v p' -> 't v' (and the intermediates): both ISA directions and second stages.
    # Aggregate pixels for every word, then words (video -> word).
    pm = None if pixel_mask is None else pixel_mask[None, None, :, :]
    pix_w = isa_weights(g, mats.pixel_mat_weight, axis=-1, tau=tau, mask=pm)  # 't w v p'
    pixel_level = jnp.swapaxes(jnp.sum(g * pix_w, axis=-1), 1, 2)  # 't v w'
    wm2 = None if word_mask is None else word_mask[:, None, :]
    v2w_w = isa_weights(pixel_level, mats.word_mat_weight2, axis=-1, tau=tau, mask=wm2)
    v2w = jnp.sum(pixel_level * v2w_w, axis=-1)  # 't v'
    # Aggregate words for every pixel, then pixels (sentence -> pixel).
    gt = jnp.transpose(g, (0, 2, 3, 1))  # 't v p w'
    wm = None if word_mask is None else word_mask[:, None, None, :]
    word_w = isa_weights(gt, mats.word_mat_weight, axis=-1, tau=tau, mask=wm)  # 't v p w'
    word_level = jnp.sum(gt * word_w, axis=-1)  # 't v p'
    pm2 = None if pixel_mask is None else pixel_mask[None, :, :]
    s2p_w = isa_weights(word_level, mats.pixel_mat_weight2, axis=-1, tau=tau, mask=pm2)
    s2p = jnp.sum(word_level * s2p_w, axis=-1)  # 't v'
    out = 0.5 * (s2p + v2w)
    if not return_intermediates:
        return out
    tvwp = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # 't w v p' ->
    return out, dict(
        fine_grained_sim=tvwp(g),
        word_isa_weights=jnp.swapaxes(word_w, 2, 3),
        word_level_logit=word_level,
        pixel_isa_weights=tvwp(pix_w),
        pixel_level_logit=pixel_level,
        sent2pixel_isa_weights=s2p_w,
        sent2pixel_logit=s2p,
        video2word_isa_weights=v2w_w,
        video2word_logit=v2w,
    )


@jax.custom_vjp
def _level3_native(g, mats: IsaMatrices, tau):
    """``_level3_from_g`` in the native CPU kernel. Its gradient is that of the XLA code
    (recomputed in the backward pass), so differentiating an evaluation path still works."""
    from ucofia_jax.kernels.native import pixel_word_isa

    return pixel_word_isa(
        g,
        mats.pixel_mat_weight,
        mats.word_mat_weight2,
        mats.word_mat_weight,
        mats.pixel_mat_weight2,
        tau,
    )


def _level3_native_fwd(g, mats, tau):
    return _level3_native(g, mats, tau), (g, mats, tau)


def _level3_native_bwd(residuals, cotangent):
    return jax.vjp(_level3_from_g, *residuals)[1](cotangent)


_level3_native.defvjp(_level3_native_fwd, _level3_native_bwd)


def pair_levels(
    text: Dict[str, jax.Array],
    video: Dict[str, jax.Array],
    shared: Dict,
    tau: float = TAU,
    native_level3: bool = False,
):
    """(S1, S2, S3) ['t v'] from projected text/video features (see UCoFiAHead.project_*).

    text: 'sentence' 't d', 'sentence_g' 't d', 'words_l' 't w d', optional 'word_mask'.
    video: 'video_g' 'v d', 'frame_features' 'v f d', 'pixels_l' 'v p d', optional
    'frame_mask', 'pixel_mask', 'pixels_dvp' (``prepare_video_block``). shared: 'mats'
    (IsaMatrices), 'scale' [], 'scale3' [], optional 'tau' (overrides the argument; lets
    blockwise kernels keep one stable pair_fn). ``native_level3``: level 3 after its GEMM in
    the fused CPU kernel (``pixel_word(native=True)``).
    """
    mats = shared["mats"]
    tau = shared.get("tau", tau)
    s1 = video_sentence(text["sentence_g"], video["video_g"], shared["scale"])
    s2 = sentence_frame(
        text["sentence"],
        video["frame_features"],
        mats.frame_logit_weight,
        shared["scale"],
        tau,
        video.get("frame_mask"),
    )
    s3 = shared["scale3"] * pixel_word(
        text["words_l"],
        video["pixels_l"],
        mats,
        tau,
        text.get("word_mask"),
        video.get("pixel_mask"),
        pixels_dvp=video.get("pixels_dvp"),
        native=native_level3,
    )
    return s1, s2, s3


def pair_levels_native(text: Dict[str, jax.Array], video: Dict[str, jax.Array], shared: Dict):
    """``pair_levels`` with level 3 in the native CPU kernel: a stable module-level pair_fn for
    ``blockwise_similarity`` (``UCoFiAHead.level3_kernel``)."""
    return pair_levels(text, video, shared, native_level3=True)


def combine_levels(s1: jax.Array, s2: jax.Array, s3: jax.Array) -> jax.Array:
    """Training / plain-eval similarity: the mean of the three levels (line 370)."""
    return (s1 + s2 + s3) / 3.0
