"""CLIPs beyond OpenAI's heads of 64: head counts come from a HF checkpoint's config.json
(OpenCLIP / LAION ViT-H/14 has 16 heads of 80), and ViT-L/14's real shapes import and match
``transformers``' CLIPModel. One image and one text each; tolerances are stated per test."""

import importlib

import jax
import numpy as np
import pytest
from clip_testutil import hf_outputs, inputs, random_hf_clip, state_dict_numpy

from ucofia_jax import config as config_lib
from ucofia_jax.errors import CheckpointError
from ucofia_jax.models import clip_import
from ucofia_jax.models.clip import CLIP, CLIPConfig

# Heads of 80 in both towers: 320 = 4 x 80, where OpenAI's rule (width // 64) would say 5.
HEAD80 = dict(
    embed_dim=64,
    image_resolution=32,
    vision_layers=2,
    vision_width=320,
    vision_heads=4,
    vision_patch_size=8,
    context_length=16,
    vocab_size=99,
    text_width=320,
    text_heads=4,
    text_layers=2,
)
VIT_L14 = dict(
    embed_dim=768,
    image_resolution=224,
    vision_layers=24,
    vision_width=1024,
    vision_heads=16,
    vision_patch_size=14,
    context_length=77,
    vocab_size=49408,
    text_width=768,
    text_heads=12,
    text_layers=12,
)


def _embeddings(model: CLIP, params, images, ids):
    """Projected image CLS and text EOT features (what CLIPModel's embeddings are)."""
    image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
    text_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_text))
    img, txt = image_fn(params, images)[:, 0], text_fn(params, ids)
    eot = np.argmax(ids, axis=-1)
    return np.asarray(img), np.asarray(txt)[np.arange(len(ids)), eot]


def _hf_embeddings(hf_model, images, ids):
    img, txt, _ = hf_outputs(hf_model, images, ids)
    return img[:, 0], txt[np.arange(len(ids)), np.argmax(ids, axis=-1)]


def _rel_err(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.slow
def test_hf_heads_of_80_match_transformers(tmp_path):
    hf_model = random_hf_clip(HEAD80, seed=1)
    hf_model.save_pretrained(tmp_path)
    model, params = clip_import.load_pretrained(str(tmp_path))
    assert (model.cfg.vision_heads, model.cfg.text_heads) == (4, 4)  # from config.json
    assert clip_import.stated_fields(str(tmp_path)) == {
        "text_heads": 4,
        "vision_heads": 4,
        "activation": "quick_gelu",
    }
    images, ids = inputs(HEAD80, batch=1, length=10, seed=2)  # one image, one text
    ids = ids.astype(np.int32)
    ref_img, ref_txt = _hf_embeddings(hf_model, images, ids)
    img, txt = _embeddings(model, params, images, ids)
    # float32 against torch float32: relative max error <= 1e-4 of the largest feature
    assert _rel_err(img, ref_img) <= 1e-4
    assert _rel_err(txt, ref_txt) <= 1e-4
    # The test can fail: the same weights split into OpenAI's 5 heads of 64 do not match.
    wrong = CLIP(CLIPConfig(**{**HEAD80, "text_heads": 5, "vision_heads": 5}))
    w_img, w_txt = _embeddings(wrong, params, images, ids)
    assert _rel_err(w_img, ref_img) > 1e-2 and _rel_err(w_txt, ref_txt) > 1e-2


def test_hf_exact_gelu_matches_transformers(tmp_path):
    # OpenCLIP's ViT-H/14 and bigG say hidden_act='gelu' (erf form), not OpenAI's quick_gelu.
    hf_model = random_hf_clip({**HEAD80, "activation": "gelu"}, seed=4)
    hf_model.save_pretrained(tmp_path)
    model, params = clip_import.load_pretrained(str(tmp_path))
    assert model.cfg.activation == "gelu"
    images, ids = inputs(HEAD80, batch=1, length=10, seed=3)
    ids = ids.astype(np.int32)
    ref_img, ref_txt = _hf_embeddings(hf_model, images, ids)
    img, txt = _embeddings(model, params, images, ids)
    assert _rel_err(img, ref_img) <= 1e-4 and _rel_err(txt, ref_txt) <= 1e-4
    # The test can fail: quick_gelu on the same weights is measurably off.
    wrong = CLIP(CLIPConfig(**HEAD80))
    w_img, w_txt = _embeddings(wrong, params, images, ids)
    assert _rel_err(w_img, ref_img) > 1e-3 and _rel_err(w_txt, ref_txt) > 1e-3
    # A config that disagrees with the checkpoint's activation is refused before loading.
    with pytest.raises(ValueError, match="disagrees with the checkpoint"):
        clip_import.load_pretrained(str(tmp_path), activation="quick_gelu")


def test_openai_files_keep_heads_of_64():
    hf_model = random_hf_clip(HEAD80, seed=1)
    sd = clip_import.hf_to_openai_state_dict(state_dict_numpy(hf_model))
    cfg = clip_import.infer_openai_config(sd)  # an OpenAI file states no heads
    assert (cfg.vision_heads, cfg.text_heads) == (5, 5)


def test_head_count_errors(tmp_path):
    hf_model = random_hf_clip(HEAD80, seed=1)
    sd = state_dict_numpy(hf_model)
    cfg = hf_model.config.to_dict()
    cfg["vision_config"]["num_attention_heads"] = 3  # 320 is not a multiple of 3
    with pytest.raises(CheckpointError, match=r"vision_heads 3 .* vision_width 320"):
        clip_import.convert_hf_state_dict(sd, cfg, source="cfg.json")
    cfg["vision_config"]["num_attention_heads"] = 4
    cfg["text_config"]["num_attention_heads"] = 0
    with pytest.raises(CheckpointError, match=r"num_attention_heads=0"):
        clip_import.convert_hf_state_dict(sd, cfg, source="cfg.json")


def test_l14_config_matches_the_l14_shapes():
    c = importlib.import_module("configs.msrvtt_l14").get_config()
    config_lib.validate(c)
    sizes = CLIPConfig.from_ml(c.model.clip).sizes()
    assert sizes == VIT_L14


@pytest.mark.slow  # ViT-L/14 on CPU: ~430M parameters, one 224 px image through 24 blocks
def test_vit_l14_shapes_match_transformers():
    hf_model = random_hf_clip(VIT_L14, seed=0)
    cfg, params = clip_import.convert_hf_state_dict(
        state_dict_numpy(hf_model), hf_model.config.to_dict(), source="ViT-L/14 (random)"
    )
    assert cfg.sizes() == VIT_L14
    images, ids = inputs(VIT_L14, batch=1, length=20, seed=0)
    ids = ids.astype(np.int32)
    ref_img, ref_txt = _hf_embeddings(hf_model, images, ids)
    del hf_model
    params = jax.tree_util.tree_map(np.asarray, params)
    img, txt = _embeddings(CLIP(cfg), params, images, ids)
    # 24 float32 blocks each side: relative max error <= 1e-3 of the largest feature
    assert _rel_err(img, ref_img) <= 1e-3
    assert _rel_err(txt, ref_txt) <= 1e-3
