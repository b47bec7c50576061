"""The training loop: steps, logs, checkpoints, validation, and the stop on a signal.

Metrics are read back one step late so the host never waits for the device; a non-finite
loss stops the run naming the step and the batch's videos.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Dict, Iterable, Optional, Protocol

import jax
import numpy as np
from tqdm import tqdm

from ucofia_jax.runtime import sharding as sharding_lib
from ucofia_jax.training.metric_writer import MetricWriter
from ucofia_jax.training.trainer import Trainer, model_inputs

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the batch's videos."""


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
