"""The three similarity levels of UCoFiA (SPEC §6) as pure functions.

Inputs are the *pair inputs* of ``UCoFiAHead.pair_inputs``: text and video features after the
head's D x D projections (``TextPairInputs``, ``VideoPairInputs``) and what every pair shares
(``PairConstants``). Every softmax lives inside one (text, video) pair, so ``pair_levels`` can
run on any (text block, video block) pair, which is what makes blockwise evaluation exact.

Level 3 after its GEMM is a parameter (``after_gemm``) so that a faster implementation of the
same maths (``ucofia_jax.kernels.native``) can be passed in from above; this module imports
no kernel.

Shapes: t texts, v videos, w words, f frames, p kept visual tokens (4 per frame), d width.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ucofia_jax.ops.isa import isa_aggregate, isa_weights


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
    tau: float,
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


class TextPairInputs(NamedTuple):
    """Per text, after the head's projections (``UCoFiAHead.pair_inputs``)."""

    sentence: jax.Array  # 't d'   L2-normalised sentence feature (level 2)
    sentence_g: jax.Array  # 't d'   sentence times global_mat_weight (level 1)
    words_l: jax.Array  # 't w d' normalised words times local_mat_weight (level 3)
    word_mask: Optional[jax.Array] = None  # 't w' bool; only when padding is masked


class VideoPairInputs(NamedTuple):
    """Per video, after the head's projections (``UCoFiAHead.pair_inputs``)."""

    video_g: jax.Array  # 'v d'   video feature times global_mat_weight_1 (level 1)
    frames: jax.Array  # 'v f d' L2-normalised frame CLS features (level 2)
    pixels_l: jax.Array  # 'v p d' selected tokens (times local_mat_weight1 in training)
    frame_mask: Optional[jax.Array] = None  # 'v f' bool; only when padding is masked
    pixel_mask: Optional[jax.Array] = None  # 'v p' bool; only when padding is masked
    pixels_dvp: Optional[jax.Array] = None  # 'd (v p)': see prepare_video_block


class PairConstants(NamedTuple):
    """What every (text, video) pair shares: the ISA matrices, logit scales and tau."""

    mats: IsaMatrices
    scale: jax.Array  # [] exp(logit_scale), levels 1 and 2
    scale3: jax.Array  # [] level 3's scale (1 in the original)
    tau: jax.Array  # [] ISA softmax temperature


class SimilarityLevels(NamedTuple):
    """The three levels ['t v'] of every (text, video) pair; their mean is the score."""

    video_sentence: jax.Array
    sentence_frame: jax.Array
    patch_word: jax.Array

    def mean(self) -> jax.Array:
        return combine_levels(*self)


def prepare_video_block(video: VideoPairInputs) -> VideoPairInputs:
    """Once per video block (``blockwise_similarity(video_block_fn=...)``): the selected tokens
    as the level-3 GEMM wants its right operand, 'd (v p)'. Without it, XLA:CPU transposes
    the block's 'v p d' tokens again for every text block (7-9% of level 3 in block-level
    runs at 50 x 50).
    """
    v, p, d = video.pixels_l.shape
    return video._replace(pixels_dvp=video.pixels_l.reshape(v * p, d).T)


# after_gemm(g 't w v p', mats, tau) -> 't v': level 3 once its GEMM is done.
Level3AfterGemm = Callable[[jax.Array, IsaMatrices, jax.Array], jax.Array]


def pixel_word(
    words_l: jax.Array,
    pixels_l: jax.Array,
    mats: IsaMatrices,
    tau: float,
    word_mask: Optional[jax.Array] = None,
    pixel_mask: Optional[jax.Array] = None,
    return_intermediates: bool = False,
    pixels_dvp: Optional[jax.Array] = None,
    after_gemm: Optional[Level3AfterGemm] = None,
):
    """Level 3 (no logit scale in the original): two ISA stages in two directions.

    words_l 't w d' (normalised words times Wl), pixels_l 'v p d' (selected tokens, not
    normalised, times Wl1 in training) -> 't v'. Masks ('t w', 'v p' bool) only when padding
    is excluded (not the original). ``pixels_dvp``: the same tokens as 'd (v p)' (see
    ``prepare_video_block``), used for the GEMM when given. ``after_gemm``: another
    implementation of ``level3_from_g`` (same maths; no masks, no intermediates), e.g. the
    native CPU kernel.
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
    if after_gemm is not None:
        if word_mask is not None or pixel_mask is not None or return_intermediates:
            raise ValueError(
                "pixel_word(after_gemm=...) takes no masks and returns no intermediates; "
                "use the default (after_gemm=None)"
            )
        return after_gemm(g, mats, jnp.asarray(tau, jnp.float32))
    return level3_from_g(g, mats, tau, word_mask, pixel_mask, return_intermediates)


def level3_from_g(
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


def pair_levels(
    text: TextPairInputs,
    video: VideoPairInputs,
    consts: PairConstants,
    after_gemm: Optional[Level3AfterGemm] = None,
) -> SimilarityLevels:
    """The three levels ['t v'] of every pair of a text block and a video block.

    ``after_gemm``: see ``pixel_word``; None is the XLA code (``level3_from_g``).
    """
    mats, scale = consts.mats, consts.scale
    s1 = video_sentence(text.sentence_g, video.video_g, scale)
    s2 = sentence_frame(
        text.sentence, video.frames, mats.frame_logit_weight, scale, consts.tau, video.frame_mask
    )
    s3 = consts.scale3 * pixel_word(
        text.words_l,
        video.pixels_l,
        mats,
        consts.tau,
        text.word_mask,
        video.pixel_mask,
        pixels_dvp=video.pixels_dvp,
        after_gemm=after_gemm,
    )
    return SimilarityLevels(s1, s2, s3)


def combine_levels(s1: jax.Array, s2: jax.Array, s3: jax.Array) -> jax.Array:
    """Training / plain-eval similarity: the mean of the three levels (line 370)."""
    return (s1 + s2 + s3) / 3.0
