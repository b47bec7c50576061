"""Flax CLIP towers vs transformers' PyTorch ``CLIPModel`` (random weights, float32).

Tolerance: max abs error <= 1e-4 * max|reference|. Both sides are float32; they differ only
in summation order (XLA vs oneDNN matmuls, packed vs separate q/k/v projections), which costs
~1e-6 relative per op and grows to ~1e-5 over 12+12 blocks; 1e-4 keeps a 10x margin while any
real mistake (an untransposed kernel, a wrong LayerNorm, a missing mask) errs at O(1).
bfloat16 mode is compared with our own float32 output; the error is printed and bounded.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clip_testutil import TINY, VIT_B32, hf_outputs, inputs, random_hf_clip, state_dict_numpy
from ml_collections import ConfigDict

from ucofia_jax.models import clip
from ucofia_jax.models.clip_import import convert_hf_state_dict
from ucofia_jax.models.layers import MLP, LayerNorm, MultiHeadAttention
from ucofia_jax.ops.token_shift import token_shift

RTOL = 1e-4


def _ours(cfg, params, images, ids):
    model = clip.CLIP(cfg)
    img = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))(
        params, images
    )
    txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))(params, ids)
    logits = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)[0])(params, images, ids)
    return [np.asarray(a, np.float64) for a in (img, txt, logits)]


def _rel_err(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _parity(sizes, batch, length):
    t0 = time.perf_counter()
    hf = random_hf_clip(sizes)
    images, ids = inputs(sizes, batch, length)
    ref = hf_outputs(hf, images, ids)
    cfg, params = convert_hf_state_dict(state_dict_numpy(hf), hf.config.to_dict())
    assert cfg.sizes() == sizes
    got = _ours(cfg, params, images, ids.astype(np.int32))
    errs = {}
    for name, g, r in zip(("image tokens", "text positions", "logits"), got, ref):
        assert g.shape == r.shape, name
        errs[name] = _rel_err(g, r)
    print(
        f"\nparity vs HF CLIPModel ({sizes['vision_width']}w/{sizes['vision_layers']}L): "
        + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        + f" (max abs err / max |ref|), {time.perf_counter() - t0:.1f}s"
    )
    for k, v in errs.items():
        assert v <= RTOL, f"{k}: {v:.3e} > {RTOL}"
    # The sentence feature is the EOT position of the all-position output.
    sent = np.asarray(clip.sentence_features(jnp.asarray(got[1]), jnp.asarray(ids)))
    np.testing.assert_array_equal(sent, got[1][np.arange(batch), ids.argmax(1)])
    return cfg, params, images, ids, got


def _bf16_errors(cfg, params, images, ids, f32, label):
    """Relative errors of bfloat16 compute against our float32 outputs, printed (no silent pass)."""
    bf = _ours(
        clip.CLIPConfig(**{**cfg.sizes(), "dtype": "bfloat16"}),
        params,
        images,
        ids.astype(np.int32),
    )
    errs = [_rel_err(b, f) for b, f in zip(bf, f32)]
    print(f"bf16 vs f32 ({label}): image {errs[0]:.2e}, text {errs[1]:.2e}, logits {errs[2]:.2e}")
    return errs


def test_parity_tiny():
    cfg, params, images, ids, f32 = _parity(TINY, batch=3, length=12)
    # bfloat16 compute: error against our float32 output, printed and bounded. bf16 keeps 8
    # mantissa bits (~4e-3 relative rounding per op); over 2 blocks ~1e-2 is expected.
    assert max(_bf16_errors(cfg, params, images, ids, f32, "tiny")) < 5e-2


@pytest.mark.slow
def test_parity_vit_b32():
    cfg, params, images, ids, f32 = _parity(VIT_B32, batch=2, length=32)
    assert max(_bf16_errors(cfg, params, images, ids, f32, "ViT-B/32")) < 1e-1


@pytest.fixture(scope="module")
def tiny_params():
    # One init shared by the tests below: token_shift_blocks does not change the params.
    return clip.init_clip(clip.CLIPConfig(**TINY), jax.random.PRNGKey(0))[1]


def _apply(cfg, method):
    model = clip.CLIP(cfg)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=getattr(model, method)))


def test_encode_video_matches_frames_without_shift(tiny_params):
    cfg = clip.CLIPConfig(**TINY)
    frames = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 32, 32, 3))
    vid = _apply(cfg, "encode_video")(tiny_params, frames)
    img = _apply(cfg, "encode_image")(tiny_params, frames.reshape(6, 32, 32, 3))
    assert vid.shape == (2, 3, 17, 32)
    np.testing.assert_allclose(np.asarray(vid).reshape(6, 17, 32), np.asarray(img), atol=1e-5)


def test_token_shift_in_video(tiny_params):
    """Shift on the last block only: equals a forward written out by hand that shifts the
    LayerNormed attention input (the residual keeps the unshifted tokens)."""
    cfg = clip.CLIPConfig(**TINY, token_shift_blocks=(1,))
    frames = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 32, 32, 3))
    got = np.asarray(_apply(cfg, "encode_video")(tiny_params, frames)).reshape(8, 17, 32)
    # Shift changes the output of frames (otherwise the test would be vacuous) ...
    plain = _apply(cfg, "encode_image")(tiny_params, frames.reshape(8, 32, 32, 3))
    assert np.max(np.abs(got - np.asarray(plain))) > 1e-3

    # ... and equals the blocks written out by hand.
    @jax.jit
    def manual(vp, x):
        conv = jax.lax.conv_general_dilated(
            x, vp["conv1"]["kernel"], (8, 8), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = conv.reshape(8, 16, 128)
        x = jnp.concatenate([jnp.broadcast_to(vp["class_embedding"], (8, 1, 128)), x], 1)
        x = x + vp["positional_embedding"]
        ln = lambda p, v: LayerNorm().apply({"params": p}, v)
        x = ln(vp["ln_pre"], x)
        for i in range(2):
            bp = vp["transformer"][f"resblocks_{i}"]
            h = ln(bp["ln_1"], x)
            if i == 1:
                h = token_shift(h, 4, 7)
            x = x + MultiHeadAttention(128, 2).apply({"params": bp["attn"]}, h)
            x = x + MLP(128, activation="quick_gelu").apply(
                {"params": bp["mlp"]}, ln(bp["ln_2"], x)
            )
        return ln(vp["ln_post"], x) @ vp["proj"]

    want = manual(tiny_params["visual"], frames.reshape(8, 32, 32, 3))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


def test_config_and_helpers(tiny_params):
    c = clip.CLIPConfig.from_ml(
        ConfigDict(
            dict(
                TINY, checkpoint="", token_shift_blocks=(1,), token_shift_n_div=7, dtype="bfloat16"
            )
        )
    )
    assert c.token_shift_blocks == (1,) and c.vision_heads == 2 and c.grid_size == 4
    with pytest.raises(ValueError, match="clip.py"):
        clip.CLIPConfig.from_ml(dict(TINY, bogus=1))
    with pytest.raises(ValueError, match="token_shift_blocks"):
        clip.CLIPConfig(**TINY, token_shift_blocks=(5,))
    with pytest.raises(ValueError, match="dtype"):
        clip.CLIPConfig(**TINY, dtype="float16")
    img = np.full((2, 4, 4, 3), 255, np.uint8)
    out = np.asarray(jax.jit(clip.normalize_images)(img))
    np.testing.assert_allclose(
        out[0, 0, 0], (1 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD), rtol=1e-6
    )
    np.testing.assert_allclose(float(tiny_params["logit_scale"]), np.log(1 / 0.07), rtol=1e-6)
    # OpenAI-like init: text block in_proj std = width^-1/2 (width 128).
    k = np.asarray(tiny_params["transformer"]["resblocks_0"]["attn"]["in_proj"]["kernel"])
    assert abs(k.std() - 128**-0.5) < 0.1 * 128**-0.5
    with pytest.raises(ValueError, match="clip.py"):
        _apply(clip.CLIPConfig(**TINY), "encode_image")(tiny_params, jnp.zeros((1, 16, 16, 3)))


def test_text_gradients_finite(tiny_params):
    """The -inf causal mask must not leak NaNs into training gradients."""
    model = clip.CLIP(clip.CLIPConfig(**TINY))
    ids = jnp.asarray(inputs(TINY, 2, 10)[1], jnp.int32)

    def loss(p):
        t = model.apply({"params": p}, ids, method=model.encode_text)
        return jnp.sum(clip.sentence_features(t, ids) ** 2) + jnp.sum(t[:, -1] ** 2)

    grads = jax.jit(jax.grad(loss))(tiny_params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert (
        float(jnp.abs(grads["transformer"]["resblocks_0"]["attn"]["in_proj"]["kernel"]).max()) > 0
    )


def test_auto_dtype_is_bfloat16_on_accelerators_float32_on_cpu(monkeypatch):
    assert clip.CLIPConfig(**TINY).dtype == "auto"  # the default
    assert clip.CLIPConfig(**TINY).compute_dtype == jnp.float32  # this suite runs on CPU
    for backend, want in (("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16), ("cpu", jnp.float32)):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert clip.CLIPConfig(**TINY).compute_dtype == want, backend
    assert clip.CLIPConfig(**TINY, dtype="float32").compute_dtype == jnp.float32
