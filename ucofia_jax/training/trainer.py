"""Training: TrainState, the sharded train step, and the loop with logs and checkpoints.

The train step is one ``jax.jit`` with ``NamedSharding`` in/out shardings (sharding.py): the
batch is split over the mesh's batch axes, the params follow the logical rules. Inside, the
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
import json
import logging
import math
import os
import socket
import time
from typing import Any, Callable, Dict, Iterable, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2
from tqdm import tqdm

from ucofia_jax.models.model import Model
from ucofia_jax.runtime import sharding as sharding_lib
from ucofia_jax.training import optim

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the batch's videos."""


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


def check_finite_loss(loss: float, step: int, batch: Dict[str, Any]) -> None:
    if math.isfinite(loss):
        return
    ids = batch.get("video_id", batch.get("video_index"))
    ids = (
        [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(ids).tolist()]
        if ids is not None
        else "?"
    )
    raise NonFiniteLossError(
        f"loss is {loss} at step {step}; the batch's videos: {ids}. Check those clips (blank or "
        "corrupt frames?) and the learning rate; the last checkpoint is before this step."
    )


# --------------------------------------------------------------------------- logging


class MetricWriter:
    """TensorBoard scalars + a plain-text log (``log.txt``), on process 0 only.

    Event files are TFRecords of ``Event`` protos, written with tf.io directly: that needs no
    ``tensorboard`` package (tf.summary does) and TensorBoard reads them as usual.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._text = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._text = open(os.path.join(workdir, "log.txt"), "a", encoding="utf-8")
        try:
            tb_dir = os.path.join(workdir, "tensorboard")
            os.makedirs(tb_dir, exist_ok=True)
            path = os.path.join(
                tb_dir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
            )
            self._tb = tf.io.TFRecordWriter(path)
            self._tb.write(
                event_pb2.Event(
                    wall_time=time.time(), file_version="brain.Event:2"
                ).SerializeToString()
            )
            self._tb.flush()
        except Exception as e:  # pylint: disable=broad-except
            log.warning("TensorBoard event file disabled: %s", e)
            self._tb = None

    def text(self, line: str) -> None:
        if self._text:
            self._text.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")
            self._text.flush()

    def scalars(self, step: int, values: Dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        self.text(
            f"step {step} "
            + json.dumps({prefix + k: round(float(v), 6) for k, v in values.items()})
        )
        if self._tb is not None:
            summ = summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=prefix + k, simple_value=float(v))
                    for k, v in values.items()
                ]
            )
            self._tb.write(
                event_pb2.Event(
                    wall_time=time.time(), step=int(step), summary=summ
                ).SerializeToString()
            )
            self._tb.flush()

    def close(self) -> None:
        if self._text:
            self._text.close()
            self._text = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# --------------------------------------------------------------------------- data


class TrainData(Protocol):
    """What the loop needs from the input pipeline (local rows of each global batch)."""

    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterable[Dict[str, np.ndarray]]: ...


@dataclasses.dataclass
class ArrayData:
    """In-memory training data for tests / tiny runs: deterministic shuffle per (seed, epoch)."""

    arrays: Dict[str, np.ndarray]
    batch_size: int
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return len(next(iter(self.arrays.values()))) // self.batch_size

    def epoch(self, epoch: int, start_step: int = 0):
        n = len(next(iter(self.arrays.values())))
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        for s in range(start_step, self.steps_per_epoch):
            idx = order[s * self.batch_size : (s + 1) * self.batch_size]
            yield {k: v[idx] for k, v in self.arrays.items()}


# --------------------------------------------------------------------------- loop


def train_loop(
    trainer: Trainer,
    state: Dict[str, Any],
    data: TrainData,
    *,
    workdir: str,
    total_steps: int,
    checkpointer=None,
    guard=None,
    writer: MetricWriter = None,
    on_epoch_end: Optional[Callable[[int, Dict[str, Any]], Optional[float]]] = None,
    progress: bool = True,
    meta_extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Runs from ``state['step']`` to ``total_steps``. Returns the final state.

    ``on_epoch_end(epoch, state)`` may return a validation R@1 (best checkpoint). Returns early
    (after a synchronous save) when ``guard.requested`` (SIGTERM).
    """
    cfg = trainer.config
    spe = data.steps_per_epoch
    if spe <= 0:
        raise ValueError(
            f"no full training batch: batch_size {cfg.batch_size} is larger than the training split"
        )
    step = int(jax.device_get(state["step"]))
    global_batch = int(cfg.batch_size)
    meta_extra = dict(meta_extra or {})

    def meta(step_: int) -> Dict[str, Any]:
        return {
            "step": step_,
            "epoch": step_ // spe,
            "step_in_epoch": step_ % spe,
            "steps_per_epoch": spe,
            "global_batch": global_batch,
            **meta_extra,
        }

    bar = None
    if progress and writer is not None and writer.enabled:
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    if writer is not None:
        writer.text(
            f"training from step {step} to {total_steps} ({spe} steps/epoch, global "
            f"batch {global_batch}, {jax.device_count()} devices)"
        )
    t_last, n_last = time.time(), step
    pending = None  # (step, metrics, batch): read back one step late so the host never waits
    try:
        while step < total_steps:
            epoch, start = step // spe, step % spe
            for batch in data.epoch(epoch, start):
                if step >= total_steps:
                    break
                inputs = sharding_lib.shard_batch(model_inputs(batch), trainer.mesh)
                state, metrics = trainer.train_step(state, inputs)
                step += 1
                if pending is not None:
                    _report(pending, writer, bar, cfg)
                pending = (step, metrics, batch)
                if step % cfg.log_every_steps == 0 or step == total_steps:
                    vals = _report(pending, writer, bar, cfg, force=True)
                    pending = None
                    now = time.time()
                    sps = (step - n_last) * global_batch / max(now - t_last, 1e-9)
                    t_last, n_last = now, step
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{vals['loss']:.4f}",
                            lr=f"{vals['lr']:.2e}",
                            samples_s=f"{sps:.1f}",
                        )
                    if writer is not None:
                        writer.scalars(step, {"samples_per_second": sps})
                if checkpointer is not None and step % cfg.checkpoint_every_steps == 0:
                    checkpointer.save(step, state, meta(step))
                if guard is not None and guard.requested:
                    if pending is not None:
                        _report(pending, writer, bar, cfg)
                        pending = None
                    if checkpointer is not None:
                        checkpointer.save(step, state, meta(step), force=True)
                        checkpointer.wait()
                    if writer is not None:
                        writer.text(f"{guard.signal_name}: saved step {step}, exiting")
                    log.warning(
                        "%s received: checkpoint at step %d saved, exiting", guard.signal_name, step
                    )
                    return state
                if step % spe == 0:
                    break  # epoch boundary
            if pending is not None:
                _report(pending, writer, bar, cfg)
                pending = None
            if step % spe == 0 or step >= total_steps:
                ep = (step - 1) // spe
                if checkpointer is not None:
                    checkpointer.save(step, state, meta(step))
                if on_epoch_end is not None:
                    r1 = on_epoch_end(ep, state)
                    if r1 is not None and checkpointer is not None:
                        checkpointer.save_best(step, state, {**meta(step), "val_R@1": r1}, r1)
    finally:
        if bar is not None:
            bar.close()
    if checkpointer is not None:
        checkpointer.save(step, state, meta(step))
        checkpointer.wait()
    return state


def _report(pending, writer, bar, cfg, force: bool = False):
    step, metrics, batch = pending
    vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if cfg.stop_on_nonfinite:
        check_finite_loss(vals["loss"], step - 1, batch)
    if bar is not None:
        bar.update(step - bar.n)
    if writer is not None and force:
        writer.scalars(step, vals, prefix="train/")
    return vals
