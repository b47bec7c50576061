"""The model's one door (``models.model.Model``) on a tiny config: built from the config schema,
blockwise scoring == one-shot, the training logits and loss, the typed features as pytrees,
the text mask, and masked padding reaching the maths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import random_arrays, tiny_config
from jax.sharding import Mesh

from ucofia_jax.config import base_config
from ucofia_jax.kernels import native
from ucofia_jax.models.clip import CLIPConfig
from ucofia_jax.models.features import TextFeatures, VideoFeatures
from ucofia_jax.models.head import UCoFiAHead
from ucofia_jax.models.model import HEAD_INIT_KEYS, Blocks, Model
from ucofia_jax.ops import similarity

# Head fields that are sizes (from CLIP and the data), and flax's own Module fields.
HEAD_SIZES = ("embed_dim", "max_frames", "max_words")
MODULE_FIELDS = ("parent", "name")
SET_BY_MODEL = ("remat",)  # from config.model.remat: one switch for CLIP and the head
N_TEXT, N_VIDEO = 7, 5  # block sizes below do not divide these


def _model(config):
    return Model.from_config(
        config.model, max_frames=config.data.max_frames, max_words=config.data.max_words
    )


def _padded_ids(config, lengths, seed=0):
    """Token ids as the tokenizer lays them out: SOT, words, EOT (the largest id), zeros."""
    vocab, w = config.model.clip.vocab_size, config.data.max_words
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), w), np.int32)
    for i, n in enumerate(lengths):  # n = real tokens, SOT and EOT included
        ids[i, 0] = vocab - 2
        ids[i, 1 : n - 1] = rng.integers(1, vocab - 2, n - 2)
        ids[i, n - 1] = vocab - 1
    return ids


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = _model(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    arrays = random_arrays(N_VIDEO, config, seed=1)
    lengths = [2, 8, 5, 3, 8, 6, 4]  # padding in most captions
    ids = jnp.asarray(_padded_ids(config, lengths))
    frame_mask = np.ones((N_VIDEO, config.data.max_frames), np.int32)
    frame_mask[1, 1:] = 0  # padded frames in two videos
    frame_mask[3, -1] = 0
    encode_text = jax.jit(model.encode_text)
    encode_video = jax.jit(lambda p, f, m, r: model.encode_video(p, f, m, r))
    text = encode_text(params, ids)
    video = encode_video(
        params, jnp.asarray(arrays["frames"]), jnp.asarray(frame_mask), jax.random.PRNGKey(2)
    )
    return dict(
        config=config,
        model=model,
        params=params,
        ids=ids,
        lengths=lengths,
        text=text,
        video=video,
    )


def _assert_levels_close(got, ref, rtol=1e-5, atol=1e-6):
    assert isinstance(got, similarity.SimilarityLevels)
    for name, g, r in zip(similarity.SimilarityLevels._fields, got, ref):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=rtol, atol=atol, err_msg=name)


# --------------------------------------------------------------------------- (a) the schema


def test_schema_defaults_are_the_modules_defaults():
    # config.model.head is UCoFiAHead's fields (plus how to initialise): one set of defaults.
    head_defaults = {
        f.name: f.default
        for f in dataclasses.fields(UCoFiAHead)
        if f.name not in HEAD_SIZES + MODULE_FIELDS + SET_BY_MODEL
    }
    schema = base_config().model
    head = {k: v for k, v in schema.head.items() if k not in HEAD_INIT_KEYS}
    assert head == head_defaults
    assert schema.head.init_temporal_from_clip is True
    # config.model.clip is CLIPConfig's fields (plus checkpoint, from_scratch); the one documented
    # difference: the recipe shifts tokens in visual blocks 10 and 11 (TS2-Net).
    clip_defaults = {f.name: f.default for f in dataclasses.fields(CLIPConfig)}
    clip = {k: v for k, v in schema.clip.items() if k not in ("checkpoint", "from_scratch")}
    assert clip_defaults["token_shift_blocks"] == ()
    assert clip == {**clip_defaults, "token_shift_blocks": (10, 11)}
    assert schema.clip.checkpoint == ""


@pytest.mark.parametrize("which", ["base", "tiny"])
def test_from_config_builds_the_configured_head(which):
    config = base_config() if which == "base" else tiny_config()
    if which == "tiny":  # overrides reach the head
        config.model.head.update(dict(topk=2, mask_padding=True, predictor="old", tau=0.02))
    model = _model(config)
    for k, v in config.model.head.items():
        if k not in HEAD_INIT_KEYS:
            assert getattr(model.head, k) == v, k
    assert model.init_temporal_from_clip == config.model.head.init_temporal_from_clip
    assert model.head.embed_dim == config.model.clip.embed_dim
    assert model.head.max_frames == config.data.max_frames
    assert model.head.max_words == config.data.max_words
    assert model.clip_config == CLIPConfig.from_ml(config.model.clip)
    assert model.clip_checkpoint == config.model.clip.checkpoint
    assert model.masks_padding == config.model.head.mask_padding


# --------------------------------------------------------------------------- (b) blockwise


@pytest.mark.parametrize(
    "blocks,level3_kernel",
    [
        ((3, 2), "xla"),
        ((4, 3), "xla"),
        ((N_TEXT, N_VIDEO), "xla"),  # one block
        ((2, 3), "auto"),  # the evaluation's default: the native kernel on this CPU
        ((2, 3, "mesh"), "xla"),  # text blocks split over 4 (virtual) devices
    ],
)
def test_blockwise_score_equals_one_shot(tiny, blocks, level3_kernel):
    model, params, text, video = tiny["model"], tiny["params"], tiny["text"], tiny["video"]
    mesh = None
    if len(blocks) == 3:
        devices = np.array(jax.devices()[:4])
        if devices.size < 4:
            pytest.skip("needs 4 (virtual) devices, see conftest")
        mesh = Mesh(devices, ("data",))
    pair_fn = native.pair_levels_for(level3_kernel, mask_padding=model.masks_padding)
    one = model.score(params, text, video)
    got = model.score(
        params, text, video, blockwise=Blocks(blocks[0], blocks[1], mesh=mesh), pair_fn=pair_fn
    )
    assert got.video_sentence.shape == (N_TEXT, N_VIDEO)
    _assert_levels_close(got, one)


# --------------------------------------------------------------------------- (c) training


@pytest.mark.slow
def test_training_logits_and_loss(tiny):
    config, model, params = tiny["config"], tiny["model"], tiny["params"]
    batch = {k: jnp.asarray(v) for k, v in random_arrays(4, config, seed=3).items()}
    rng = jax.random.PRNGKey(5)

    @jax.jit
    def by_parts(p, b, r):
        text = model.encode_text(p, b["input_ids"])
        video = model.encode_video(p, b["frames"], b["frame_mask"], r, train=True)
        return model.score(p, text, video, train=True).mean()

    parts = by_parts(params, batch, rng)
    logits = jax.jit(model.logits)(params, batch, rng)
    loss, loss_logits = jax.jit(model.loss)(params, batch, rng)
    assert logits.shape == (4, 4)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(parts), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(loss_logits), np.asarray(logits), rtol=1e-6, atol=1e-6)
    # symmetric cross-entropy, in float64
    x = np.asarray(loss_logits, np.float64)
    ls = lambda m: (
        (m - m.max(1, keepdims=True))
        - np.log(np.exp(m - m.max(1, keepdims=True)).sum(1, keepdims=True))
    )
    ref = 0.5 * (-np.diag(ls(x)).mean() - np.diag(ls(x.T)).mean())
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert np.isfinite(float(loss))


# --------------------------------------------------------------------------- (d) pytrees


def test_features_are_pytrees(tiny):
    text, video = tiny["text"], tiny["video"]
    assert isinstance(text, TextFeatures) and isinstance(video, VideoFeatures)
    assert text.count == N_TEXT and video.count == N_VIDEO
    assert len(jax.tree_util.tree_leaves(text)) == 3
    assert len(jax.tree_util.tree_leaves(video)) == 4

    @jax.jit
    def through(t, v):
        return t, v, jnp.sum(t.words) + jnp.sum(v.pixels)

    t2, v2, total = through(text, video)
    assert type(t2) is TextFeatures and type(v2) is VideoFeatures
    jax.tree_util.tree_map(np.testing.assert_array_equal, (t2, v2), (text, video))
    np.testing.assert_allclose(
        float(total), float(jnp.sum(text.words) + jnp.sum(video.pixels)), rtol=1e-5
    )
    # slicing keeps the type (and a missing mask stays missing)
    head = jax.tree_util.tree_map(lambda x: x[:2], text)
    assert type(head) is TextFeatures and head.count == 2
    np.testing.assert_array_equal(np.asarray(head.mask), np.asarray(text.mask)[:2])
    no_mask = jax.tree_util.tree_map(lambda x: x[1:], text.replace(mask=None))
    assert type(no_mask) is TextFeatures and no_mask.mask is None and no_mask.count == 6
    vs = jax.tree_util.tree_map(lambda x: x[3:], video)
    assert type(vs) is VideoFeatures and vs.count == 2
    np.testing.assert_array_equal(np.asarray(vs.frames), np.asarray(video.frames)[3:])


# --------------------------------------------------------------------------- (e) text mask


def test_encode_text_mask_marks_sot_to_eot(tiny):
    text, ids, lengths = tiny["text"], np.asarray(tiny["ids"]), tiny["lengths"]
    w = tiny["config"].data.max_words
    want = (np.arange(w)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    mask = np.asarray(text.mask)
    assert mask.shape == (N_TEXT, w)
    np.testing.assert_array_equal(mask, want)
    eot = ids.argmax(1)
    assert (mask[np.arange(N_TEXT), eot] == 1).all() and (mask[:, 0] == 1).all()
    assert text.sentence.shape == (N_TEXT, tiny["config"].model.clip.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(text.words), axis=-1), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- (f) mask_padding


def test_mask_padding_reaches_the_maths(tiny):
    config = tiny_config()
    config.model.head.mask_padding = True
    masked = _model(config)
    assert masked.masks_padding and not tiny["model"].masks_padding
    params, text, video = tiny["params"], tiny["text"], tiny["video"]  # same parameters
    plain = tiny["model"].score(params, text, video)
    got = masked.score(params, text, video)
    # Level 1 does not see the masks (the video feature already averages the real frames);
    # levels 2 (padded frames) and 3 (padded words, frames' tokens) do.
    np.testing.assert_allclose(
        np.asarray(got.video_sentence), np.asarray(plain.video_sentence), rtol=1e-6
    )
    d2 = np.abs(np.asarray(got.sentence_frame) - np.asarray(plain.sentence_frame))
    d3 = np.abs(np.asarray(got.patch_word) - np.asarray(plain.patch_word))
    assert d2[:, [1, 3]].max() > 1e-4 and d2[:, [0, 2, 4]].max() < 1e-5  # padded videos only
    assert d3.max() > 1e-4
    # No padding anywhere: masking changes nothing.
    full = np.asarray(tiny["lengths"]) == config.data.max_words
    no_pad_videos = [0, 2, 4]
    np.testing.assert_allclose(
        np.asarray(got.patch_word)[np.ix_(full, no_pad_videos)],
        np.asarray(plain.patch_word)[np.ix_(full, no_pad_videos)],
        rtol=1e-5,
        atol=1e-6,
    )
    # The masks go through the blocks too, and the evaluation's choice keeps XLA.
    pair_fn = native.pair_levels_for("auto", mask_padding=masked.masks_padding)
    assert pair_fn is similarity.pair_levels
    blk = masked.score(params, text, video, blockwise=Blocks(3, 2), pair_fn=pair_fn)
    _assert_levels_close(blk, got)
    with pytest.raises(ValueError, match="takes no masks"):
        native.pair_levels_for("native", mask_padding=True)
    # mask_padding needs the text mask
    with pytest.raises(ValueError, match="needs text_mask"):
        masked.head.apply(
            {"params": params["head"]},
            text.sentence,
            text.words,
            method=UCoFiAHead.encode_text,
        )
