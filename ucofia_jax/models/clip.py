"""CLIP towers (ViT image/video encoder, causal text encoder) in Flax, OpenAI parameter names.

Both towers return projected features of every position, as UCoFiA needs (SPEC §2-3):

    model, params = load_pretrained("ViT-B-32.pt")            # or a HF CLIPModel directory
    v = model.apply({"params": params}, images, method=model.encode_image)   # [B, 1+P, D]
    v = model.apply({"params": params}, frames, method=model.encode_video)   # [B, F, 1+P, D]
    t = model.apply({"params": params}, input_ids, method=model.encode_text) # [B, L, D]
    s = sentence_features(t, input_ids)                                       # [B, D]

Images are float32, already normalised (``normalize_images``), channels last.
``dtype='bfloat16'`` runs the matmuls/convolution in bfloat16 while LayerNorm, softmax and
the residual stream stay float32 (params are always float32); outputs are float32.
``'auto'`` (the default) is bfloat16 on GPU/TPU and float32 on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ucofia_jax.config import base_config
from ucofia_jax.models.layers import ACTIVATIONS, LayerNorm, Transformer, named
from ucofia_jax.ops.token_shift import token_shift

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The default: bfloat16 where it is fast (GPU, TPU; tests/test_bf16_step.py bounds its effect
# on a train step), float32 on CPU (parity, the demo). Resolved when the model is built.
AUTO_DTYPE = "auto"
_MODEL_DEFAULTS = base_config().model  # the one home of the defaults
_DEFAULTS = _MODEL_DEFAULTS.clip


def resolve_dtype(name: str) -> str:
    """A ``DTYPES`` key: ``name`` itself, or what ``'auto'`` means on this jax backend."""
    if name == AUTO_DTYPE:
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return name


def openai_vision_heads(width: int) -> int:
    """OpenAI's ViTs have heads of 64 (``build_model``: width // 64); 1 below that width."""
    return width // 64 if width >= 64 else 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Sizes of a ViT CLIP. Defaults: ``config.model.clip``'s (OpenAI ViT-B/32), but no token
    shift (a plain CLIP; the recipe's config shifts blocks 10-11)."""

    embed_dim: int = _DEFAULTS.embed_dim
    image_resolution: int = _DEFAULTS.image_resolution
    vision_layers: int = _DEFAULTS.vision_layers
    vision_width: int = _DEFAULTS.vision_width
    vision_patch_size: int = _DEFAULTS.vision_patch_size
    context_length: int = _DEFAULTS.context_length
    vocab_size: int = _DEFAULTS.vocab_size
    text_width: int = _DEFAULTS.text_width
    text_heads: int = _DEFAULTS.text_heads
    text_layers: int = _DEFAULTS.text_layers
    token_shift_blocks: tuple = ()
    token_shift_n_div: int = _DEFAULTS.token_shift_n_div
    dtype: str = _DEFAULTS.dtype  # AUTO_DTYPE or a DTYPES key
    # -1: OpenAI's rule, width // 64 (what an OpenAI .pt implies; it does not store it). A HF
    # config.json states it (num_attention_heads): OpenCLIP ViT-H/14 has 16 heads of 80.
    vision_heads: int = _DEFAULTS.vision_heads
    # The MLPs' activation (layers.ACTIVATIONS), HF config.json's hidden_act: OpenAI's CLIPs
    # use quick_gelu, OpenCLIP's ViT-H/14 and bigG the exact gelu.
    activation: str = _DEFAULTS.activation

    _SIZE_FIELDS = (
        "embed_dim",
        "image_resolution",
        "vision_layers",
        "vision_width",
        "vision_heads",
        "vision_patch_size",
        "context_length",
        "vocab_size",
        "text_width",
        "text_heads",
        "text_layers",
    )

    def __post_init__(self):
        object.__setattr__(
            self, "token_shift_blocks", tuple(int(i) for i in self.token_shift_blocks)
        )
        if self.vision_heads == -1:
            object.__setattr__(self, "vision_heads", openai_vision_heads(self.vision_width))
        if self.vision_heads < 1 or self.vision_width % self.vision_heads:
            raise ValueError(
                f"clip.py: vision_heads {self.vision_heads} must be -1 (width // 64) or a "
                f"positive divisor of vision_width {self.vision_width}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"clip.py: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.dtype not in (*DTYPES, AUTO_DTYPE):
            raise ValueError(
                f"clip.py: dtype must be one of {[*sorted(DTYPES), AUTO_DTYPE]}, got {self.dtype!r}"
            )
        if self.image_resolution % self.vision_patch_size:
            raise ValueError(
                f"clip.py: image_resolution {self.image_resolution} is not a multiple "
                f"of vision_patch_size {self.vision_patch_size}"
            )
        bad = [i for i in self.token_shift_blocks if not 0 <= i < self.vision_layers]
        if bad:
            raise ValueError(
                f"clip.py: token_shift_blocks {bad} outside 0..{self.vision_layers - 1}"
            )

    @property
    def grid_size(self) -> int:
        return self.image_resolution // self.vision_patch_size

    @property
    def compute_dtype(self):
        return DTYPES[resolve_dtype(self.dtype)]

    def sizes(self) -> dict:
        return {k: getattr(self, k) for k in self._SIZE_FIELDS}

    @classmethod
    def from_ml(cls, cfg: Any) -> "CLIPConfig":
        """From ``config.model.clip`` (ConfigDict or dict); ``checkpoint`` and ``from_scratch``
        (how the weights start, checked by preflight.check_inputs) are ignored here."""
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        d.pop("checkpoint", None)
        d.pop("from_scratch", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"clip.py: unknown keys in config.model.clip: {unknown}")
        return cls(**d)


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] RGB -> float32 normalised with CLIP's mean/std (jit-able, runs on device)."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def eot_positions(input_ids: jax.Array) -> jax.Array:
    """input_ids 'b l' -> 'b': where EOT stands, found as argmax(ids) (it has the largest id),
    as the original does."""
    return jnp.argmax(input_ids, axis=-1)


def sentence_features(text_hidden: jax.Array, input_ids: jax.Array) -> jax.Array:
    """text_hidden 'b l d', input_ids 'b l' -> 'b d' at the EOT token."""
    idx = eot_positions(input_ids)
    return jnp.take_along_axis(text_hidden, idx[:, None, None], axis=1)[:, 0]


def _normal(std: float):
    return nn.initializers.normal(std)


class VisionTransformer(nn.Module):
    cfg: CLIPConfig
    remat: str  # layers.REMAT_POLICIES, on every residual block (CLIP's)

    @nn.compact
    def __call__(self, x: jax.Array, num_frames: Optional[int] = None) -> jax.Array:
        # x: 'b h w 3' float32 normalised; num_frames: frames per video when b = videos * F.
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        w, p = cfg.vision_width, cfg.vision_patch_size
        if x.shape[1:] != (cfg.image_resolution, cfg.image_resolution, 3):
            raise ValueError(
                f"clip.py: images must be [B, {cfg.image_resolution}, "
                f"{cfg.image_resolution}, 3] (channels last), got {x.shape}"
            )
        x = nn.Conv(
            w,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=named(nn.linear.default_kernel_init, None, None, None, "embed"),
            name="conv1",
        )(x.astype(dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, w).astype(jnp.float32)  # 'b P w', row-major patches like torch
        scale = w**-0.5
        cls = self.param("class_embedding", named(_normal(scale), "norm"), (w,), jnp.float32)
        pos = self.param(
            "positional_embedding",
            named(_normal(scale), None, "embed"),
            (cfg.grid_size**2 + 1, w),
            jnp.float32,
        )
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)), x], axis=1) + pos  # 'b n w'
        x = LayerNorm(name="ln_pre")(x)
        fns = None
        if cfg.token_shift_blocks and num_frames is not None:
            shift = functools.partial(
                token_shift, num_frames=num_frames, n_div=cfg.token_shift_n_div
            )
            fns = tuple(
                shift if i in cfg.token_shift_blocks else None for i in range(cfg.vision_layers)
            )
        x = Transformer(
            w,
            cfg.vision_layers,
            cfg.vision_heads,
            dtype=dtype,
            attn_input_fns=fns,
            remat=self.remat,
            activation=cfg.activation,
            name="transformer",
        )(x)
        x = LayerNorm(name="ln_post")(x)
        proj = self.param(
            "proj", named(_normal(scale), "embed", "joint"), (w, cfg.embed_dim), jnp.float32
        )
        return jnp.einsum("bnw,wd->bnd", x.astype(dtype), proj.astype(dtype)).astype(jnp.float32)


class CLIP(nn.Module):
    """OpenAI CLIP (ViT) with per-token outputs; see the module docstring."""

    cfg: CLIPConfig
    # layers.REMAT_POLICIES on every residual block of both towers; a module field, not a
    # CLIPConfig size: it changes memory and time, never the parameters or the outputs.
    # Its default is config.model.remat's, as UCoFiAHead's (Model sets both from the config).
    remat: str = _MODEL_DEFAULTS.remat

    def setup(self):
        cfg = self.cfg
        self.visual = VisionTransformer(cfg, remat=self.remat)
        self.token_embedding = nn.Embed(
            cfg.vocab_size,
            cfg.text_width,
            embedding_init=named(_normal(0.02), "vocab", "embed"),
            param_dtype=jnp.float32,
        )
        self.positional_embedding = self.param(
            "positional_embedding",
            named(_normal(0.01), None, "embed"),
            (cfg.context_length, cfg.text_width),
            jnp.float32,
        )
        self.transformer = Transformer(
            cfg.text_width,
            cfg.text_layers,
            cfg.text_heads,
            dtype=cfg.compute_dtype,
            remat=self.remat,
            activation=cfg.activation,
        )
        self.ln_final = LayerNorm()
        self.text_projection = self.param(
            "text_projection",
            named(_normal(cfg.text_width**-0.5), "embed", "joint"),
            (cfg.text_width, cfg.embed_dim),
            jnp.float32,
        )
        self.logit_scale = self.param(
            "logit_scale", named(nn.initializers.constant(math.log(1 / 0.07))), (), jnp.float32
        )

    def encode_image(self, images: jax.Array) -> jax.Array:
        """'b h w 3' -> 'b n d' (n = 1 + patches), ln_post and proj on every token."""
        return self.visual(images)

    def encode_video(self, frames: jax.Array) -> jax.Array:
        """'b f h w 3' -> 'b f n d'; frames share the batch, token shift on the chosen blocks."""
        b, f = frames.shape[:2]
        out = self.visual(frames.reshape(b * f, *frames.shape[2:]), num_frames=f)
        return out.reshape(b, f, *out.shape[1:])

    def encode_text(self, input_ids: jax.Array) -> jax.Array:
        """'b l' int -> 'b l d' for every position (causal mask only, padding included)."""
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        l = input_ids.shape[1]
        if l > cfg.context_length:
            raise ValueError(f"clip.py: {l} tokens > context_length {cfg.context_length}")
        x = self.token_embedding(input_ids) + self.positional_embedding[:l]  # 'b l w'
        causal = jnp.triu(jnp.full((l, l), -jnp.inf, jnp.float32), k=1)
        x = self.transformer(x, causal)
        x = self.ln_final(x)
        return jnp.einsum(
            "blw,wd->bld", x.astype(dtype), self.text_projection.astype(dtype)
        ).astype(jnp.float32)

    def __call__(self, images: jax.Array, input_ids: jax.Array):
        """CLIP logits (text x image) from the CLS / EOT features, as ``CLIPModel``."""
        img = self.encode_image(images)[:, 0]
        txt = sentence_features(self.encode_text(input_ids), input_ids)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        logits_per_text = jnp.exp(self.logit_scale) * txt @ img.T
        return logits_per_text, logits_per_text.T


def _openai_block_init(params: dict, width: int, layers: int, rng: jax.Array) -> dict:
    """Re-draw block weights with OpenAI's stds (attn width^-1/2, proj width^-1/2 (2L)^-1/2,
    fc (2 width)^-1/2) and zero biases; ``layers.py`` blocks default to N(0, 0.02)."""
    attn_std = width**-0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    stds = {
        ("attn", "in_proj"): attn_std,
        ("attn", "out_proj"): proj_std,
        ("mlp", "c_fc"): fc_std,
        ("mlp", "c_proj"): proj_std,
    }
    out = {}
    for i in range(layers):
        blk = jax.tree_util.tree_map(lambda a: a, params[f"resblocks_{i}"])
        for (mod, sub), std in stds.items():
            rng, k = jax.random.split(rng)
            kern = blk[mod][sub]["kernel"]
            blk[mod][sub] = {
                "kernel": std * jax.random.normal(k, kern.shape, kern.dtype),
                "bias": jnp.zeros_like(blk[mod][sub]["bias"]),
            }
        out[f"resblocks_{i}"] = blk
    return out


def init_clip(cfg: CLIPConfig, rng: jax.Array) -> tuple[CLIP, dict]:
    """Randomly initialised CLIP (OpenAI-like init stds), one compiled function."""
    model = CLIP(cfg)

    def init(rng):
        r_init, r_txt, r_vis = jax.random.split(rng, 3)
        images = jnp.zeros((1, cfg.image_resolution, cfg.image_resolution, 3), jnp.float32)
        variables = model.init(r_init, images, jnp.zeros((1, 2), jnp.int32))
        params = dict(nn.unbox(variables["params"]))  # plain arrays (the names: declared_axes)
        params["transformer"] = _openai_block_init(
            params["transformer"], cfg.text_width, cfg.text_layers, r_txt
        )
        visual = dict(params["visual"])
        visual["transformer"] = _openai_block_init(
            visual["transformer"], cfg.vision_width, cfg.vision_layers, r_vis
        )
        params["visual"] = visual
        return params

    return model, jax.jit(init)(rng)
