"""Orbax checkpoints of the whole train state, resume, and clean preemption.

Layout under ``WORKDIR``::

  checkpoints/<step>/{state, meta}    every ``train.checkpoint_every_steps`` and at epoch end,
                                      the last ``train.keep_checkpoints`` kept (async save)
  checkpoints_best/<step>/{state, meta}   the one with the best validation R@1

``state`` is the TrainState pytree (params, optimizer state, step, PRNG key); ``meta`` is
JSON: the data position (epoch, step in epoch), the metrics of that checkpoint and the config
name. Since the input order is a pure function of (seed, epoch), the position is enough to
continue an interrupted run exactly.

SIGTERM (preemption, ``kill``, SLURM's time limit) only sets a flag: the train loop sees it
after the current step, saves synchronously and exits with status 0.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _abstract(tree: Any) -> Any:
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(one, tree)


class Checkpointer:
    """Last-k and best-by-R@1 managers over one workdir."""

    def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.last = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"), options=opts, item_names=("state", "meta")
        )
        best_opts = ocp.CheckpointManagerOptions(
            max_to_keep=1,
            create=True,
            enable_async_checkpointing=async_save,
            best_fn=lambda m: float(m["R@1"]),
            best_mode="max",
        )
        self.best = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints_best"),
            options=best_opts,
            item_names=("state", "meta"),
        )

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, meta: Dict[str, Any], *, force: bool = False) -> bool:
        if step in (self.last.all_steps() or []):
            return False
        saved = self.last.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )
        if saved:
            log.info("checkpoint %d queued in %s", step, self.last.directory)
        return saved

    def save_best(self, step: int, state: Any, meta: Dict[str, Any], r1: float) -> bool:
        """Keep ``state`` if ``r1`` (validation text-to-video R@1) is the best so far."""
        if step in (self.best.all_steps() or []):
            return False
        return self.best.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics={"R@1": float(r1)},
            force=True,
        )

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.last.close()
        self.best.close()

    # ------------------------------------------------------------------ restore
    def latest_step(self) -> Optional[int]:
        return self.last.latest_step()

    def restore(
        self, target_state: Any, step: Optional[int] = None, *, best: bool = False
    ) -> Tuple[Any, Dict[str, Any]]:
        """(state, meta) of ``step`` (default latest / best), shaped and sharded like the target."""
        mngr = self.best if best else self.last
        if step is None:
            step = mngr.best_step() if best else mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target_state)), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])


def find_checkpoint_dir(path: str) -> Tuple[str, Optional[int]]:
    """A workdir, its checkpoints/ dir, or one step dir -> (manager dir, step or None)."""
    path = os.path.abspath(path)
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit():
        return os.path.dirname(path), int(base)
    for sub in ("checkpoints_best", "checkpoints"):
        d = os.path.join(path, sub)
        if os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d)):
            return d, None
    return path, None


def restore_params(
    path: str, target_state: Any, *, prefer_best: bool = True
) -> Tuple[Any, Dict[str, Any]]:
    """(state, meta) from a workdir / checkpoint dir, for ``--mode=eval``."""
    directory, step = find_checkpoint_dir(path)
    if os.path.basename(directory) == "checkpoints_best" and not prefer_best:
        directory = os.path.join(os.path.dirname(directory), "checkpoints")
    mngr = ocp.CheckpointManager(directory, item_names=("state", "meta"))
    try:
        if step is None:
            step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint under {path}: train first (python -m ucofia_jax.main "
                f"--config=... --workdir={path}) or point --config.model.ucofia_checkpoint at the "
                "released UCoFiA pytorch_model.bin"
            )
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target_state)), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])
    finally:
        mngr.close()


class PreemptionGuard:
    """SIGTERM/SIGINT -> ``requested`` = True; the loop saves and exits after the step."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self.signal_name = None
        self._previous = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handler(self, signum, frame):  # pylint: disable=unused-argument
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
