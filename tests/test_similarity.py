"""Similarity levels and loss against the fixture intermediates (training path, case_2)."""

import os

import jax.numpy as jnp
import numpy as np

from ucofia_jax.ops import similarity as S
from ucofia_jax.ops.losses import symmetric_cross_entropy

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ucofia_reference", "case_2.npz")


def _close(ours, ref, rtol=1e-4, atol=1e-5):
    ref = np.asarray(ref)
    bound = atol * max(1.0, np.abs(ref).max()) + rtol * np.abs(ref)
    assert np.all(np.abs(np.asarray(ours) - ref) <= bound), np.abs(np.asarray(ours) - ref).max()


def test_levels_match_fixture():
    z = np.load(FIX)
    j = lambda k: jnp.asarray(z[k])
    scale = jnp.exp(j("param.clip.logit_scale"))
    sent, words = j("train.sentence_feature"), j("train.word_features_norm")
    s1 = S.video_sentence(
        sent @ j("param.global_mat_weight"),
        j("train.video_feature") @ j("param.global_mat_weight_1"),
        scale,
    )
    _close(s1, z["train.sim_video_sentence"])
    s2 = S.sentence_frame(
        sent, j("train.frame_features_norm"), j("param.frame_logit_weight"), scale, 0.01
    )
    _close(s2, z["train.sim_sentence_frame"])
    mats = S.IsaMatrices(
        j("param.frame_logit_weight"),
        j("param.word_mat_weight"),
        j("param.pixel_mat_weight"),
        j("param.pixel_mat_weight2"),
        j("param.word_mat_weight2"),
    )
    s3, inter = S.pixel_word(
        words @ j("param.local_mat_weight"),
        j("train.pixel_tokens") @ j("param.local_mat_weight1"),
        mats,
        0.01,
        return_intermediates=True,
    )
    _close(s3, z["train.sim_pixel_word"])
    _close(jnp.transpose(inter["pixel_level_logit"], (0, 2, 1)), z["train.pw_pixel_level_logit"])
    _close(inter["word_level_logit"], z["train.pw_word_level_logit"])
    logits = S.combine_levels(s1, s2, s3)
    _close(logits, z["train.logits"])
    _close(symmetric_cross_entropy(logits), z["train.loss"])


def test_pair_levels_match_fixture():
    # The same levels through the typed pair inputs (what UCoFiAHead.pair_inputs returns).
    z = np.load(FIX)
    j = lambda k: jnp.asarray(z[k])
    scale = jnp.exp(j("param.clip.logit_scale"))
    sent = j("train.sentence_feature")
    text = S.TextPairInputs(
        sentence=sent,
        sentence_g=sent @ j("param.global_mat_weight"),
        words_l=j("train.word_features_norm") @ j("param.local_mat_weight"),
    )
    video = S.VideoPairInputs(
        video_g=j("train.video_feature") @ j("param.global_mat_weight_1"),
        frames=j("train.frame_features_norm"),
        pixels_l=j("train.pixel_tokens") @ j("param.local_mat_weight1"),
    )
    mats = S.IsaMatrices(
        j("param.frame_logit_weight"),
        j("param.word_mat_weight"),
        j("param.pixel_mat_weight"),
        j("param.pixel_mat_weight2"),
        j("param.word_mat_weight2"),
    )
    consts = S.PairConstants(mats=mats, scale=scale, scale3=jnp.float32(1.0), tau=jnp.float32(0.01))
    levels = S.pair_levels(text, video, consts)
    assert isinstance(levels, S.SimilarityLevels)
    _close(levels.video_sentence, z["train.sim_video_sentence"])
    _close(levels.sentence_frame, z["train.sim_sentence_frame"])
    _close(levels.patch_word, z["train.sim_pixel_word"])
    _close(levels.mean(), z["train.logits"])
    # The block-level GEMM operand (prepare_video_block) gives the same level 3.
    _close(S.pair_levels(text, S.prepare_video_block(video), consts).patch_word, levels.patch_word)


def test_level3_is_not_symmetric_in_its_directions():
    # s2p aggregates words first, v2w pixels first: swapping the ISA matrices must matter.
    r = np.random.RandomState(0)
    w, p = 5, 8
    mats = S.IsaMatrices(
        jnp.eye(2),
        *[jnp.asarray(np.eye(k) + 0.3 * r.randn(k, k), jnp.float32) for k in (w, p, p, w)],
    )
    words = jnp.asarray(r.randn(2, w, 16) * 0.05, jnp.float32)
    pix = jnp.asarray(r.randn(3, p, 16) * 0.05, jnp.float32)
    a = S.pixel_word(words, pix, mats, 0.01)
    b = S.pixel_word(
        words,
        pix,
        mats._replace(word_mat_weight=mats.word_mat_weight2, word_mat_weight2=mats.word_mat_weight),
        0.01,
    )
    assert a.shape == (2, 3) and np.abs(np.asarray(a - b)).max() > 1e-4


def test_symmetric_cross_entropy_numpy():
    x = np.random.RandomState(1).randn(4, 4)
    ls = lambda m: m - np.log(np.exp(m).sum(1, keepdims=True))
    ref = 0.5 * (-np.diag(ls(x)).mean() - np.diag(ls(x.T)).mean())
    np.testing.assert_allclose(
        float(symmetric_cross_entropy(jnp.asarray(x, jnp.float32))), ref, rtol=1e-6
    )
