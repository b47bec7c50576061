"""The weights door: a model and its params, from wherever the weights come from.

    loaded = weights.load(config)                  # released / CLIP alone / random init
    loaded = weights.load(config, workdir=RUN)     # a training run's checkpoint
    loaded.model, loaded.params, loaded.step

The source follows from the arguments and the config, first match wins:

* ``workdir``: the checkpoint of that run that ``--mode=eval`` evaluates
  (``checkpoints_best`` if it holds one, else the latest readable one of ``checkpoints``).
  Only the params are read from the saved train state, not the optimizer state: no
  optimizer config is needed, and nothing but the params is held in memory;
* ``config.model.ucofia_checkpoint``: the released UCoFiA ``pytorch_model.bin``: its head,
  and its CLIP when the file holds one, else CLIP from ``config.model.clip.checkpoint``;
* ``config.model.clip.checkpoint``: CLIP weights, a random head (the zero-shot baseline
  uses CLIP alone);
* nothing: random init.

Random parts are ``Model.init(PRNGKey(config.seed))``. The main program (``--mode=eval``)
and the search tool load weights only here. A file that cannot be read raises
:class:`ucofia_jax.errors.CheckpointError` naming it; a checkpoint made for another head
config raises :class:`ucofia_jax.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ucofia_jax.errors import ConfigError
from ucofia_jax.models import clip as clip_lib
from ucofia_jax.models import ucofia_names
from ucofia_jax.models.model import Model, Params
from ucofia_jax.training import checkpoints


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model, its params (``{'clip', 'head'}``) and the training step they are from (0 for
    weights that are no run's checkpoint)."""

    model: Model
    params: Params
    step: int


def load(config, *, workdir: Optional[str] = None) -> Loaded:
    """The model of ``config`` (``config.model`` + ``config.data``'s sizes) and its params
    from the source the module doc describes."""
    model = Model.from_config(
        config.model, max_frames=config.data.max_frames, max_words=config.data.max_words
    )
    rng = jax.random.PRNGKey(int(config.seed))
    if workdir:
        params, meta = checkpoints.restore_params(workdir, jax.eval_shape(model.init, rng))
        return Loaded(model, params, int(meta["step"]))
    if config.model.ucofia_checkpoint:
        return Loaded(model, _released(model, rng, config.model.ucofia_checkpoint), 0)
    return Loaded(model, model.init(rng), 0)


def clip_dtype(config) -> str:
    """The CLIP compute dtype ``config`` builds on this backend (``'auto'`` resolved): what
    the features depend on besides the weights (the search fingerprint)."""
    return clip_lib.resolve_dtype(config.model.clip.dtype)


def _released(model: Model, rng, path: str) -> Params:
    """The released checkpoint's head (checked against our head's shapes) and its CLIP,
    else ours (``Model.init``: config.model.clip.checkpoint or random)."""
    # Shapes only (nothing runs, no CLIP file is read): the file's head replaces all of ours.
    shapes = jax.eval_shape(dataclasses.replace(model, clip_checkpoint="").init, rng)
    parts = ucofia_names.load_original_checkpoint(path, head_template=shapes["head"])
    predictor = parts["predictor"]
    if predictor and predictor != model.head.predictor:
        raise ConfigError(
            f"{path} has the '{predictor}' token predictor; set "
            f"config.model.head.predictor='{predictor}' (it is '{model.head.predictor}')"
        )
    head = jax.tree.map(jnp.asarray, parts["head_params"])
    if parts["clip_params"] is not None:
        clip: Any = jax.tree.map(jnp.asarray, parts["clip_params"])
    else:
        clip = model.init(rng)["clip"]
    return {"clip": clip, "head": head}
