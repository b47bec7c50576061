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


def make_trainer(
    model: Model, train_cfg, mesh, state: Dict[str, Any], schedule_total: int
) -> Trainer:
    """Builds the optimizer, the shardings and the jitted, sharded train step."""
    tx = optim.make_optimizer(train_cfg, state["params"], schedule_total)
    replicated = sharding_lib.replicated(mesh)
    param_sh = sharding_lib.param_shardings(state["params"], mesh)
    opt_shapes = jax.eval_shape(tx.init, state["params"])
    opt_sh = sharding_lib.param_shardings(opt_shapes, mesh)
    state_sh = {"step": replicated, "params": param_sh, "opt_state": opt_sh, "rng": replicated}
    schedules = optim.learning_rate_schedules(train_cfg, schedule_total)
    logit_max = float(train_cfg.logit_scale_max)

    def step_fn(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        (loss, logits), grads = jax.value_and_grad(model.loss, has_aux=True)(
            state["params"], batch, rng
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = optim.clamp_logit_scale(params, logit_max)
        acc = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
        metrics = {
            "loss": loss,
            "lr": schedules["head"](state["step"]),
            "clip_lr": schedules["clip"](state["step"]),
            "grad_norm": optax.global_norm(grads),
            "logit_scale": params["clip"]["logit_scale"],
            "train_t2v_acc": acc,
        }
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "opt_state": opt_state,
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
