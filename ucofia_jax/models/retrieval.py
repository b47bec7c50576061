"""CLIP towers + UCoFiA head = the trained model.

Parameters are one pytree ``{'clip': ..., 'head': ...}``. Text and video sides are encoded
separately (once per text / video at evaluation); only ``similarity_levels`` works on pairs.
Frames arrive as uint8 and are normalised on the device (4x less host->device traffic).
Mixed precision: ``config.model.clip.dtype='bfloat16'`` runs the backbone matmuls in bf16;
LayerNorms, the head's softmaxes and the loss stay float32 (models/layers.py, ops/).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from ucofia_jax.losses import symmetric_cross_entropy
from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models import ucofia as head_lib

Params = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RetrievalModel:
    """Stateless wrapper: Flax modules + pure methods taking ``params``."""

    clip_cfg: clip_lib.CLIPConfig
    clip: clip_lib.CLIP
    head: head_lib.UCoFiAHead

    @classmethod
    def from_config(cls, config) -> "RetrievalModel":
        cfg = clip_lib.CLIPConfig.from_ml(config.model.clip)
        return cls(cfg, clip_lib.CLIP(cfg), head_lib.head_from_config(config))

    # ---------------------------------------------------------------- init
    def init(self, rng: jax.Array, config=None) -> Params:
        """Random CLIP (or ``config.model.clip.checkpoint``) + head; temporal encoder from CLIP's
        text blocks when ``config.model.head.init_temporal_from_clip``."""
        r_clip, r_head, r_sel = jax.random.split(rng, 3)
        ckpt = config.model.clip.checkpoint if config is not None else ""
        if ckpt:
            overrides = dict(
                token_shift_blocks=self.clip_cfg.token_shift_blocks,
                token_shift_n_div=self.clip_cfg.token_shift_n_div,
                dtype=self.clip_cfg.dtype,
            )
            _, clip_params = clip_lib.load_pretrained(ckpt, **overrides)
        else:
            _, clip_params = clip_lib.init_clip(self.clip_cfg, r_clip)
        head_params = self.init_head(r_head, r_sel)
        if config is not None and config.model.head.init_temporal_from_clip:
            head_params = head_lib.init_temporal_from_clip(head_params, clip_params)
        return {"clip": clip_params, "head": head_params}

    def init_head(self, rng: jax.Array, selection_rng: jax.Array) -> Params:
        h, d = self.head, self.head.embed_dim
        n = 1 + self.clip_cfg.grid_size**2
        f, w = h.max_frames, h.max_words
        args = (
            jnp.zeros((1, d)),
            jnp.zeros((1, w, d)),
            jnp.zeros((1, f, d)),
            jnp.zeros((1, f * n, d)),
            jnp.ones((1, f), jnp.int32),
            jnp.zeros(()),
        )
        variables = jax.jit(lambda r, s: h.init(r, *args, rng=s, train=True))(rng, selection_rng)
        return dict(variables["params"])

    # ---------------------------------------------------------------- towers
    def encode_text(self, params: Params, input_ids: jax.Array) -> Dict[str, jax.Array]:
        """ids 't w' -> {'sentence' 't d', 'words' 't w d'} (L2-normalised by the head)."""
        hidden = self.clip.apply(
            {"params": params["clip"]}, input_ids, method=clip_lib.CLIP.encode_text
        )
        sentence = clip_lib.sentence_features(hidden, input_ids)
        return self.head.apply(
            {"params": params["head"]}, sentence, hidden, method=head_lib.UCoFiAHead.encode_text
        )

    def encode_video(
        self,
        params: Params,
        frames: jax.Array,
        frame_mask: jax.Array,
        rng: Optional[jax.Array],
        *,
        train: bool,
    ) -> Dict[str, jax.Array]:
        """frames uint8 'b f s s 3' + mask 'b f' -> the head's video side."""
        x = clip_lib.normalize_images(frames) if frames.dtype == jnp.uint8 else frames
        hidden = self.clip.apply({"params": params["clip"]}, x, method=clip_lib.CLIP.encode_video)
        b, f, n, d = hidden.shape
        return self.head.apply(
            {"params": params["head"]},
            hidden[:, :, 0],
            hidden.reshape(b, f * n, d),
            frame_mask,
            rng=rng,
            train=train,
            method=head_lib.UCoFiAHead.encode_video,
        )

    # ---------------------------------------------------------------- pairs
    def similarity_levels(
        self, params: Params, text_side, video_side, *, train: bool
    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
        return self.head.apply(
            {"params": params["head"]},
            text_side,
            video_side,
            params["clip"]["logit_scale"],
            train=train,
            method=head_lib.UCoFiAHead.similarity_levels,
        )

    def logits(
        self, params: Params, batch: Dict[str, jax.Array], rng: jax.Array, *, train: bool = True
    ) -> jax.Array:
        """[B, B] text x video logits over the (global) batch: mean of the three levels."""
        text = self.encode_text(params, batch["input_ids"])
        video = self.encode_video(params, batch["frames"], batch["frame_mask"], rng, train=train)
        s1, s2, s3 = self.similarity_levels(params, text, video, train=train)
        return (s1 + s2 + s3) / 3.0

    def loss(self, params: Params, batch: Dict[str, jax.Array], rng: jax.Array) -> jax.Array:
        return symmetric_cross_entropy(self.logits(params, batch, rng, train=True))
