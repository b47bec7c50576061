"""The train loop's actions, on scripted fakes (no model, no compile): the order of steps,
metric reads, logs and saves; the non-finite handling; the stop on a signal; validation and
the best checkpoint; and the TensorBoard scalars read back from the event files."""

import math
import os
import types

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from test_main_smoke import _config as smoke_config

from ucofia_jax import main
from ucofia_jax.errors import NonFiniteLossError
from ucofia_jax.training import loop
from ucofia_jax.training.metric_writer import MetricWriter

VIDEO_IDS = [f"video{i}" for i in range(100)]


class Probe:
    """A metric on the 'device': reading it back (``jax.device_get``) is recorded."""

    def __init__(self, events, step, key, value):
        self.events, self.step, self.key, self.value = events, step, key, value

    def __array__(self, dtype=None, copy=None):
        if self.key == "loss":
            self.events.append(("read", self.step))
        return np.asarray(self.value)


class Trainer:
    """``train_step`` counts data steps in ``state['n']``; a step in ``nan_steps`` is not
    finite and keeps the state's ``step`` (as the real step keeps its input state)."""

    def __init__(self, events, nan_steps=(), **train):
        cfg = dict(batch_size=2, log_every_steps=100, checkpoint_every_steps=100)
        self.config = types.SimpleNamespace(**{**cfg, "stop_on_nonfinite": True, **train})
        self.events, self.nan_steps, self.mesh = events, set(nan_steps), None

    def train_step(self, state, batch):
        k = state["n"] + 1
        self.events.append(("step", k))
        finite = k not in self.nan_steps
        loss = 1.0 / k if finite else math.nan
        new = {"step": state["step"] + int(finite), "n": k, "params": {}}
        metrics = {
            key: Probe(self.events, k, key, v)
            for key, v in (("loss", loss), ("lr", 1e-3), ("finite", finite))
        }
        return new, metrics


class Data:
    video_ids = VIDEO_IDS

    def __init__(self, steps_per_epoch):
        self.steps_per_epoch = steps_per_epoch

    def epoch(self, epoch, start_step=0):
        for i in range(start_step, self.steps_per_epoch):
            yield {"video_index": np.array([10 * epoch + i, 50 + i])}


class Checkpointer:
    directory = "/ckpt"

    def __init__(self, events, fail_at=None):
        self.events, self.fail_at, self.steps, self.n = events, fail_at, [], 0

    def save(self, step, state, meta, force=False):
        self.events.append(("save", step, int(state["step"]), force))
        assert meta["step"] == step and meta["steps_per_epoch"] > 0
        self.steps.append(step)

    def save_best(self, step, state, meta, r1):
        self.events.append(("best", step, r1, meta["val_R@1"]))

    def check_saves(self):
        self.n += 1
        if self.n == self.fail_at:
            raise OSError("the save before failed")

    def wait(self):
        self.events.append(("wait",))

    def complete_steps(self):
        return sorted(set(self.steps))


class Guard:
    signal_name = "SIGTERM"

    def __init__(self, at):
        self.at = at

    def stop_at(self, step):
        return step >= self.at


class Writer:
    enabled = True

    def __init__(self, events):
        self.events = events

    def text(self, line):
        self.events.append(("text", line))

    def scalars(self, step, values, prefix=""):
        self.events.append(("scalars", step, prefix, sorted(values)))


def _run(events, steps_per_epoch=3, total=6, trainer=None, start=0, **parts):
    trainer = trainer or Trainer(events)
    state = {"step": start, "n": start, "params": {}}
    data = Data(steps_per_epoch)
    with pytest.MonkeyPatch.context() as patch:  # the fakes' batches go to the step as they are
        patch.setattr(loop.sharding_lib, "shard_batch", lambda batch, mesh: batch)
        patch.setattr(loop, "model_inputs", lambda batch: batch)
        return loop.train_loop(
            trainer, state, data, total_steps=total, progress=False, start_step=start, **parts
        )


def _only(events, *kinds):
    return [e for e in events if e[0] in kinds]


def test_metrics_are_read_one_step_late():
    events = []
    _run(events, steps_per_epoch=4, total=4)
    # Step k's metrics are read after step k + 1 was dispatched; the last one at the end.
    assert _only(events, "step", "read") == [
        ("step", 1),
        ("step", 2),
        ("read", 1),
        ("step", 3),
        ("read", 2),
        ("step", 4),
        ("read", 3),
        ("read", 4),
    ]


def test_the_action_list_holds_only_the_parts_given():
    cfg = Trainer([]).config
    bare = loop.loop_actions(cfg, Writer([]), None, step=0, steps_per_epoch=3)
    _, after_step, at_end = bare
    assert [type(a).__name__ if isinstance(a, loop.LogMetrics) else a for a in after_step] == [
        loop.read_metrics,
        "LogMetrics",
        loop.read_metrics_at_epoch_end,
    ]
    assert at_end == []
    validation = loop.Validation(1, lambda params, step: {"R@1": 1.0}, Writer([]), print)
    _, after_step, at_end = loop.loop_actions(
        cfg,
        Writer([]),
        None,
        step=0,
        steps_per_epoch=3,
        checkpointer=Checkpointer([]),
        guard=Guard(9),
        validation=validation,
    )
    names = [getattr(a, "__name__", type(a).__name__) for a in after_step]
    assert names == [
        "check_saves",
        "read_metrics",
        "LogMetrics",
        "every_n_steps",
        "StopOnSignal",
        "read_metrics_at_epoch_end",
        "at_epoch_end",
        "Validation",
        "best",
    ]
    assert [a.__name__ for a in at_end] == ["at_end"]


def test_logs_checkpoints_and_validation_in_order():
    events = []
    trainer = Trainer(events, log_every_steps=2, checkpoint_every_steps=2)

    def evaluate(params, step):
        events.append(("eval", step))
        return {"R@1": 10.0 * step, "R@5": 50.0}

    validation = loop.Validation(1, evaluate, Writer(events), lambda line: events.append(line))
    out = _run(
        events,
        trainer=trainer,
        checkpointer=Checkpointer(events),
        writer=Writer(events),
        validation=validation,
    )
    assert out["step"] == 6
    got = [e for e in events if e[0] not in ("read", "text")]
    train_keys = ["finite", "loss", "lr"]
    assert got == [
        ("step", 1),
        ("step", 2),
        ("scalars", 2, "train/", train_keys),
        ("scalars", 2, "", ["samples_per_second"]),
        ("save", 2, 2, False),
        ("step", 3),
        ("save", 3, 3, False),  # the epoch's end
        ("eval", 3),
        ("scalars", 3, "val/t2v/", ["R@1", "R@5"]),
        "epoch 1: val t2v R@1 30.0",
        ("best", 3, 30.0, 30.0),
        ("step", 4),
        ("scalars", 4, "train/", train_keys),
        ("scalars", 4, "", ["samples_per_second"]),
        ("save", 4, 4, False),
        ("step", 5),
        ("step", 6),
        ("scalars", 6, "train/", train_keys),
        ("scalars", 6, "", ["samples_per_second"]),
        ("save", 6, 6, False),  # every 2 steps
        ("save", 6, 6, False),  # the epoch's end (the Checkpointer skips a step it has)
        ("eval", 6),
        ("scalars", 6, "val/t2v/", ["R@1", "R@5"]),
        "epoch 2: val t2v R@1 60.0",
        ("best", 6, 60.0, 60.0),
        ("save", 6, 6, False),  # the last
        ("wait",),
    ]
    assert events[0][1].startswith("training from step 0 to 6 (3 steps/epoch, global batch 2,")


def test_a_nonfinite_step_is_never_saved_and_stops_naming_it():
    events = []
    trainer = Trainer(events, nan_steps=[4], checkpoint_every_steps=2)
    with pytest.raises(NonFiniteLossError) as e:
        _run(events, trainer=trainer, checkpointer=Checkpointer(events))
    # Step 4 ends no epoch and is no log step: its metrics would be read at step 5, but the
    # save after step 4 reads its verdict first.
    assert _only(events, "save") == [("save", 2, 2, False), ("save", 3, 3, False)]
    assert _only(events, "step")[-1] == ("step", 4)
    msg = str(e.value)
    assert msg.startswith("training step 3 -> 4: the loss is nan (NaN/inf)")
    assert "its videos: video10, video50." in msg  # epoch 1, its first batch
    assert "the last checkpoint, step 3 in /ckpt, holds a finite state" in msg


def test_a_nonfinite_step_read_late_stops_the_run_too():
    events = []
    trainer = Trainer(events, nan_steps=[1])
    with pytest.raises(NonFiniteLossError, match="step 0 -> 1: .*video0, video50.*no chec"):
        _run(events, trainer=trainer)
    assert _only(events, "step") == [("step", 1), ("step", 2)]  # read one step late


def test_a_skipped_nonfinite_step_is_warned_once_and_the_state_kept():
    events = []
    trainer = Trainer(events, nan_steps=[4], checkpoint_every_steps=2, stop_on_nonfinite=False)
    out = _run(events, trainer=trainer, checkpointer=Checkpointer(events), writer=Writer(events))
    assert (out["step"], out["n"]) == (5, 6)  # one batch skipped
    warnings = [e for e in events if e[0] == "text" and "skipped" in e[1]]
    assert len(warnings) == 1 and "training step 3 -> 4" in warnings[0][1]
    # The data position is saved; the state is the one before the bad step.
    assert ("save", 4, 3, False) in events and ("save", 6, 5, False) in events


def test_a_failed_async_save_stops_at_the_next_step():
    events = []
    with pytest.raises(OSError, match="the save before failed"):
        _run(events, checkpointer=Checkpointer(events, fail_at=2))
    assert _only(events, "step", "read") == [("step", 1), ("step", 2)]  # before any read


def test_a_signal_saves_synchronously_and_returns():
    events = []
    trainer = Trainer(events, log_every_steps=2)
    validation = loop.Validation(1, lambda params, step: {"R@1": 1.0}, Writer(events), print)
    out = _run(
        events,
        trainer=trainer,
        checkpointer=Checkpointer(events),
        guard=Guard(3),
        writer=Writer(events),
        validation=validation,
    )
    assert out["step"] == 3
    # Step 3 ends epoch 0, but the run stops before the epoch's save and validation.
    assert events[-4:] == [
        ("read", 3),
        ("save", 3, 3, True),
        ("wait",),
        ("text", "SIGTERM: saved step 3, exiting"),
    ]
    assert not _only(events, "best")


def test_a_resumed_run_starts_at_its_data_position():
    events = []
    out = _run(events, start=4, total=6, checkpointer=Checkpointer(events))
    assert _only(events, "step") == [("step", 5), ("step", 6)]
    assert out["step"] == 6


# --------------------------------------------------------------------------- the writer


def _read_events(workdir):
    acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
    acc.Reload()
    return {
        tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }


def test_writer_scalars_read_back_from_the_event_files(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.scalars(2, {"loss": 1.25, "lr": 1e-3}, prefix="train/")
    w.scalars(4, {"loss": 0.5, "lr": 5e-4}, prefix="train/")
    w.text("a line")
    w.scalars(4, {"R@1": 12.5}, prefix="val/t2v/")
    w.close()
    got = _read_events(str(tmp_path))
    assert got == {
        "train/loss": [(2, 1.25), (4, 0.5)],
        "train/lr": [(2, pytest.approx(1e-3)), (4, pytest.approx(5e-4))],
        "val/t2v/R@1": [(4, 12.5)],
    }
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [line[20:] for line in lines] == [
        'step 2 {"train/loss": 1.25, "train/lr": 0.001}',
        'step 4 {"train/loss": 0.5, "train/lr": 0.0005}',
        "a line",
        'step 4 {"val/t2v/R@1": 12.5}',
    ]


def test_a_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(str(tmp_path / "w"), enabled=False)
    w.scalars(1, {"loss": 1.0})
    w.text("x")
    w.close()
    assert not (tmp_path / "w").exists()


def test_the_loop_writes_train_scalars_at_log_steps(tmp_path):
    events = []
    writer = MetricWriter(str(tmp_path))
    _run(events, trainer=Trainer(events, log_every_steps=4), total=6, writer=writer)
    writer.close()
    got = _read_events(str(tmp_path))
    assert got["train/loss"] == [(4, 0.25), (6, pytest.approx(1 / 6))]
    assert got["train/finite"] == [(4, 1.0), (6, 1.0)]
    assert [s for s, _ in got["samples_per_second"]] == [4, 6]


@pytest.mark.slow  # the tiny model through main.run: ~1 min
def test_main_validates_each_epoch_and_keeps_the_best(tmp_path):
    workdir = str(tmp_path / "run")
    c = smoke_config(workdir)  # the tiny synthetic run of test_main_smoke.py
    # 32 captions, 4 steps per epoch; 6 steps: epoch 1 ends at step 4, the run at step 6.
    c.train.update(dict(eval_every_epochs=1, num_steps=6))
    main.run(c, workdir, "train", progress=False)
    log = open(os.path.join(workdir, "log.txt")).read()
    assert "epoch 1: val t2v R@1" in log and "epoch 2: val t2v R@1" in log
    got = _read_events(workdir)
    assert [s for s, _ in got["val/t2v/R@1"]] == [4, 6]
    assert os.listdir(os.path.join(workdir, "checkpoints_best"))
