"""The training loop: steps, then the periodic actions (logs, checkpoints, validation, the stop
on a signal), in the manner of big_vision.

The loop itself only steps: it draws the next batch, runs the train step, and hands the
result (:class:`Run`) to a list of actions, in order, each of which decides whether it is its
step. An absent part (no checkpointer, no validation, no signal guard) is simply not in the
list (:func:`loop_actions`). An action ends the run early by setting ``run.stopped``.

Metrics are read back one step late so the host never waits for the device
(:class:`StepMetrics`). The train step keeps its input state when the loss, the new
parameters or the optimizer moments are not finite (``metrics['finite']``), so a bad step
never reaches the state; :func:`step_is_finite` is the one verdict on a step, used when its
metrics are read and before every save. A non-finite step stops the run naming the step, the
batch's video ids and the last checkpoint (``train.stop_on_nonfinite``, default) or skips that
batch with a warning. Before every checkpoint save the newest step's verdict is read (one
scalar), so no checkpoint holds a state past a non-finite step. A failed asynchronous save
stops the run at the next step (``Checkpointer.check_saves``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
)

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


# The metrics a verdict reads: ``finite`` from the train step, ``loss`` for the message (and the
# verdict of a step function without the flag).
VERDICT_KEYS = ("finite", "loss")


def step_is_finite(values: Mapping[str, float]) -> bool:
    """The verdict on a step from its metrics on the host: ``finite`` from the train step (loss,
    params and optimizer state), or the loss alone for a step function without the flag."""
    if "finite" in values:
        return bool(values["finite"])
    return math.isfinite(values["loss"])


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


# --------------------------------------------------------------------------- data


class TrainData(Protocol):
    """What the loop needs from the input pipeline (local rows of each global batch)."""

    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterable[Dict[str, np.ndarray]]: ...


def _batches(data: TrainData, step: int, total_steps: int) -> Iterator[Dict[str, np.ndarray]]:
    """The batches of steps ``step + 1 ..``: each epoch from its data position, left at its
    last step (an epoch's iterator is closed there, as a resumed run would open it)."""
    spe = data.steps_per_epoch
    while step < total_steps:
        for batch in data.epoch(step // spe, step % spe):
            yield batch
            step += 1
            if step % spe == 0 or step >= total_steps:
                break


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class StepRecord:
    """One step as the loop saw it: its number (steps done), metrics (on device), batch."""

    step: int
    metrics: Dict[str, Any]
    batch: Dict[str, np.ndarray]


@dataclasses.dataclass
class NonFiniteSteps:
    """What a non-finite step does: stops the run (``NonFiniteLossError``), or, with
    ``train.stop_on_nonfinite=False``, warns once and the batch counts as skipped."""

    stop: bool
    video_ids: Optional[Sequence[Any]]
    writer: MetricWriter
    last_checkpoint: Callable[[], Optional[str]] = lambda: None
    skipped: set = dataclasses.field(default_factory=set)

    def __call__(self, record: StepRecord, values: Mapping[str, float]) -> None:
        ids = batch_video_ids(record.batch, self.video_ids)
        if self.stop:
            raise NonFiniteLossError(
                nonfinite_message(record.step, values["loss"], ids, self.last_checkpoint())
            )
        if record.step in self.skipped:
            return
        self.skipped.add(record.step)
        msg = nonfinite_message(record.step, values["loss"], ids, None, stopped=False)
        log.warning("%s", msg)
        self.writer.text(msg)


class StepMetrics:
    """Each step's metrics, read back one step late (the host never waits for the device) or
    when an action needs them now; every read is judged by :func:`step_is_finite`."""

    def __init__(
        self, on_nonfinite: Callable[[StepRecord, Mapping[str, float]], None], writer, bar
    ):
        self.on_nonfinite = on_nonfinite
        self.writer = writer
        self.bar = bar
        self.pending: Optional[StepRecord] = None  # not read back yet
        self.newest: Optional[StepRecord] = None

    def add(self, record: StepRecord) -> None:
        """The new step: read the one before it (its device work is done by now)."""
        self.read_pending()
        self.pending = self.newest = record

    def read_pending(self, write: bool = False) -> Optional[Dict[str, float]]:
        """Read back the step not read yet (if any); ``write``: its ``train/*`` scalars too."""
        record, self.pending = self.pending, None
        if record is None:
            return None
        values = {k: float(v) for k, v in jax.device_get(record.metrics).items()}
        self.bar.update(record.step - self.bar.n)
        if write:
            self.writer.scalars(record.step, values, prefix="train/")
        if not step_is_finite(values):
            self.on_nonfinite(record, values)
        return values

    def check_newest(self) -> None:
        """Before a save: the newest step's verdict (one scalar read back; every earlier step
        was judged one step late)."""
        if self.newest is None:
            return
        metrics = self.newest.metrics
        flags = jax.device_get({k: metrics[k] for k in VERDICT_KEYS if k in metrics})
        values = {k: float(v) for k, v in flags.items()}
        if not step_is_finite(values):
            self.on_nonfinite(self.newest, values)  # raises unless the batch is skipped


@dataclasses.dataclass
class Run:
    """What the loop hands its actions after each step."""

    step: int  # steps done: the data position (ahead of state['step'] by the skipped batches)
    state: Any  # the train state after it
    steps_per_epoch: int
    total_steps: int
    metrics: StepMetrics
    record: Optional[StepRecord] = None  # this step's metrics (on device) and batch
    validation_r1: Optional[float] = None  # this step's validation R@1, if it validated
    stopped: bool = False  # set by an action: the loop returns after it

    @property
    def epoch_done(self) -> bool:
        """The step ends an epoch, or the run."""
        return self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps

    @property
    def epoch(self) -> int:
        """The (0-based) epoch of this step."""
        return (self.step - 1) // self.steps_per_epoch


Action = Callable[[Run], None]


# --------------------------------------------------------------------------- actions


def read_metrics(run: Run) -> None:
    """Every step: read back the previous step's metrics (one step late) and queue this one's."""
    run.metrics.add(run.record)


def read_metrics_at_epoch_end(run: Run) -> None:
    """The last step of an epoch is read before the epoch's checkpoint and validation."""
    if run.epoch_done:
        run.metrics.read_pending()


class LogMetrics:
    """Every ``every`` steps and at the last: the step's ``train/*`` scalars and samples/s, in
    the logs and on the progress bar."""

    def __init__(self, every: int, global_batch: int, writer: MetricWriter, bar, step: int):
        self.every, self.global_batch = every, global_batch
        self.writer, self.bar = writer, bar
        self.t_last, self.n_last = time.time(), step

    def __call__(self, run: Run) -> None:
        if run.step % self.every and run.step != run.total_steps:
            return
        values = run.metrics.read_pending(write=True)
        now = time.time()
        sps = (run.step - self.n_last) * self.global_batch / max(now - self.t_last, 1e-9)
        self.t_last, self.n_last = now, run.step
        self.bar.set_postfix(
            loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", samples_s=f"{sps:.1f}"
        )
        self.writer.scalars(run.step, {"samples_per_second": sps})


class Checkpoints:
    """The checkpoint actions: every ``every`` steps, at each epoch's end, the best validation
    R@1, and a last one; each save only once the newest step is known to be finite."""

    def __init__(self, checkpointer, every: int, steps_per_epoch: int, global_batch: int, extra):
        self.checkpointer = checkpointer
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.global_batch = int(global_batch)
        self.extra = dict(extra or {})

    def meta(self, step: int) -> Dict[str, Any]:
        spe = self.steps_per_epoch
        return {
            "step": step,
            "epoch": step // spe,
            "step_in_epoch": step % spe,
            "steps_per_epoch": spe,
            "global_batch": self.global_batch,
            **self.extra,
        }

    def last_complete(self) -> Optional[str]:
        """The newest complete checkpoint, for an error message."""
        try:
            self.checkpointer.wait()
        except Exception as e:  # pylint: disable=broad-except
            log.warning("%s", e)  # the complete steps on disk below are what is there
        steps = self.checkpointer.complete_steps()
        return f"step {steps[-1]} in {self.checkpointer.directory}" if steps else None

    def save(self, run: Run, *, force: bool = False) -> None:
        run.metrics.check_newest()
        self.checkpointer.save(run.step, run.state, self.meta(run.step), force=force)

    def check_saves(self, run: Run) -> None:  # pylint: disable=unused-argument
        """Every step: a failed asynchronous save stops the run now."""
        self.checkpointer.check_saves()

    def every_n_steps(self, run: Run) -> None:
        if run.step % self.every == 0:
            self.save(run)

    def at_epoch_end(self, run: Run) -> None:
        if run.epoch_done:
            self.save(run)

    def best(self, run: Run) -> None:
        """After a validation: kept when its R@1 is the best so far."""
        if run.validation_r1 is not None:
            meta = {**self.meta(run.step), "val_R@1": run.validation_r1}
            self.checkpointer.save_best(run.step, run.state, meta, run.validation_r1)

    def now(self, run: Run) -> None:
        """Synchronously, before the run stops early."""
        self.save(run, force=True)
        self.checkpointer.wait()

    def at_end(self, run: Run) -> None:
        self.save(run)
        self.checkpointer.wait()


def _no_save(run: Run) -> None:  # pylint: disable=unused-argument
    """A run without checkpoints."""


class StopOnSignal:
    """Saves (synchronously) and stops the run at the step the guard names
    (``checkpoints.PreemptionGuard.stop_at``: SIGTERM / SIGINT, the same step on every
    process)."""

    def __init__(self, guard, writer: MetricWriter, save: Action = _no_save):
        self.guard, self.writer, self.save = guard, writer, save

    def __call__(self, run: Run) -> None:
        if not self.guard.stop_at(run.step):
            return
        run.metrics.read_pending()
        self.save(run)
        name = self.guard.signal_name
        self.writer.text(f"{name}: saved step {run.step}, exiting")
        log.warning("%s received: checkpoint at step %d saved, exiting", name, run.step)
        run.stopped = True


@dataclasses.dataclass
class Validation:
    """At the end of every ``every_epochs``-th epoch (and of the run, when it ends one):
    ``evaluate(params, step)`` -> text-to-video metrics (R@k in percent), written as
    ``val/t2v/*`` at the state's step; their R@1 keeps the best checkpoint."""

    every_epochs: int
    evaluate: Callable[[Any, int], Mapping[str, float]]
    writer: MetricWriter
    say: Callable[[str], None]  # a line on stdout and in log.txt

    def __call__(self, run: Run) -> None:
        if not run.epoch_done or (run.epoch + 1) % self.every_epochs:
            return
        step = int(jax.device_get(run.state["step"]))
        t2v = self.evaluate(run.state["params"], step)
        self.writer.scalars(step, t2v, prefix="val/t2v/")
        self.say(f"epoch {run.epoch + 1}: val t2v R@1 {t2v['R@1']:.1f}")
        run.validation_r1 = t2v["R@1"]


# --------------------------------------------------------------------------- the loop


def train_loop(
    trainer: Trainer,
    state: Dict[str, Any],
    data: TrainData,
    *,
    total_steps: int,
    checkpointer=None,
    guard=None,
    writer: Optional[MetricWriter] = None,
    validation: Optional[Validation] = None,
    progress: bool = True,
    meta_extra: Optional[Dict[str, Any]] = None,
    start_step: Optional[int] = None,
) -> Dict[str, Any]:
    """Runs from ``start_step`` (default ``state['step']``) to ``total_steps``. Returns the
    final state.

    The optional parts become actions (:func:`loop_actions`): ``checkpointer``
    (``checkpoints.Checkpointer``), ``guard`` (``checkpoints.PreemptionGuard``: the run
    returns early, after a synchronous save, at ``guard.stop_at(step)``), ``writer`` (logs;
    process 0), ``validation`` (its R@1 keeps the best checkpoint). ``start_step`` is the data
    position of a resumed run (its checkpoint's ``meta['step']``): it differs from
    ``state['step']`` only when batches were skipped (``train.stop_on_nonfinite=False``).
    """
    cfg = trainer.config
    spe = data.steps_per_epoch
    if spe <= 0:
        raise ValueError(
            f"no full training batch: batch_size {cfg.batch_size} is larger than the training split"
        )
    step = int(start_step) if start_step is not None else int(jax.device_get(state["step"]))
    writer = writer if writer is not None else MetricWriter("", enabled=False)
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not (progress and writer.enabled),
    )
    metrics, after_step, at_end = loop_actions(
        cfg,
        writer,
        bar,
        step=step,
        steps_per_epoch=spe,
        video_ids=getattr(data, "video_ids", None),
        checkpointer=checkpointer,
        guard=guard,
        validation=validation,
        meta_extra=meta_extra,
    )
    run = Run(step, state, spe, total_steps, metrics)
    steps = range(step + 1, total_steps + 1)
    writer.text(
        f"training from step {step} to {total_steps} ({spe} steps/epoch, global "
        f"batch {cfg.batch_size}, {jax.device_count()} devices)"
    )
    try:
        for done, batch in zip(steps, _batches(data, step, total_steps)):
            inputs = sharding_lib.shard_batch(model_inputs(batch), trainer.mesh)
            run.state, step_metrics = trainer.train_step(run.state, inputs)
            run.step, run.record = done, StepRecord(done, step_metrics, batch)
            run.validation_r1 = None
            for action in after_step:
                action(run)
                if run.stopped:
                    return run.state
    finally:
        bar.close()
    for action in at_end:
        action(run)
    return run.state


def loop_actions(
    train_cfg,
    writer: MetricWriter,
    bar,
    *,
    step: int,
    steps_per_epoch: int,
    video_ids: Optional[Sequence[Any]] = None,
    checkpointer=None,
    guard=None,
    validation: Optional[Validation] = None,
    meta_extra: Optional[Dict[str, Any]] = None,
) -> Tuple[StepMetrics, List[Action], List[Action]]:
    """(the metrics reader; the actions after every step, in order; the actions after the
    last step), with only the parts this run has (``config.train`` sets their intervals)."""
    c = train_cfg
    on_nonfinite = NonFiniteSteps(stop=c.stop_on_nonfinite, video_ids=video_ids, writer=writer)
    metrics = StepMetrics(on_nonfinite, writer, bar)
    log_metrics = LogMetrics(c.log_every_steps, c.batch_size, writer, bar, step)
    ckpt = None
    if checkpointer is not None:
        ckpt = Checkpoints(
            checkpointer, c.checkpoint_every_steps, steps_per_epoch, c.batch_size, meta_extra
        )
        on_nonfinite.last_checkpoint = ckpt.last_complete
    after_step = [
        *([ckpt.check_saves] if ckpt else []),  # a failed async save stops the run now
        read_metrics,
        log_metrics,
        *([ckpt.every_n_steps] if ckpt else []),
        *([StopOnSignal(guard, writer, ckpt.now if ckpt else _no_save)] if guard else []),
        read_metrics_at_epoch_end,
        *([ckpt.at_epoch_end] if ckpt else []),
        *([validation] if validation else []),
        *([ckpt.best] if ckpt and validation else []),
    ]
    return metrics, after_step, [ckpt.at_end] if ckpt else []
