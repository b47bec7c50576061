"""Where the search model comes from, and the model itself behind the one door.

Three sources (``ModelSource``):

* ``workdir``: a training run's directory: its ``config.json`` and the checkpoint that
  ``--mode=eval`` would evaluate (``checkpoints_best`` if present, else the latest);
* ``ucofia_checkpoint`` (+ ``clip``): the released UCoFiA ``pytorch_model.bin`` with the
  OpenAI CLIP weights, sized by a config file (default ``configs/msrvtt.py``);
* ``clip_only``: only CLIP weights (``clip``); the score is the cosine of the mean-pooled
  CLIP frame features and the sentence feature (the zero-shot baseline), the head is unused.

``SearchModel`` encodes and scores only through ``Model.encode_text`` / ``encode_video`` and
the evaluation's ``retrieval_fns`` (the same jitted encoders and the same blockwise scorer,
with the same level-3 kernel choice), so search and evaluation share one code path.

The fingerprint (``SearchModel.fingerprint``) hashes the model config (without file paths),
the frame sampling and the parameter values; an index remembers it and refuses a model with
another one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from data_pipeline.sampling import FrameSampling
from ucofia_jax import weights as weights_lib
from ucofia_jax.config import base_config
from ucofia_jax.errors import SourceError
from ucofia_jax.evaluation import evaluator
from ucofia_jax.models.features import TextFeatures, VideoFeatures
from ucofia_jax.models.model import Model
from ucofia_jax.search.notice import SYNTHETIC_NOTICE, training_notice  # noqa: F401 -- API

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = "msrvtt"
# Config keys that name files, not what the model computes (the params hash covers weights).
_PATH_KEYS = ("checkpoint", "ucofia_checkpoint")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """How to load the model; stored in the index so that ``query`` needs no model flags."""

    workdir: str = ""
    ucofia_checkpoint: str = ""
    clip: str = ""
    config: str = ""  # a configs/*.py file or name, for checkpoint sources
    clip_only: bool = False

    def __post_init__(self):
        if self.workdir and (self.ucofia_checkpoint or self.clip):
            raise SourceError("give either --workdir or --ucofia_checkpoint/--clip, not both")
        if not self.workdir and not (self.ucofia_checkpoint or self.clip):
            raise SourceError(
                "no model: give --workdir (a training run), --ucofia_checkpoint "
                "pytorch_model.bin --clip ViT-B-32.pt, or --clip ViT-B-32.pt --clip_only"
            )
        if self.clip_only and self.ucofia_checkpoint:
            raise SourceError("--clip_only uses CLIP weights only; drop --ucofia_checkpoint")
        if self.ucofia_checkpoint and not self.clip:
            raise SourceError("--ucofia_checkpoint needs --clip (the OpenAI CLIP weights)")

    def absolute(self) -> ModelSource:
        ab = {
            k: (os.path.abspath(v) if v and k != "config" else v)
            for k, v in dataclasses.asdict(self).items()
            if isinstance(v, str)
        }
        return dataclasses.replace(self, **ab)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> ModelSource:
        return cls(**{f.name: d.get(f.name, f.default) for f in dataclasses.fields(cls)})


def load_config_file(name_or_path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a configs/*.py file, given a path or a name like 'msrvtt'."""
    path = Path(name_or_path or DEFAULT_CONFIG)
    if not path.suffix:
        path = REPO_CONFIGS / f"{path}.py"
    if not path.is_file():
        raise SourceError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"_search_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise SourceError(f"{path}: missing (is {workdir} a training run's --workdir?)")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not a JSON config ({e})") from e
    # A run written before a key existed takes that key's default (e.g. data.jpeg_quality);
    # every key the run saved is kept as it was.
    return ml_collections.ConfigDict(_with_missing_defaults(saved, base_config().to_dict()))


def _with_missing_defaults(saved: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_missing_defaults(out[key], value)
    return out


def params_hash(params) -> str:
    """SHA-256 of every parameter's path, dtype, shape and bytes (float32 on the host)."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{x.dtype}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def describe_config(config, clip_only: bool) -> Dict[str, Any]:
    """What the fingerprint covers besides the weights: model config (no paths), sampling."""
    model = config.model.to_dict()
    model.pop("ucofia_checkpoint", None)
    clip = model.get("clip", {})
    clip.pop("checkpoint", None)
    if "dtype" in clip:  # 'auto' is bf16 on an accelerator, f32 on CPU: other features
        clip["dtype"] = weights_lib.clip_dtype(config)
    frames = FrameSampling.from_config(config.data).to_dict()
    jpeg_quality = frames.pop("jpeg_quality")  # frames take the dataset's JPEG round trip
    return {
        "model": model,
        # This layout predates FrameSampling ("sampling" also held the text side's max_words);
        # kept so that the fingerprints of indexes already written still match.
        "sampling": {**frames, "max_words": int(config.data.max_words)},
        "jpeg_quality": jpeg_quality,
        "seed": int(config.seed),
        "clip_only": bool(clip_only),
    }


def fingerprint_of(description: Dict[str, Any], weights_hash: str) -> str:
    text = json.dumps(description, sort_keys=True, default=list) + weights_hash
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclasses.dataclass
class SearchModel:
    """A loaded model: encode texts / videos and score pairs (numpy in, numpy out)."""

    source: ModelSource
    config: ml_collections.ConfigDict
    model: Model
    params: Any
    fingerprint: str
    description: Dict[str, Any]
    step: Optional[int] = None
    # True for the index's saved query model (search/query_model.py): no vision tower, so
    # it encodes texts and scores stored features but cannot encode videos.
    query_only: bool = False

    def __post_init__(self):
        eval_cfg = self.config.eval
        # One local device: the search encodes on this process's first device; the
        # multi-process index job splits files, not batches.
        mesh = Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
        self.fns = evaluator.retrieval_fns(self.model, mesh, eval_cfg)
        self._noise_key = jax.random.PRNGKey(int(self.config.seed))
        self._per_video = jax.jit(self._encode_per_video_noise)

    # ------------------------------------------------------------------ sizes
    @property
    def clip_only(self) -> bool:
        return self.source.clip_only

    @property
    def sampling(self) -> FrameSampling:
        """The training / evaluation frame sampling (``config.data``), JPEG quality included."""
        return FrameSampling.from_config(self.config.data)

    def decode_job(self, path: str, rel: str) -> Dict[str, Any]:
        """What a decode worker needs for one file (`decoding.decode_one`): the sampling, whose
        JPEG round trip makes the frames what training and evaluation saw (the TFDS set stores
        JPEG frames)."""
        return {"path": path, "rel": rel, "sampling": self.sampling}

    def _check_can_encode_videos(self) -> None:
        if self.query_only:
            raise SourceError(
                "this is an index's saved query model (no vision tower): it cannot encode "
                "videos; load the model from its source (load_model) for that"
            )

    def feature_shapes(self) -> Dict[str, list]:
        """Per-video stored shapes (from an abstract evaluation: nothing runs)."""
        self._check_can_encode_videos()
        f, s = self.sampling.max_frames, self.sampling.image_size
        frames = jax.ShapeDtypeStruct((1, f, s, s, 3), jnp.uint8)
        mask = jax.ShapeDtypeStruct((1, f), jnp.int32)
        out = jax.eval_shape(
            lambda p, f, m: self.model.encode_video(p, f, m, jax.random.PRNGKey(0)),
            self.params,
            frames,
            mask,
        )
        shapes = {"vector": list(out.video.shape[1:])}
        if not self.clip_only:
            shapes.update(
                frames=list(out.frames.shape[1:]),
                pixels=list(out.pixels.shape[1:]),
                mask=list(out.mask.shape[1:]),
            )
        return shapes

    # ------------------------------------------------------------------ encoders
    def encode_texts(self, texts: Sequence[str]) -> TextFeatures:
        ids = self.model.tokenize(texts)
        return jax.tree.map(np.asarray, self.fns.encode_text(self.params, ids))

    def _encode_per_video_noise(self, params, frames, mask, seeds):
        """Each video draws its selection noise from its own key, so its features do not
        depend on the batch it was encoded in (nor on the process)."""

        def one(fr, m, seed):
            key = jax.random.fold_in(self._noise_key, seed)
            feats = self.model.encode_video(params, fr[None], m[None], key, train=False)
            return jax.tree.map(lambda x: x[0], feats)

        return jax.vmap(one)(frames, mask, seeds)

    def encode_frames(
        self, frames: np.ndarray, mask: np.ndarray, seeds: np.ndarray
    ) -> Dict[str, np.ndarray]:
        """uint8 frames 'b f s s 3', mask 'b f', uint32 per-video noise seeds 'b' ->
        {'vector', 'frames', 'pixels', 'mask'} float32 numpy (only 'vector' with clip_only)."""
        self._check_can_encode_videos()
        mask = np.asarray(mask, np.int32)
        noisy = self.model.head.selection_noise_at_eval and not self.clip_only
        if noisy:
            feats = self._per_video(self.params, frames, mask, np.asarray(seeds, np.uint32))
        else:  # deterministic selection: the evaluation's own jitted encoder
            feats = self.fns.encode_video(self.params, frames, mask, self._noise_key)
        feats = jax.tree.map(np.asarray, feats)
        if self.clip_only:
            return {"vector": mean_pooled(feats.frames, feats.mask)}
        return {
            "vector": feats.video,
            "frames": feats.frames,
            "pixels": feats.pixels,
            "mask": feats.mask,
        }

    # ------------------------------------------------------------------ scores
    def shortlist_query(self, text: TextFeatures) -> np.ndarray:
        """[texts, d] float32 vectors whose dot product with the stored ``vector`` column is
        the shortlist score: the model's video-sentence level with its trained projections
        (``Model.coarse_query``), or the CLIP cosine with ``clip_only``."""
        if self.clip_only:
            return np.asarray(text.sentence, np.float32)
        return np.asarray(self.model.coarse_query(self.params, text.sentence), np.float32)

    def score(self, text: TextFeatures, video: Dict[str, np.ndarray]) -> np.ndarray:
        """[texts, videos] scores: the mean of the three levels (the evaluation's matrix,
        without SK-norm), or the CLIP cosine with ``clip_only``."""
        if self.clip_only:
            return np.asarray(text.sentence, np.float32) @ video["vector"].T
        vf = VideoFeatures(
            video=video["vector"],
            frames=video["frames"],
            pixels=video["pixels"],
            mask=video["mask"],
        )
        return self.fns.score(self.params, text, vf).mean(axis=0)


def mean_pooled(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """L2-normalised mean of the real frames' CLIP features (the zero-shot baseline)."""
    m = np.asarray(mask, np.float32)[..., None]
    v = (np.asarray(frames, np.float32) * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def load_model(source: ModelSource, *, overrides: Optional[Dict[str, Any]] = None) -> SearchModel:
    """Loads ``source`` (see the module doc). ``overrides``: dotted config keys -> values
    (e.g. {'model.head.selection_noise_at_eval': False}) applied before building."""
    source = source.absolute()
    if source.workdir:
        config = _read_workdir_config(source.workdir)
    else:
        config = load_config_file(source.config)
        config.model.clip.checkpoint = source.clip
        config.model.ucofia_checkpoint = source.ucofia_checkpoint
        for p in (source.clip, source.ucofia_checkpoint):
            if p and not os.path.isfile(p) and not os.path.isdir(p):
                raise SourceError(f"{p}: no such checkpoint file")
    if source.clip_only:  # the zero-shot baseline is plain CLIP: no TS2-Net token shift
        config.model.clip.token_shift_blocks = ()
    config.update_from_flattened_dict(dict(overrides or {}))
    loaded = weights_lib.load(config, workdir=source.workdir or None)
    model, step = loaded.model, (loaded.step if source.workdir else None)
    params = jax.device_put(loaded.params, jax.local_devices()[0])
    description = describe_config(config, source.clip_only)
    weights = params["clip"] if source.clip_only else params
    fingerprint = fingerprint_of(description, params_hash(weights))
    return SearchModel(source, config, model, params, fingerprint, description, step)
