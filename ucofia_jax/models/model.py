"""The model's one door: CLIP towers + UCoFiA head behind four methods.

Every tool (the train step, the evaluator, later the search index) reaches the model only
through ``Model``: ``encode_text`` and ``encode_video`` (once per caption / video, typed
``TextFeatures`` / ``VideoFeatures``), ``score`` (the three similarity levels of every pair,
optionally in blocks) and ``loss``. Parameters are one plain pytree ``{'clip', 'head'}``;
``Model`` holds no state, only the Flax modules and how to initialise them.

Frames arrive as uint8 and are normalised on the device (4x less host->device traffic).
Mixed precision: ``model.clip.dtype='bfloat16'`` runs the backbone matmuls in bf16;
LayerNorms, the head's softmaxes and the loss stay float32 (models/layers.py, ops/).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models import clip_import, tokenizer
from ucofia_jax.models import head as head_lib
from ucofia_jax.models import layers as layers_lib
from ucofia_jax.models.features import TextFeatures, VideoFeatures
from ucofia_jax.ops import similarity
from ucofia_jax.ops.blockwise import blockwise_similarity
from ucofia_jax.ops.losses import symmetric_cross_entropy

Params = Dict[str, Any]
PairFn = Callable[..., similarity.SimilarityLevels]

# Keys of config.model.head that say how to initialise, not what to build (config.model.clip's
# `checkpoint` is set aside by CLIPConfig.from_ml).
HEAD_INIT_KEYS = ("init_temporal_from_clip",)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """How ``Model.score`` tiles N texts x M videos (``ops.blockwise``): memory is set by the
    block, not by N x M. With a mesh, text blocks are split over its ``axis`` devices."""

    text: int
    video: int
    mesh: Optional[Mesh] = None
    axis: str = "data"


@dataclasses.dataclass(frozen=True)
class Model:
    """Stateless: Flax modules and pure methods that take ``params``."""

    clip_config: clip_lib.CLIPConfig
    clip: clip_lib.CLIP
    head: head_lib.UCoFiAHead
    clip_checkpoint: str = ""
    init_temporal_from_clip: bool = False

    @classmethod
    def from_config(cls, model_cfg, *, max_frames: int, max_words: int) -> Model:
        """From ``config.model`` and the data sizes (``config.data.max_frames/max_words``)."""
        clip_cfg = clip_lib.CLIPConfig.from_ml(model_cfg.clip)
        head_fields = {k: v for k, v in model_cfg.head.items() if k not in HEAD_INIT_KEYS}
        remat = model_cfg.remat  # one switch: CLIP's blocks and the temporal encoder's
        head = head_lib.UCoFiAHead(
            embed_dim=clip_cfg.embed_dim,
            max_frames=int(max_frames),
            max_words=int(max_words),
            remat=remat,
            **head_fields,
        )
        return cls(
            clip_config=clip_cfg,
            clip=clip_lib.CLIP(clip_cfg, remat=remat),
            head=head,
            clip_checkpoint=model_cfg.clip.checkpoint,
            init_temporal_from_clip=bool(model_cfg.head.init_temporal_from_clip),
        )

    @property
    def masks_padding(self) -> bool:
        """Whether padded words / frames are kept out of the ISA softmaxes (not the original)."""
        return self.head.mask_padding

    # ---------------------------------------------------------------- init
    def init(self, rng: jax.Array) -> Params:
        """CLIP from ``clip_checkpoint`` (or random) + a random head; the head's temporal
        encoder starts as CLIP's text blocks when ``init_temporal_from_clip``."""
        r_clip, r_head, r_sel = jax.random.split(rng, 3)
        if self.clip_checkpoint:
            cfg = self.clip_config
            _, clip_params = clip_import.load_pretrained(
                self.clip_checkpoint,
                **cfg.sizes(),  # refused, naming the keys, where the checkpoint differs
                activation=cfg.activation,
                token_shift_blocks=cfg.token_shift_blocks,
                token_shift_n_div=cfg.token_shift_n_div,
                dtype=cfg.dtype,
            )
        else:
            _, clip_params = clip_lib.init_clip(self.clip_config, r_clip)
        head_params = self._init_head(r_head, r_sel)
        if self.init_temporal_from_clip:
            head_params = head_lib.init_temporal_from_clip(head_params, clip_params)
        return {"clip": clip_params, "head": head_params}

    def _init_head(self, rng: jax.Array, selection_rng: jax.Array) -> Params:
        variables = jax.jit(self._head_variables)(rng, selection_rng)
        return dict(nn.unbox(variables["params"]))  # plain arrays (the names: logical_axes)

    def _head_variables(self, rng: jax.Array, selection_rng: jax.Array) -> Params:
        """The head's ``init`` variables, boxed with their logical axis names."""
        h, d = self.head, self.head.embed_dim
        n = 1 + self.clip_config.grid_size**2
        f, w = h.max_frames, h.max_words
        args = (
            jnp.zeros((1, d)),
            jnp.zeros((1, w, d)),
            jnp.zeros((1, f, d)),
            jnp.zeros((1, f * n, d)),
            jnp.ones((1, f), jnp.int32),
            jnp.zeros(()),
        )
        return h.init(rng, *args, rng=selection_rng, train=True)

    def _clip_variables(self, rng: jax.Array) -> Params:
        """CLIP's ``init`` variables, boxed with their logical axis names."""
        res = self.clip_config.image_resolution
        images = jnp.zeros((1, res, res, 3), jnp.float32)
        return self.clip.init(rng, images, jnp.zeros((1, 2), jnp.int32))

    # ---------------------------------------------------------------- towers
    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``encode_text``'s token ids 't w' (int32; CLIP's BPE, ``max_words``
        long, as the data pipeline tokenizes captions)."""
        ids, _ = tokenizer.tokenize(list(texts), self.head.max_words)
        return ids

    def encode_text(self, params: Params, input_ids: jax.Array) -> TextFeatures:
        """Token ids 't w' -> the text side of every pair (once per caption)."""
        hidden = self.clip.apply(
            {"params": params["clip"]}, input_ids, method=clip_lib.CLIP.encode_text
        )
        sentence = clip_lib.sentence_features(hidden, input_ids)
        eot = clip_lib.eot_positions(input_ids)  # real tokens are SOT..EOT
        mask = (jnp.arange(input_ids.shape[1])[None, :] <= eot[:, None]).astype(jnp.int32)
        return self.head.apply(
            {"params": params["head"]},
            sentence,
            hidden,
            mask,
            method=head_lib.UCoFiAHead.encode_text,
        )

    def encode_video(
        self,
        params: Params,
        frames: jax.Array,
        frame_mask: jax.Array,
        rng: Optional[jax.Array],
        *,
        train: bool = False,
        example_index: Optional[jax.Array] = None,
    ) -> VideoFeatures:
        """Frames uint8 'b f s s 3' + mask 'b f' -> the video side of every pair. ``rng``
        draws the token-selection noise (the original draws it at inference too). In
        training each video's noise comes from ``fold_in(rng, example_index[i])`` (default:
        its row), so a micro-batch re-encoded alone draws the same noise as in the batch."""
        x = clip_lib.normalize_images(frames) if frames.dtype == jnp.uint8 else frames
        hidden = self.clip.apply({"params": params["clip"]}, x, method=clip_lib.CLIP.encode_video)
        return self.head.apply(
            {"params": params["head"]},
            hidden[:, :, 0],  # frame CLS 'b f d'
            einops.rearrange(hidden, "b f n d -> b (f n) d"),  # every token of every frame
            frame_mask,
            rng=rng,
            train=train,
            example_index=example_index,
            method=head_lib.UCoFiAHead.encode_video,
        )

    # ---------------------------------------------------------------- pairs
    def score(
        self,
        params: Params,
        text: TextFeatures,
        video: VideoFeatures,
        *,
        train: bool = False,
        blockwise: Optional[Blocks] = None,
        pair_fn: PairFn = similarity.pair_levels,
    ) -> similarity.SimilarityLevels:
        """The three levels ['t v'] of every (text, video) pair; ``.mean()`` is the score.

        ``blockwise``: tile the pairs (exact: every softmax lives inside one pair); the
        projections still run once per text / video. ``pair_fn``: the pair function, e.g.
        ``kernels.native.pair_levels_for(...)``'s choice; a stable module-level function.
        """
        text_in, video_in, consts = self.head.apply(
            {"params": params["head"]},
            text,
            video,
            params["clip"]["logit_scale"],
            train=train,
            method=head_lib.UCoFiAHead.pair_inputs,
        )
        if blockwise is None:
            return similarity.SimilarityLevels(*pair_fn(text_in, video_in, consts))
        levels = blockwise_similarity(
            pair_fn,
            text_in,
            video_in,
            consts,
            text_block=blockwise.text,
            video_block=blockwise.video,
            mesh=blockwise.mesh,
            axis=blockwise.axis,
            video_block_fn=similarity.prepare_video_block,
        )
        return similarity.SimilarityLevels(*levels)

    def coarse_query(self, params: Params, sentence: jax.Array) -> jax.Array:
        """Sentence features 't d' -> 't d' query vectors whose dot product with a video's
        ``VideoFeatures.video`` is that pair's video-sentence level (level 1 of ``score``):
        ``scale (s Wg) . (v Wg1) = (scale s Wg Wg1^T) . v``. Moving both projections to the
        text side lets a search rank stored video vectors by the model's own coarse score
        with one matmul, or with a vector index over them."""
        head = params["head"]
        scale = jnp.exp(jnp.asarray(params["clip"]["logit_scale"], jnp.float32))
        return scale * (sentence @ head["global_mat_weight"]) @ head["global_mat_weight_1"].T

    def logits(
        self, params: Params, batch: Dict[str, jax.Array], rng: jax.Array, *, train: bool = True
    ) -> jax.Array:
        """[B, B] text x video logits over the (global) batch: the mean of the three levels.

        ``batch``: ``input_ids`` 'b w', ``frames`` 'b f s s 3', ``frame_mask`` 'b f'."""
        text = self.encode_text(params, batch["input_ids"])
        video = self.encode_video(params, batch["frames"], batch["frame_mask"], rng, train=train)
        return self.score(params, text, video, train=train).mean()

    def loss(
        self, params: Params, batch: Dict[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(symmetric cross-entropy, the [B, B] logits) of one training batch."""
        logits = self.logits(params, batch, rng, train=True)
        return symmetric_cross_entropy(logits), logits

    def loss_from_features(
        self, params: Params, text: TextFeatures, video: VideoFeatures
    ) -> tuple[jax.Array, jax.Array]:
        """(loss, logits) from already encoded training features: ``loss`` is
        ``loss_from_features(params, encode_text(...), encode_video(..., train=True))``.
        Differentiable in ``params`` (the head's projections and ISA matrices, CLIP's
        logit_scale: what scoring reads directly) and in the features (exact gradient
        accumulation pulls the latter back through the towers, micro-batch by micro-batch)."""
        logits = self.score(params, text, video, train=True).mean()
        return symmetric_cross_entropy(logits), logits

    # ---------------------------------------------------------------- layout
    def logical_axes(self, params: Params) -> Any:
        """Per leaf of ``params`` (arrays or shapes), its logical axis names as a PartitionSpec:
        the names each module declares where it creates the parameter (``layers.named``),
        read from the boxed init's shapes (nothing is computed). runtime.sharding maps them
        to mesh axes. A parameter the modules do not declare, or declare with another rank,
        is an error naming it."""
        rng = jax.random.PRNGKey(0)
        declared = {}
        for part, variables in (
            ("clip", jax.eval_shape(self._clip_variables, rng)),
            ("head", jax.eval_shape(self._head_variables, rng, rng)),
        ):
            declared.update(layers_lib.declared_axes(variables["params"], f"{part}/"))

        def axes(path, leaf):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            spec = declared.get(name)
            if spec is None:
                raise KeyError(
                    f"model.py: parameter {name} is not one the model's modules create "
                    "(no logical axis names); is the params tree from another model?"
                )
            if len(spec) != len(np.shape(leaf)):
                raise ValueError(
                    f"model.py: parameter {name} has shape {np.shape(leaf)} but logical "
                    f"axes {tuple(spec)}"
                )
            return spec  # a leaf of the tree (tuples would be nodes)

        return jax.tree_util.tree_map_with_path(axes, params)
