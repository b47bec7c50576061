"""The training loop: steps, logs, checkpoints, validation, and the stop on a signal.

Metrics are read back one step late so the host never waits for the device. The train step
keeps its input state when the loss, the new parameters or the optimizer moments are not
finite (``metrics['finite']``), so a bad step never reaches the state; the loop stops the
run naming the step and the batch's video ids (``train.stop_on_nonfinite``, default) or skips
that batch with a warning. Before every checkpoint save it reads the latest step's flag (one
scalar), so no checkpoint holds a state past a non-finite step. A failed asynchronous save
stops the run at the next step (``Checkpointer.check_saves``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Dict, Iterable, Optional, Protocol, Sequence

import jax
import numpy as np
from tqdm import tqdm

from ucofia_jax.errors import NonFiniteLossError
from ucofia_jax.runtime import sharding as sharding_lib
from ucofia_jax.training.metric_writer import MetricWriter
from ucofia_jax.training.trainer import Trainer, model_inputs

log = logging.getLogger(__name__)


def batch_video_ids(batch: Dict[str, Any], video_ids: Optional[Sequence[Any]] = None) -> list:
    """The batch's video ids: its ``video_id`` column, or ``video_index`` looked up in the
    split's table (``VideoTextData.video_ids``); the bare indices when there is no table."""
    if "video_id" in batch:
        ids = np.asarray(batch["video_id"]).tolist()
    elif "video_index" in batch:
        idx = np.asarray(batch["video_index"]).astype(int).tolist()
        ids = [video_ids[i] for i in idx] if video_ids is not None else idx
    else:
        return []
    return [x.decode() if isinstance(x, bytes) else str(x) for x in ids]


def _finite_flag(vals: Dict[str, float]) -> bool:
    """The step's verdict: ``finite`` from the train step (loss, params and optimizer state),
    or the loss alone for a step function without the flag."""
    if "finite" in vals:
        return bool(vals["finite"])
    return math.isfinite(vals["loss"])


def nonfinite_message(
    step: int, loss: float, ids: list, last_checkpoint: Optional[str], stopped: bool = True
) -> str:
    what = f"the loss is {loss}" if not math.isfinite(loss) else "the update is not finite"
    where = (
        f"the last checkpoint, {last_checkpoint}, holds a finite state"
        if last_checkpoint
        else "no checkpoint was saved yet"
    )
    head = f"training step {step - 1} -> {step}: {what} (NaN/inf); its videos: "
    head += f"{', '.join(ids) or '?'}. "
    if not stopped:
        return head + "The batch was skipped (train.stop_on_nonfinite=False)."
    return (
        head + f"The step was not applied and nothing non-finite was saved; {where}. Lower "
        "train.lr / train.clip_lr or check those clips, then re-run to resume from it."
    )


def check_finite_loss(loss: float, step: int, batch: Dict[str, Any], video_ids=None) -> None:
    """Raise :class:`NonFiniteLossError` when ``loss`` (of the update from state ``step``) is
    not finite."""
    if not math.isfinite(loss):
        ids = batch_video_ids(batch, video_ids)
        raise NonFiniteLossError(nonfinite_message(step + 1, loss, ids, None))


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
    video_ids: Optional[Sequence[str]] = None  # row i of 'video_index' is video_ids[i]

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
    start_step: Optional[int] = None,
) -> Dict[str, Any]:
    """Runs from ``start_step`` (default ``state['step']``) to ``total_steps``. Returns the
    final state.

    ``on_epoch_end(epoch, state)`` may return a validation R@1 (best checkpoint). Returns early
    (after a synchronous save) when ``guard.requested`` (SIGTERM / SIGINT). ``start_step`` is
    the data position of a resumed run (its checkpoint's ``meta['step']``): it differs from
    ``state['step']`` only when batches were skipped (``train.stop_on_nonfinite=False``).
    """
    cfg = trainer.config
    spe = data.steps_per_epoch
    if spe <= 0:
        raise ValueError(
            f"no full training batch: batch_size {cfg.batch_size} is larger than the training split"
        )
    step = int(start_step) if start_step is not None else int(jax.device_get(state["step"]))
    global_batch = int(cfg.batch_size)
    meta_extra = dict(meta_extra or {})
    video_ids = getattr(data, "video_ids", None)

    def meta(step_: int) -> Dict[str, Any]:
        return {
            "step": step_,
            "epoch": step_ // spe,
            "step_in_epoch": step_ % spe,
            "steps_per_epoch": spe,
            "global_batch": global_batch,
            **meta_extra,
        }

    def last_checkpoint() -> Optional[str]:
        if checkpointer is None:
            return None
        try:
            checkpointer.wait()
        except Exception as e:  # pylint: disable=broad-except
            log.warning("%s", e)  # the complete steps on disk below are what is there
        steps = checkpointer.complete_steps()
        return f"step {steps[-1]} in {checkpointer.directory}" if steps else None

    skipped = set()

    def on_nonfinite(step_: int, vals: Dict[str, float], batch) -> None:
        ids = batch_video_ids(batch, video_ids)
        if cfg.stop_on_nonfinite:
            raise NonFiniteLossError(nonfinite_message(step_, vals["loss"], ids, last_checkpoint()))
        if step_ in skipped:
            return
        skipped.add(step_)
        msg = nonfinite_message(step_, vals["loss"], ids, None, stopped=False)
        log.warning("%s", msg)
        if writer is not None:
            writer.text(msg)

    def report(entry, force: bool = False) -> Dict[str, float]:
        vals = _report(entry, writer, bar, force)
        if not _finite_flag(vals):
            on_nonfinite(entry[0], vals, entry[2])
        return vals

    def save(step_: int, *, force: bool = False) -> None:
        """A checkpoint of ``state`` once the newest step is known to be finite (one scalar
        read back; every earlier step was checked one step late)."""
        if checkpointer is None:
            return
        if latest is not None and latest[0] == step_:
            m = latest[1]
            flag = m["finite"] if "finite" in m else m["loss"]
            vals = {k: float(v) for k, v in jax.device_get({"f": flag, "loss": m["loss"]}).items()}
            finite = bool(vals["f"]) if "finite" in m else math.isfinite(vals["loss"])
            if not finite:
                on_nonfinite(step_, vals, latest[2])  # raises unless the batch is skipped
        checkpointer.save(step_, state, meta(step_), force=force)

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
    latest = None  # the newest step's (step, metrics, batch), checked before a save
    try:
        while step < total_steps:
            epoch, start = step // spe, step % spe
            for batch in data.epoch(epoch, start):
                if step >= total_steps:
                    break
                inputs = sharding_lib.shard_batch(model_inputs(batch), trainer.mesh)
                state, metrics = trainer.train_step(state, inputs)
                step += 1
                if checkpointer is not None:
                    checkpointer.check_saves()  # a failed async save stops the run now
                if pending is not None:
                    report(pending)
                pending = latest = (step, metrics, batch)
                if step % cfg.log_every_steps == 0 or step == total_steps:
                    vals = report(pending, force=True)
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
                if step % cfg.checkpoint_every_steps == 0:
                    save(step)
                if guard is not None and guard.requested:
                    if pending is not None:
                        report(pending)
                        pending = None
                    if checkpointer is not None:
                        save(step, force=True)
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
                report(pending)
                pending = None
            if step % spe == 0 or step >= total_steps:
                ep = (step - 1) // spe
                save(step)
                if on_epoch_end is not None:
                    r1 = on_epoch_end(ep, state)
                    if r1 is not None and checkpointer is not None:
                        checkpointer.save_best(step, state, {**meta(step), "val_R@1": r1}, r1)
    finally:
        if bar is not None:
            bar.close()
    if checkpointer is not None:
        save(step)
        checkpointer.wait()
    return state


def _report(pending, writer, bar, force: bool = False):
    step, metrics, _ = pending
    vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if bar is not None:
        bar.update(step - bar.n)
    if writer is not None and force:
        writer.scalars(step, vals, prefix="train/")
    return vals
