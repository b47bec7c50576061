"""Shared helpers of the CLIP tests: a randomly initialised ``transformers.CLIPModel``."""

import numpy as np
import torch
import transformers

TINY = dict(
    embed_dim=32,
    image_resolution=32,
    vision_layers=2,
    vision_width=128,
    vision_heads=2,
    vision_patch_size=8,
    context_length=16,
    vocab_size=99,
    text_width=128,
    text_heads=2,
    text_layers=2,
)
VIT_B32 = dict(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_heads=12,
    vision_patch_size=32,
    context_length=77,
    vocab_size=49408,
    text_width=512,
    text_heads=8,
    text_layers=12,
)


def hf_config(s: dict) -> transformers.CLIPConfig:
    text = dict(
        vocab_size=s["vocab_size"],
        hidden_size=s["text_width"],
        intermediate_size=4 * s["text_width"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"],
        max_position_embeddings=s["context_length"],
        hidden_act=s.get("activation", "quick_gelu"),
        layer_norm_eps=1e-5,
        projection_dim=s["embed_dim"],
        # EOT is the largest id: HF pools at its first occurrence, we at argmax(ids).
        eos_token_id=s["vocab_size"] - 1,
        bos_token_id=s["vocab_size"] - 2,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=s["vision_width"],
        intermediate_size=4 * s["vision_width"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=s["image_resolution"],
        patch_size=s["vision_patch_size"],
        hidden_act=s.get("activation", "quick_gelu"),
        layer_norm_eps=1e-5,
        projection_dim=s["embed_dim"],
    )
    cfg = transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=s["embed_dim"]
    )
    cfg._attn_implementation = "eager"
    return cfg


def random_hf_clip(s: dict, seed: int = 0) -> transformers.CLIPModel:
    """HF CLIPModel whose every tensor is random (LayerNorm scales and biases included), so a
    swapped or untransposed weight cannot hide behind an init of ones/zeros."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel(hf_config(s)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(np.log(1 / 0.07))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def inputs(s: dict, batch: int = 2, length: int = 12, seed: int = 0):
    """Normalised-looking images [B, H, W, 3] and ids with SOT/EOT and zero padding."""
    rng = np.random.default_rng(seed)
    r = s["image_resolution"]
    images = rng.normal(size=(batch, r, r, 3)).astype(np.float32)
    ids = np.zeros((batch, length), np.int64)
    for b in range(batch):
        n = length - 3 * b  # different lengths; padding positions get features too
        ids[b, 0] = s["vocab_size"] - 2
        ids[b, 1 : n - 1] = rng.integers(1, s["vocab_size"] - 2, n - 2)
        ids[b, n - 1] = s["vocab_size"] - 1
    return images, ids


@torch.no_grad()
def hf_outputs(model, images: np.ndarray, ids: np.ndarray):
    """All-token image features, all-position text features, logits_per_text (float64 numpy)."""
    px = torch.from_numpy(images).permute(0, 3, 1, 2)
    t_ids = torch.from_numpy(ids)
    vis = model.vision_model(pixel_values=px).last_hidden_state
    img = model.visual_projection(model.vision_model.post_layernorm(vis))
    txt = model.text_projection(model.text_model(input_ids=t_ids).last_hidden_state)
    logits = model(input_ids=t_ids, pixel_values=px).logits_per_text
    return [t.double().numpy() for t in (img, txt, logits)]


def state_dict_numpy(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
