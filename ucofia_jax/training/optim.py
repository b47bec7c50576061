"""The original optimiser (CLIP4Clip's BertAdam, SPEC §9.2) as an optax chain, plus AdamW.

BertAdam, per parameter tensor p with gradient g, at step s = 0, 1, ... of t_total::

    g <- g * min(1, 1 / (||all grads|| + 1e-6))        # torch clip_grad_norm_(model, 1.0)
    g <- g * min(1, 1 / (||g|| + 1e-6))                # clip_grad_norm_(p, 1.0) inside BertAdam
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2  # no bias correction
    u  = m / (sqrt(v) + eps) + wd * p                  # decoupled decay, every non-bias tensor
    p <- p - lr_group * warmup_cosine(s / t_total) * u

``warmup_cosine(x) = x / w`` for x < w, else ``0.5 (1 + cos(pi x))``: lr is 0 at step 0 and
the cosine runs over the whole run. Groups: CLIP params get ``clip_lr``, the head ``lr``;
frozen CLIP params (embeddings, SPEC §3) never change. ``logit_scale`` is clamped at ln 100
after the update (:func:`clamp_logit_scale`, called by the train step).

As optax: the global clip, masked to the trainable params, then ``optax.multi_transform``
over the labels of :func:`param_labels`: 'clip' and 'head' each the per-tensor chain with its
own schedule (:func:`group_schedules`), 'frozen' ``optax.set_to_zero()``.

Parameters are the pytree ``{'clip': ..., 'head': ...}`` of ``models.model``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any

# Torch's clip_grad_norm_ divides by (norm + 1e-6); optax's clip_by_global_norm does not.
TORCH_CLIP_EPS = 1e-6
OPTIMIZERS = ("bertadam", "adamw")  # config.train.optimizer
SCHEDULES = ("warmup_cosine", "constant")  # config.train.schedule


# --------------------------------------------------------------------------- schedules


def warmup_cosine(step: jax.Array, total_steps: int, warmup_proportion: float) -> jax.Array:
    """BertAdam's multiplier at ``step`` (0-based): linear warmup, then cosine over the run."""
    x = jnp.asarray(step, jnp.float32) / float(max(total_steps, 1))
    if warmup_proportion <= 0:
        return 0.5 * (1.0 + jnp.cos(jnp.pi * x))
    return jnp.where(
        x < warmup_proportion, x / warmup_proportion, 0.5 * (1.0 + jnp.cos(jnp.pi * x))
    )


def make_schedule(
    base_lr: float, total_steps: int, warmup_proportion: float, kind: str
) -> optax.Schedule:
    if kind == "constant":
        return lambda step: jnp.asarray(base_lr, jnp.float32)
    if kind == "warmup_cosine":
        return lambda step: base_lr * warmup_cosine(step, total_steps, warmup_proportion)
    raise ValueError(f"config.train.schedule: unknown schedule {kind!r}")


# --------------------------------------------------------------------------- labels


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def param_labels(params: PyTree, frozen: Sequence[str] = ()) -> PyTree:
    """'clip' | 'head' | 'frozen' per leaf. ``frozen``: path prefixes under ``clip/``."""
    frozen = tuple(f"clip/{f.strip('/')}" for f in frozen)

    def label(path, _):
        name = _path_str(path)
        if any(name == f or name.startswith(f + "/") for f in frozen):
            return "frozen"
        return "clip" if name.startswith("clip/") or name == "clip" else "head"

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: PyTree) -> PyTree:
    """True where weight decay applies: every tensor whose name has no 'bias' (SPEC §9.2: LN
    scales and the identity-initialised matrices *are* decayed, as in the original)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "bias" not in _path_str(p), params)


# --------------------------------------------------------------------------- transforms


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_`` over the whole tree (scale min(1, c / (n + 1e-6)))."""

    def update_fn(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + TORCH_CLIP_EPS))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def clip_per_tensor_torch(max_norm: float) -> optax.GradientTransformation:
    """``clip_grad_norm_(p, max_norm)`` for each tensor separately (inside BertAdam)."""

    def update_fn(updates, state, params=None):
        del params

        def one(g):
            n = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            return g * jnp.minimum(1.0, max_norm / (n + TORCH_CLIP_EPS)).astype(g.dtype)

        return jax.tree.map(one, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


class ScaleByAdamNoBiasState(NamedTuple):
    mu: PyTree
    nu: PyTree


def scale_by_adam_no_bias_correction(
    b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    """m / (sqrt(v) + eps) with raw (uncorrected) moments, as BertAdam."""

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)
        return ScaleByAdamNoBiasState(jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return out, ScaleByAdamNoBiasState(mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- builders


def group_schedules(train_cfg, total_steps: int) -> Dict[str, optax.Schedule]:
    """The lr schedule of each trainable group (CLIP ``train.clip_lr``, the head ``train.lr``)
    over ``total_steps``. Built once by the trainer, which hands the same schedules to
    :func:`make_optimizer` and logs their values, so the logged lr is the applied one."""
    return {
        group: make_schedule(base_lr, total_steps, train_cfg.warmup_proportion, train_cfg.schedule)
        for group, base_lr in (("clip", train_cfg.clip_lr), ("head", train_cfg.lr))
    }


def _grouped_chain(
    moments: optax.GradientTransformation,
    schedules: Dict[str, optax.Schedule],
    *,
    weight_decay: float,
    grad_clip: float,
    per_tensor_clip: float,
    frozen: Sequence[str],
) -> optax.GradientTransformation:
    """Global clip over the trainable params, then per group (:func:`param_labels`):
    clipping -> ``moments`` -> decoupled decay -> ``-schedules[group](step) * u``; frozen
    updates are exactly 0."""
    frozen = tuple(frozen)
    labels = lambda tree: param_labels(tree, frozen)

    def group(schedule):
        parts = []
        if per_tensor_clip > 0:
            parts.append(clip_per_tensor_torch(per_tensor_clip))
        parts.append(moments)
        if weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
        parts.append(optax.scale_by_learning_rate(schedule))
        return optax.chain(*parts)

    transforms = {name: group(schedule) for name, schedule in schedules.items()}
    transforms["frozen"] = optax.set_to_zero()
    parts = []
    if grad_clip > 0:
        # Frozen grads stay out of the norm (torch: ``requires_grad=False`` params have none).
        trainable = lambda tree: jax.tree.map(lambda label: label != "frozen", labels(tree))
        parts.append(optax.masked(clip_by_global_norm_torch(grad_clip), trainable))
    # multi_transform, not its newer name partition: setup.py allows optax 0.2.3.
    parts.append(optax.multi_transform(transforms, labels))
    return optax.chain(*parts)


def bertadam(
    schedules: Dict[str, optax.Schedule],
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    grad_clip: float,
    per_tensor_clip: float,
    frozen: Sequence[str],
) -> optax.GradientTransformation:
    """The original update (module docstring) for a params tree ``{'clip', 'head'}``;
    ``schedules``: :func:`group_schedules`."""
    return _grouped_chain(
        scale_by_adam_no_bias_correction(b1, b2, eps),
        schedules,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        per_tensor_clip=per_tensor_clip,
        frozen=frozen,
    )


def adamw(
    schedules: Dict[str, optax.Schedule],
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    grad_clip: float,
    frozen: Sequence[str],
) -> optax.GradientTransformation:
    """Standard AdamW (bias-corrected), same groups, decay mask, clipping and schedules."""
    return _grouped_chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        schedules,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        per_tensor_clip=0.0,
        frozen=frozen,
    )


def make_optimizer(train_cfg, schedules: Dict[str, optax.Schedule]) -> optax.GradientTransformation:
    """From ``config.train``: 'bertadam' (the original) or 'adamw', with the per-group
    ``schedules`` of :func:`group_schedules`."""
    kwargs = dict(
        b1=train_cfg.b1,
        b2=train_cfg.b2,
        eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay,
        grad_clip=train_cfg.grad_clip,
        frozen=tuple(train_cfg.frozen),
    )
    if train_cfg.optimizer == "bertadam":
        return bertadam(schedules, per_tensor_clip=train_cfg.per_tensor_clip, **kwargs)
    if train_cfg.optimizer == "adamw":
        return adamw(schedules, **kwargs)
    raise ValueError(f"config.train.optimizer: unknown optimizer {train_cfg.optimizer!r}")


def clamp_logit_scale(params: PyTree, max_value: float = math.log(100.0)) -> PyTree:
    """``logit_scale.data.clamp_(max=ln 100)`` after every step (main_ucofia.py:287-290)."""
    if "clip" in params and "logit_scale" in params["clip"]:
        clip = dict(params["clip"])
        clip["logit_scale"] = jnp.minimum(clip["logit_scale"], max_value)
        return {**params, "clip": clip}
    return params
