"""UCoFiA head (SPEC §4-7): token selector, temporal encoder (seqTransf), the ISA matrices and
the forward from per-token CLIP features to the similarity matrix.

The module only owns parameters and wires the pure functions of ``ucofia_jax.ops``;
video-side work (temporal encoder, selection) runs once per video in ``encode_video``,
text-side work once per text in ``encode_text``, and only ``ops.similarity.pair_levels`` runs
per (text, video) pair (see ``ops.blockwise`` for the N x M evaluation).

Fidelity first: the defaults reproduce the original, quirks included; each fixable quirk is a
field (see docs/head.md for the table).
"""

from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from ucofia_jax.config import base_config
from ucofia_jax.models.features import TextFeatures, VideoFeatures
from ucofia_jax.models.layers import LayerNorm, Transformer, named
from ucofia_jax.ops import similarity as sim_ops
from ucofia_jax.ops.topk import NOISE_PRNGS, hard_topk, perturbed_topk

POSITION_TABLE = 77  # nn.Embedding(77, D): CLIP's context length (SPEC §5)
KEY_MASK_VALUE = -1e6  # additive key-padding mask of seqTransf
PREDICTORS = ("new", "old")  # PredictorLG of the training code / of the original t2v eval
_DEFAULTS = base_config().model  # the one home of the fields' defaults


def _eye_init(key, shape, dtype=jnp.float32):
    del key
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"identity init needs a square shape, got {shape}")
    return jnp.eye(shape[0], dtype=dtype)


_linear_init = nn.initializers.normal(0.02)  # until_module.init_weights: N(0, 0.02)


class _ConcatDense(nn.Module):
    """``Dense(concat([x, ctx], -1))`` without bias, for a ``ctx`` shared along axis 1.

    x '(b f) n a', ctx '(b f) 1 c' -> '(b f) n features'. The kernel is the Dense's
    ([a + c, features], same name and init), split by rows so that the context half is
    multiplied once per row of ctx instead of once per token: half the FLOPs of the
    selector's largest GEMM. Equal to the concatenated form up to float32 summation order.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, ctx: jax.Array) -> jax.Array:
        a = x.shape[-1]
        init = named(_linear_init, None, "mlp")  # rows: [x features; ctx features]
        kernel = self.param("kernel", init, (a + ctx.shape[-1], self.features))
        return x @ kernel[:a] + ctx @ kernel[a:]


class PredictorLG(nn.Module):
    """Token score predictor, both versions of the original (SPEC §4.2).

    'new' (train/, eval_v2t/): h = GELU(Lin_{D->D/2}(LN_D(x))); [h, h_cls] -> Lin_{D->D/2} ->
    GELU -> Lin_{D/2->1} -> tanh.  'old' (eval_t2v/): x' = [x, x_cls] -> LN_2D -> Lin_{2D->D}
    -> GELU = h; video context = **sum** over all frames of h_cls; [h, ctx] -> Lin_{2D->D} ->
    GELU -> Lin_{D->1} -> tanh. No biases in the linears; exact-erf GELU; LN eps 1e-5.
    """

    embed_dim: int
    version: str  # one of PREDICTORS

    @nn.compact
    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        # x: '(b f) n d' -> scores '(b f) n'
        d = self.embed_dim
        gelu = lambda y: jax.nn.gelu(y, approximate=False)
        in_init = named(_linear_init, "embed", "mlp")
        if self.version == "new":
            h = LayerNorm(1e-5, name="in_norm")(x)
            h = gelu(nn.Dense(d // 2, use_bias=False, kernel_init=in_init, name="in_proj")(h))
            # out_fc1([h, h_cls]): the frame's CLS context, '(b f) 1 d/2'
            h = gelu(_ConcatDense(d // 2, name="out_fc1")(h, h[:, :1]))
        elif self.version == "old":
            x2 = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], x.shape)], axis=-1)  # 2d
            h = LayerNorm(1e-5, name="in_norm")(x2)
            h = gelu(nn.Dense(d, use_bias=False, kernel_init=in_init, name="in_proj")(h))
            bf, n = h.shape[0], h.shape[1]
            hv = h.reshape(bf // num_frames, num_frames, n, d)
            ctx = jnp.sum(hv[:, :, 0], axis=1)  # 'b d', sum!
            ctx = jnp.broadcast_to(ctx[:, None, None, :], (bf // num_frames, num_frames, 1, d))
            h = gelu(_ConcatDense(d, name="out_fc1")(h, ctx.reshape(bf, 1, d)))
        else:
            raise ValueError(f"predictor must be 'new' or 'old', got {self.version!r}")
        out_init = named(_linear_init, "mlp", None)
        s = nn.Dense(1, use_bias=False, kernel_init=out_init, name="out_fc2")(h)
        return jnp.tanh(s[..., 0])


class UCoFiAHead(nn.Module):
    """The UCoFiA head on top of CLIP per-token features.

    Quirk flags (original behaviour by default):
      selection_noise_at_eval: perturbed top-k noise also at inference (original True); when
        False, inference uses the noise-free hard top-k (``ops.topk.hard_topk``).
      mask_padding: exclude padded words / padded frames (and their tokens) from the ISA
        softmaxes (original False: everything competes). Needs ``text_mask`` in encode_text.
      scale_pixel_word: multiply level 3 by exp(logit_scale) (original False).
      eval_local_mat_weight1: apply local_mat_weight1 to the pixels at inference too (original
        False: only training does, §12.1).

    Not a quirk: ``eval_noise_prng`` picks the generator of the inference selection noise drawn
    from ``rng`` ("hash": ``ops.topk.hash_normal``, ~4x cheaper on CPU, the default; "threefry":
    ``jax.random.normal``). Same N(0, 1) distribution, different draws. Training always uses
    ``jax.random.normal``; given ``noise=``/``indicator=`` nothing is drawn.

    The fields' defaults are ``config.model.head``'s (``ucofia_jax.config.base_config``, their
    one home); ``embed_dim``, ``max_frames`` and ``max_words`` come from CLIP and the data.
    """

    embed_dim: int
    max_frames: int
    max_words: int
    topk: int = _DEFAULTS.head.topk
    num_samples: int = _DEFAULTS.head.num_samples
    sigma: float = _DEFAULTS.head.sigma
    tau: float = _DEFAULTS.head.tau
    seq_layers: int = _DEFAULTS.head.seq_layers
    predictor: str = _DEFAULTS.head.predictor
    selection_noise_at_eval: bool = _DEFAULTS.head.selection_noise_at_eval
    mask_padding: bool = _DEFAULTS.head.mask_padding
    scale_pixel_word: bool = _DEFAULTS.head.scale_pixel_word
    eval_local_mat_weight1: bool = _DEFAULTS.head.eval_local_mat_weight1
    eval_noise_prng: str = _DEFAULTS.head.eval_noise_prng
    # layers.REMAT_POLICIES on the temporal encoder's blocks; set by Model from
    # config.model.remat (one switch for CLIP and the head), not a config.model.head key.
    remat: str = _DEFAULTS.remat

    @property
    def num_pixels(self) -> int:
        return (self.topk + 1) * self.max_frames

    def setup(self):
        d, f, w, p = self.embed_dim, self.max_frames, self.max_words, self.num_pixels
        if self.eval_noise_prng not in NOISE_PRNGS:
            raise ValueError(
                f"eval_noise_prng must be one of {NOISE_PRNGS}, got {self.eval_noise_prng!r}"
            )
        if f > POSITION_TABLE:
            raise ValueError(f"max_frames {f} exceeds the {POSITION_TABLE}-row position table")
        self.selector = PredictorLG(d, self.predictor, name="selector")
        self.frame_position_embeddings = self.param(
            "frame_position_embeddings",
            named(nn.initializers.normal(0.01), None, "embed"),
            (POSITION_TABLE, d),
        )
        # heads = D // 64 as the original (8 at D=512); at least 1 for small test widths.
        self.temporal = Transformer(
            width=d,
            layers=self.seq_layers,
            heads=max(1, d // 64),
            ln_eps=1e-12,
            remat=self.remat,
            # The original's seqTransf (module_cross.py) uses QuickGELU, whatever the CLIP's
            # activation: part of the head, not a setting.
            activation="quick_gelu",
            name="temporal",
        )
        # The D x D projections split like CLIP's; the ISA mixing matrices ('f f', 'w w',
        # 'p p') are small: never split.
        proj, small = named(_eye_init, "embed", "joint"), named(_eye_init, None, None)
        self.global_mat_weight = self.param("global_mat_weight", proj, (d, d))
        self.global_mat_weight_1 = self.param("global_mat_weight_1", proj, (d, d))
        self.local_mat_weight = self.param("local_mat_weight", proj, (d, d))
        self.local_mat_weight1 = self.param("local_mat_weight1", proj, (d, d))
        self.frame_logit_weight = self.param("frame_logit_weight", small, (f, f))
        self.word_mat_weight = self.param("word_mat_weight", small, (w, w))
        self.word_mat_weight2 = self.param("word_mat_weight2", small, (w, w))
        self.pixel_mat_weight = self.param("pixel_mat_weight", small, (p, p))
        self.pixel_mat_weight2 = self.param("pixel_mat_weight2", small, (p, p))

    # ------------------------------------------------------------------ video side
    def _check_video(self, frame_cls, patch_tokens, video_mask):
        b, f, d = frame_cls.shape
        if f != self.max_frames or d != self.embed_dim:
            raise ValueError(
                f"frame_cls has shape {frame_cls.shape}, expected [b, {self.max_frames}, "
                f"{self.embed_dim}] (max_frames, embed_dim)"
            )
        if patch_tokens.shape[0] != b or patch_tokens.shape[1] % f or patch_tokens.shape[2] != d:
            raise ValueError(
                f"patch_tokens has shape {patch_tokens.shape}, expected [{b}, "
                f"{f} * tokens_per_frame, {d}]"
            )
        if video_mask.shape != (b, f):
            raise ValueError(f"video_mask has shape {video_mask.shape}, expected {(b, f)}")

    def token_scores(self, patch_tokens: jax.Array) -> jax.Array:
        """Predictor scores '(b f) n' (column 0 = frame CLS, ignored by the top-k)."""
        b = patch_tokens.shape[0]
        x = patch_tokens.reshape(b * self.max_frames, -1, self.embed_dim)
        return self.selector(x, self.max_frames)

    def training_noise(self, rng, num_videos: int, num_patches: int, example_index=None):
        """The training selection noise '(b f) num_samples num_patches', N(0, 1), drawn per
        video from ``fold_in(rng, example_index[i])`` (default: the row ``i``): a video's
        noise depends on its index in the global batch only, not on how the batch is split
        into micro-batches (exact gradient accumulation re-encodes slices of the batch)."""
        idx = jnp.arange(num_videos) if example_index is None else example_index
        shape = (self.max_frames, self.num_samples, num_patches)
        draw = lambda i: jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32)
        return jax.vmap(draw)(idx).reshape(num_videos * self.max_frames, *shape[1:])

    def select_tokens(
        self,
        patch_tokens,
        *,
        train: bool = True,
        rng=None,
        noise=None,
        indicator=None,
        example_index=None,
    ):
        """Kept tokens 'b (f 4) d' = per frame [CLS, indicator . patches] (SPEC §4.1).

        Returns (pixel_tokens, scores, indicator). ``indicator`` [(b f), k, n-1] may be given
        (e.g. the original's, for parity): then the predictor gets no gradient through it.
        In training, noise drawn from ``rng`` is per video (``training_noise``;
        ``example_index`` 'b': each video's row in the global batch).
        """
        b, d, f = patch_tokens.shape[0], self.embed_dim, self.max_frames
        x = einops.rearrange(patch_tokens, "b (f n) d -> (b f) n d", f=f, d=d)
        scores = self.selector(x, f)  # '(b f) n'
        if indicator is None:
            if noise is None and not train and not self.selection_noise_at_eval:
                indicator = hard_topk(scores[:, 1:], self.topk)
            else:
                if noise is None and rng is None:
                    if not self.has_rng("selection"):
                        raise ValueError(
                            "token selection draws noise: pass rng=, noise= or "
                            "indicator=, or a 'selection' rng to apply()"
                        )
                    rng = self.make_rng("selection")
                if noise is None and train:
                    noise = self.training_noise(rng, b, x.shape[1] - 1, example_index)
                indicator = perturbed_topk(
                    scores[:, 1:],
                    self.topk,
                    self.num_samples,
                    self.sigma,
                    rng=rng,
                    noise=noise,
                    noise_prng="threefry" if train else self.eval_noise_prng,
                )
        else:
            indicator = jax.lax.stop_gradient(indicator)
        sel = jnp.einsum("bkl,bld->bkd", indicator.astype(x.dtype), x[:, 1:])
        kept = jnp.concatenate([x[:, :1], sel], axis=1)  # per frame: CLS + k selected
        out = einops.rearrange(kept, "(b f) k d -> b (f k) d", b=b)
        return out, scores, indicator

    def temporal_encoder(self, frame_cls: jax.Array, video_mask: jax.Array) -> jax.Array:
        """seqTransf output *before* the residual, 'b f d' (SPEC §5)."""
        f = frame_cls.shape[1]
        x = frame_cls + self.frame_position_embeddings[:f][None]
        mask = (1.0 - video_mask.astype(jnp.float32)) * KEY_MASK_VALUE  # keys only
        return self.temporal(x, mask[:, None, None, :])  # 'b h q k'

    def encode_video(
        self,
        frame_cls,
        patch_tokens,
        video_mask,
        *,
        rng=None,
        noise=None,
        indicator=None,
        train: bool = False,
        example_index=None,
    ) -> VideoFeatures:
        """Per-video features (normalised as the original does), once per video.
        ``example_index`` 'b': the videos' rows in the global batch (training noise)."""
        self._check_video(frame_cls, patch_tokens, video_mask)
        pixels, _, _ = self.select_tokens(
            patch_tokens,
            train=train,
            rng=rng,
            noise=noise,
            indicator=indicator,
            example_index=example_index,
        )
        seq = self.temporal_encoder(frame_cls, video_mask) + frame_cls
        seq = sim_ops.l2_normalize(seq)
        m = video_mask.astype(seq.dtype)[..., None]
        video = jnp.sum(seq * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return VideoFeatures(
            video=sim_ops.l2_normalize(video),
            frames=sim_ops.l2_normalize(frame_cls),  # raw CLS, no mask (§6)
            pixels=pixels,
            mask=video_mask,
        )

    # ------------------------------------------------------------------ text side
    def encode_text(self, text_cls, text_tokens, text_mask=None) -> TextFeatures:
        """Sentence 't d' and words 't w d', L2-normalised; all word positions kept."""
        if text_cls.ndim == 3:
            text_cls = text_cls[:, 0]
        if text_tokens.shape[1:] != (self.max_words, self.embed_dim):
            raise ValueError(
                f"text_tokens has shape {text_tokens.shape}, expected [t, "
                f"{self.max_words}, {self.embed_dim}] (max_words, embed_dim)"
            )
        if text_mask is None and self.mask_padding:
            raise ValueError("mask_padding=True needs text_mask in encode_text")
        return TextFeatures(
            sentence=sim_ops.l2_normalize(text_cls),
            words=sim_ops.l2_normalize(text_tokens),
            mask=text_mask,
        )

    # ------------------------------------------------------------------ pairs
    def pair_inputs(
        self, text: TextFeatures, video: VideoFeatures, logit_scale_log, *, train: bool
    ) -> tuple[sim_ops.TextPairInputs, sim_ops.VideoPairInputs, sim_ops.PairConstants]:
        """What ``ops.similarity.pair_levels`` needs: the D x D projections, once per text
        (sentence Wg, words Wl) and once per video (video Wg1; pixels Wl1 in training, or at
        inference when the flag says so), and the constants every pair shares."""
        pixels = video.pixels
        if train or self.eval_local_mat_weight1:
            pixels = pixels @ self.local_mat_weight1
        text_in = sim_ops.TextPairInputs(
            sentence=text.sentence,
            sentence_g=text.sentence @ self.global_mat_weight,
            words_l=text.words @ self.local_mat_weight,
        )
        video_in = sim_ops.VideoPairInputs(
            video_g=video.video @ self.global_mat_weight_1, frames=video.frames, pixels_l=pixels
        )
        if self.mask_padding:
            frame_mask = video.mask.astype(bool)
            text_in = text_in._replace(word_mask=text.mask.astype(bool))
            video_in = video_in._replace(
                frame_mask=frame_mask, pixel_mask=jnp.repeat(frame_mask, self.topk + 1, axis=1)
            )
        scale = jnp.exp(jnp.asarray(logit_scale_log, jnp.float32))
        mats = sim_ops.IsaMatrices(
            self.frame_logit_weight,
            self.word_mat_weight,
            self.pixel_mat_weight,
            self.pixel_mat_weight2,
            self.word_mat_weight2,
        )
        consts = sim_ops.PairConstants(
            mats=mats,
            scale=scale,
            scale3=scale if self.scale_pixel_word else jnp.ones((), jnp.float32),
            tau=jnp.float32(self.tau),
        )
        return text_in, video_in, consts

    def __call__(
        self,
        text_cls,
        text_tokens,
        frame_cls,
        patch_tokens,
        video_mask,
        logit_scale_log,
        *,
        text_mask=None,
        rng=None,
        noise=None,
        indicator=None,
        train: bool = True,
    ):
        """Full forward from CLIP features: logits [Bt, Bv] = mean of the three levels."""
        t = self.encode_text(text_cls, text_tokens, text_mask)
        v = self.encode_video(
            frame_cls,
            patch_tokens,
            video_mask,
            rng=rng,
            noise=noise,
            indicator=indicator,
            train=train,
        )
        return sim_ops.pair_levels(*self.pair_inputs(t, v, logit_scale_log, train=train)).mean()


def init_temporal_from_clip(head_params, clip_params):
    """Copy CLIP text blocks 0..L-1 and CLIP's positional embedding into the head (SPEC §5).

    ``head_params``: the head's params dict (with or without a top-level 'params');
    ``clip_params``: CLIP params with 'transformer/resblocks_{i}' and 'positional_embedding'.
    Returns a new dict; shape mismatches raise naming the parameter.
    """
    wrapped = "params" in head_params and "temporal" not in head_params
    hp = dict(head_params["params"] if wrapped else head_params)
    cp = clip_params.get("params", clip_params) if "transformer" not in clip_params else clip_params
    temporal = dict(hp["temporal"])
    for name in sorted(temporal):
        src = cp["transformer"].get(name)
        if src is None:
            raise KeyError(f"CLIP text transformer has no block {name} for the temporal encoder")
        temporal[name] = _copy_checked(temporal[name], src, f"temporal/{name}")
    hp["temporal"] = temporal
    pos = jnp.asarray(cp["positional_embedding"])
    if pos.shape != hp["frame_position_embeddings"].shape:
        raise ValueError(
            f"frame_position_embeddings: head shape "
            f"{tuple(hp['frame_position_embeddings'].shape)} vs CLIP "
            f"positional_embedding {tuple(pos.shape)}"
        )
    hp["frame_position_embeddings"] = pos
    return {"params": hp} if wrapped else hp


def _copy_checked(dst, src, path):
    if isinstance(dst, dict) or hasattr(dst, "items"):
        return {k: _copy_checked(dst[k], src[k], f"{path}/{k}") for k in dst}
    src = jnp.asarray(src)
    if src.shape != dst.shape:
        raise ValueError(f"{path}: head shape {tuple(dst.shape)} vs CLIP shape {tuple(src.shape)}")
    return src.astype(dst.dtype)
