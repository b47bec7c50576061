"""The train state and the sharded train step.

The train step is one ``jax.jit`` with ``NamedSharding`` in/out shardings (runtime/sharding.py):
the batch is split over the mesh's batch axes, the params follow the logical rules. Inside, the
[B, B] similarity over the *global* batch is a single expression -- XLA gathers the other
devices' text/video features -- so every device sees all B - 1 negatives and the gradient is
the exact gradient of the global loss. (The original all-gathers by hand and its backward
keeps only the local slice, so after DDP averaging the pre-gather parameters get
1/world_size of that gradient; see docs/train.md.)

Determinism: the step's PRNG key is ``fold_in(state.rng, step)``, the input order is a pure
function of (seed, epoch), so a run resumed from a checkpoint repeats the same steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ucofia_jax import config as config_lib
from ucofia_jax.errors import ConfigError
from ucofia_jax.models.model import Model
from ucofia_jax.runtime import sharding as sharding_lib
from ucofia_jax.training import optim

# --------------------------------------------------------------------------- state


def create_train_state(model: Model, rng_seed: int, params=None) -> Dict[str, Any]:
    """TrainState as a plain pytree: {'step', 'params', 'opt_state', 'rng'} (host arrays)."""
    rng = jax.random.PRNGKey(rng_seed)
    r_init, r_train = jax.random.split(rng)
    if params is None:
        params = model.init(r_init)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": None, "rng": r_train}


def total_train_steps(train_cfg, steps_per_epoch: int) -> int:
    if train_cfg.num_steps > 0:
        return int(train_cfg.num_steps)
    return int(train_cfg.epochs * steps_per_epoch)


def schedule_steps(train_cfg, steps_per_epoch: int) -> int:
    """t_total of the lr schedule: the whole run (epochs x steps per epoch) as the original."""
    if train_cfg.epochs > 0:
        return int(train_cfg.epochs * steps_per_epoch)
    return int(train_cfg.num_steps)


@dataclasses.dataclass
class Trainer:
    """Everything the step needs, built once: model, optimizer, mesh, shardings, jitted fns."""

    model: Model
    config: Any  # config.train
    mesh: Any
    tx: Any
    state_shardings: Any
    train_step: Callable
    init_opt_state: Callable


def _float_fields(features) -> dict:
    """The differentiable fields of TextFeatures / VideoFeatures (the masks are integers)."""
    return {
        f.name: getattr(features, f.name)
        for f in dataclasses.fields(features)
        if f.name != "mask" and getattr(features, f.name) is not None
    }


def accumulated_loss_and_grads(
    model: Model, params, batch: Dict[str, jax.Array], rng: jax.Array, steps: int, mesh=None
):
    """``((loss, logits), grads)`` of ``model.loss`` on the whole batch, computed in ``steps``
    micro-batches without ever holding the activations of more than one (GradCache):

    1. encode every micro-batch (forward only: no activations kept) -> features of the batch;
    2. the loss on all B x B pairs, and its gradient w.r.t. the features and w.r.t. the
       parameters scoring reads directly (``Model.loss_from_features``);
    3. re-encode each micro-batch under ``jax.vjp`` (same noise: ``example_index`` is the
       video's row in the batch) and pull its slice of the feature gradient back; sum.

    Exact: the same loss and gradient as the full batch, up to float32 summation order.
    Micro-batch ``m`` holds rows ``m, m + steps, m + 2 steps, ...`` so that with the batch
    sharded over its leading axis every device works on its own rows in every micro-batch.
    """
    size = batch["input_ids"].shape[0]
    if size % steps:
        raise ValueError(f"trainer.py: batch of {size} not divisible by accumulate_steps={steps}")
    micro_size = size // steps

    def split(x):  # 'B ...' -> 'steps micro ...'
        x = x.reshape(micro_size, steps, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = sharding_lib.batch_spec(x.ndim, axis=1)
            x = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
        return x

    def merge(x):  # 'steps micro ...' -> 'B ...' in the batch's row order
        return x.swapaxes(0, 1).reshape(size, *x.shape[2:])

    micro = jax.tree.map(split, batch)
    index = split(jnp.arange(size))

    def encode(p, mb, idx):
        text = model.encode_text(p, mb["input_ids"])
        video = model.encode_video(
            p, mb["frames"], mb["frame_mask"], rng, train=True, example_index=idx
        )
        return text, video

    _, (texts, videos) = jax.lax.scan(lambda c, xs: (c, encode(params, *xs)), None, (micro, index))
    text, video = jax.tree.map(merge, texts), jax.tree.map(merge, videos)

    def loss_fn(p, text_f, video_f):
        return model.loss_from_features(p, text.replace(**text_f), video.replace(**video_f))

    (loss, logits), (grads, g_text, g_video) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True
    )(params, _float_fields(text), _float_fields(video))

    def pull_back(acc, xs):
        mb, idx, gt, gv = xs
        _, vjp = jax.vjp(lambda p: tuple(_float_fields(f) for f in encode(p, mb, idx)), params)
        (g,) = vjp((gt, gv))
        return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(
        pull_back,
        grads,
        (micro, index, jax.tree.map(split, g_text), jax.tree.map(split, g_video)),
    )
    return (loss, logits), grads


def loss_and_grads(
    model: Model,
    params,
    batch: Dict[str, jax.Array],
    rng: jax.Array,
    accumulate_steps: int,
    mesh=None,
):
    """``((loss, logits), grads)`` of ``model.loss`` on ``batch``: the gradient the train step
    hands to the optimizer (before clipping), in ``accumulate_steps`` micro-batches when > 1.
    A function of its own so that tests compare the gradients themselves: clipping and
    BertAdam's first step would hide a wrong scale."""
    if accumulate_steps == 1:
        return jax.value_and_grad(model.loss, has_aux=True)(params, batch, rng)
    return accumulated_loss_and_grads(model, params, batch, rng, accumulate_steps, mesh)


def all_finite(*trees) -> jax.Array:
    """True iff every floating leaf of ``trees`` is finite (one reduction per leaf)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(trees)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def state_shardings(model: Model, params, tx, mesh, axis_rules) -> Dict[str, Any]:
    """The train state's shardings: params by their logical axis names and ``axis_rules``
    (``config.mesh.logical_axis_rules``; runtime/sharding.py), the optimizer state following
    them, step and rng replicated."""
    replicated = sharding_lib.replicated(mesh)
    logical = model.logical_axes(params)
    param_sh = sharding_lib.param_shardings(params, logical, mesh, axis_rules)
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_sh = sharding_lib.state_shardings(opt_shapes, params, param_sh, mesh)
    return {"step": replicated, "params": param_sh, "opt_state": opt_sh, "rng": replicated}


def make_trainer(
    model: Model, train_cfg, mesh, state: Dict[str, Any], schedule_total: int, *, axis_rules
) -> Trainer:
    """Builds the optimizer, the shardings and the jitted, sharded train step.
    ``state["params"]`` may be shapes (``jax.eval_shape(model.init, ...)``): nothing runs.
    ``axis_rules``: ``config.mesh.logical_axis_rules`` (logical axis -> mesh axes)."""
    accumulate = int(train_cfg.accumulate_steps)
    bad_batch = config_lib.batch_split_error(
        "train", int(train_cfg.batch_size), sharding_lib.batch_size_multiple(mesh), accumulate
    )
    if bad_batch:
        raise ConfigError(bad_batch)
    schedules = optim.group_schedules(train_cfg, schedule_total)
    tx = optim.make_optimizer(train_cfg, schedules)
    replicated = sharding_lib.replicated(mesh)
    state_sh = state_shardings(model, state["params"], tx, mesh, axis_rules)
    opt_sh = state_sh["opt_state"]
    logit_max = float(train_cfg.logit_scale_max)

    def step_fn(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        (loss, logits), grads = loss_and_grads(model, state["params"], batch, rng, accumulate, mesh)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = optim.clamp_logit_scale(params, logit_max)
        # A non-finite loss, parameter or moment: keep the input state (step not counted), so
        # that no checkpoint ever holds NaN/inf; the loop reads metrics["finite"] and stops.
        finite = jnp.isfinite(loss) & all_finite(params, opt_state)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        acc = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
        metrics = {
            "loss": loss,
            "lr": schedules["head"](state["step"]),
            "clip_lr": schedules["clip"](state["step"]),
            "grad_norm": optax.global_norm(grads),
            "logit_scale": params["clip"]["logit_scale"],
            "train_t2v_acc": acc,
            "finite": finite,
        }
        new_state = {
            "step": state["step"] + finite.astype(state["step"].dtype),
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "rng": state["rng"],
        }
        return new_state, metrics

    batch_sh = {
        k: sharding_lib.batch_sharding(mesh, nd)
        for k, nd in (("input_ids", 2), ("frames", 5), ("frame_mask", 2))
    }
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    init_opt = jax.jit(tx.init, out_shardings=opt_sh)
    return Trainer(model, train_cfg, mesh, tx, state_sh, train_step, init_opt)


def place_state(trainer: Trainer, state: Dict[str, Any]) -> Dict[str, Any]:
    """Host state -> sharded device state (creating the optimizer state if absent)."""
    sh = trainer.state_shardings
    # Copies: the temporal encoder starts as the *same* arrays as CLIP's text blocks, and a
    # donated state must not hold one buffer twice.
    params = jax.tree.map(lambda x: x.copy(), jax.device_put(state["params"], sh["params"]))
    opt_state = state["opt_state"]
    if opt_state is None:
        # jit may return one buffer for equal constant outputs (the zero moments); the step
        # donates its input state, so every leaf needs its own buffer.
        opt_state = jax.tree.map(lambda x: x.copy(), trainer.init_opt_state(params))
    else:
        opt_state = jax.device_put(opt_state, sh["opt_state"])
    return {
        "step": jax.device_put(jnp.asarray(state["step"], jnp.int32), sh["step"]).copy(),
        "params": params,
        "opt_state": opt_state,
        "rng": jax.device_put(state["rng"], sh["rng"]).copy(),
    }


def model_inputs(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {
        "input_ids": np.asarray(batch["input_ids"], np.int32),
        "frames": np.asarray(batch["frames"]),
        "frame_mask": np.asarray(batch["frame_mask"], np.int32),
    }
