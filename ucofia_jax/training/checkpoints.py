"""Orbax checkpoints of the whole train state, resume, and clean preemption.

Layout under ``WORKDIR``::

  checkpoints/<step>/{state, meta, checksums}   every ``train.checkpoint_every_steps`` and at
                                      epoch end, the last ``train.keep_checkpoints`` kept (async)
  checkpoints_best/<step>/{state, meta, checksums}   the one with the best validation R@1
  checkpoints_damaged/<step>/         a checkpoint that could not be read, set aside when the
                                      run resumed from an earlier one

``state`` is the TrainState pytree (params, optimizer state, step, PRNG key); ``meta`` is
JSON: the data position (epoch, step in epoch), the metrics of that checkpoint and the run's
config. Since the input order is a pure function of (seed, epoch), the position is enough to
continue an interrupted run exactly. ``checksums`` is JSON too: a 64-bit checksum of every
array of ``state`` (:func:`state_checksums`), computed on the devices before the save and
compared after every restore, so that a file whose bits changed without changing its size (a
bad disk, a faulty copy) is noticed: Orbax's own checks (zarr v3's crc32c) cover the chunk
index, not the data, and the default zarr v2 format has none. A checkpoint without
``checksums`` (written before them) is restored unchecked.

Faults, each a :class:`CheckpointError` with one line naming the path and what is wrong:

* an unreadable latest checkpoint (truncated array file, missing ``_METADATA`` or
  ``meta/metadata``, an array that differs from its checksum, non-finite values):
  :meth:`Checkpointer.restore_latest` warns naming the step and the reason, sets it aside and
  resumes from the one before (keep >= 2);
* a failed asynchronous save (disk full, read-only directory) is seen at the next train step
  (:meth:`Checkpointer.check_saves`, no waiting), not at the next save; the half-written
  ``*.orbax-checkpoint-tmp*`` directory is removed;
* before training, :meth:`Checkpointer.check_room` checks that the directory can be written
  and has room for one more checkpoint.

Stopping on a signal (:class:`PreemptionGuard`): SIGTERM (preemption, ``kill``, SLURM's time
limit) and SIGINT (Ctrl-C) make the train loop save synchronously after a step and return
(the program then exits with status 0 for SIGTERM, 130 for SIGINT). A second signal that the
guard handles exits at once, unsaved. Which step, depends on the number of processes:

* One process (also one under ``jax.distributed``): the guard's Python handlers set a flag
  that the loop reads after each step. JAX's preemption service needs ``jax.distributed``
  (``reached_preemption_sync_point`` is always false without it), so it cannot serve here.
* Several processes: the signal reaches them at different steps, and saves at different
  steps would hang in their collectives. JAX's preemption service (on by default,
  ``jax_enable_preemption_service``) catches SIGTERM itself and tells every process;
  :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`, which the loop asks
  after every step with the same step number everywhere, turns true at the same step on all
  of them (Orbax's ``CheckpointManager.reached_preemption`` is the same call). So the guard
  leaves SIGTERM to JAX (a Python handler would replace JAX's) and turns Ctrl-C into a
  SIGTERM to its own process, which reaches the others the same way; a second Ctrl-C exits
  at once. A process that received no signal reports SIGTERM (status 0).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ucofia_jax.errors import CheckpointError
from ucofia_jax.ops.topk import mix32
from ucofia_jax.runtime import distributed
from ucofia_jax.training import resume

log = logging.getLogger(__name__)

TMP_MARK = ".orbax-checkpoint-tmp"
ITEMS = ("state", "meta", "checksums")  # the items of a step directory (module docstring)
DAMAGED_DIR = "checkpoints_damaged"


def _abstract(tree: Any) -> Any:
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(one, tree)


def state_nbytes(tree: Any) -> int:
    """Bytes of the arrays of ``tree`` (global shapes): an upper bound of a checkpoint's size
    (Orbax compresses)."""
    return int(
        sum(
            math.prod(x.shape) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(tree)
            if hasattr(x, "shape") and hasattr(x, "dtype")
        )
    )


# --------------------------------------------------------------------------- checksums

CHECKSUM_ITEM = "checksums"  # the step's JSON item: {"algorithm": ..., "arrays": {path: hex}}
CHECKSUM_ALGORITHM = "lowbias32-sum+odd-weighted-sum/v1"
_GOLDEN = 0x9E3779B1  # spreads consecutive positions over the 32-bit range before mixing


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words of the same shape (8-byte items folded into one)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    if size == 8:
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # shape + (2,)
        return halves[..., 0] ^ mix32(halves[..., 1] + jnp.uint32(_GOLDEN))
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _array_checksum(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Two uint32 sums over an array's elements (wrapping, so exact in any reduction order and
    under any sharding): of ``mix32(word + position * golden)`` (any change of one word
    changes its term: mix32 is a bijection) and of ``word * (2 * position + 1)`` (odd
    weights: a single flipped bit always changes it). Positions are row-major indices, built
    from iotas of the array's own shape (no reshape, which would move sharded data)."""
    w = _words(x)
    position = jnp.zeros(w.shape, jnp.uint32)
    for axis, n in enumerate(w.shape):
        position = position * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
    mixed = jnp.sum(mix32(w + position * jnp.uint32(_GOLDEN)), dtype=jnp.uint32)
    weighted = jnp.sum(w * (position * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    return mixed, weighted


# One compile per distinct (shape, dtype, sharding), not one of the whole tree: the blocks of
# a transformer share their shapes, and XLA compiles hundreds of reductions slowly (10 s for
# the demo's tree at once, against well under a second leaf by leaf). 0-d outputs are
# replicated on every device, so each process reads its own copy.
_leaf_checksum = jax.jit(_array_checksum)


def state_checksums(tree: Any) -> Dict[str, str]:
    """``{'params/clip/...': 16 hex digits}`` of every array of ``tree``, computed where the
    arrays are (one jitted reduction; no copy to the host). Layout-independent: a state
    restored onto another mesh or number of processes has the same checksums. With several
    processes every one must call it (a collective); each sums the shards it holds, the
    partial sums are added across processes, and all get the same table."""
    named = [
        (resume.path_name(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(x, "shape") and hasattr(x, "dtype")
    ]
    sums = [_leaf_checksum(x) for _, x in named]
    out = {}
    for (name, _), (mixed, weighted) in zip(named, sums):
        a, b = (int(np.asarray(v.addressable_data(0))) for v in (mixed, weighted))
        out[name] = f"{a:08x}{b:08x}"
    return out


def _checksum_item(tree: Any) -> Dict[str, Any]:
    return {"algorithm": CHECKSUM_ALGORITHM, "arrays": state_checksums(tree)}


def _read_checksums(step_dir: str) -> Optional[Dict[str, str]]:
    """The saved ``{path: checksum}`` of a step; None for a checkpoint written without them."""
    path = os.path.join(step_dir, CHECKSUM_ITEM, "metadata")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("algorithm") != CHECKSUM_ALGORITHM:
            raise ValueError(f"unknown checksum algorithm {saved.get('algorithm')!r}")
        return dict(saved["arrays"])
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable checksums ({_why(e)})") from e


def verify_checksums(step_dir: str, tree: Any, prefix: str = "") -> None:
    """Raise :class:`CheckpointError` naming the arrays of ``tree`` (restored from
    ``step_dir``; its paths below ``prefix``, e.g. 'params/') that differ from the checksums
    written at save. Nothing to compare (an older checkpoint): returns."""
    saved = _read_checksums(step_dir)
    if saved is None:
        log.info("%s has no checksums (written before them): restored unchecked", step_dir)
        return
    now = state_checksums(tree)
    bad = sorted(k for k, v in now.items() if saved.get(prefix + k, v) != v)
    if bad:
        shown = ", ".join(prefix + k for k in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{os.path.join(step_dir, 'state')}: {len(bad)} array(s) differ from the checksums "
            f"written at save ({shown}{more}): its files were changed or damaged"
        )


# What the OS says, found in the long messages of TensorStore and Orbax.
_OS_PHRASES = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
    "Operation not permitted",
    "File too large",
)


def _why(e: BaseException) -> str:
    """One line for an exception of Orbax / TensorStore / the OS."""
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    full = str(e)
    for phrase in _OS_PHRASES:
        if phrase in full:
            return phrase
    text = full.strip().splitlines()[0] if full.strip() else type(e).__name__
    if "reading array" in text or ("TensorStore" in text and "read" in text.lower()):
        return "an array file cannot be read (truncated or corrupt)"
    return f"{type(e).__name__}: {text[:200]}"


class _QuietOrbaxErrors(logging.Filter):
    """Drops Orbax's ERROR tracebacks of a failed save (the caller raises one clear
    :class:`CheckpointError` instead) and a warning that is no problem here;
    ``UCOFIA_VERBOSE=1`` keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("UCOFIA_VERBOSE", "") not in ("", "0"):
            return True
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno >= logging.ERROR:
            return False
        # Reading a state's metadata alone (param_shapes) lacks the step's metadata file.
        return "_CHECKPOINT_METADATA" not in record.getMessage()


_QUIET = _QuietOrbaxErrors()


def _is_closed_loop_callback(unraisable) -> bool:
    """An asyncio loop's ``call_soon_threadsafe`` refused because the loop is closed: what
    TensorStore reports (``PyErr_WriteUnraisable``, a bare traceback on stderr) for every
    write that finishes after a failed save has ended the loop running it (Orbax runs a
    save's coroutine in a fresh loop and closes it at the first error; TensorStore's other
    writes then complete into the closed loop). The failure itself reaches us through the
    save's future and is reported once; these are its echoes, one per array in flight (143
    for one save of a read-only directory)."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return any(f.name == "call_soon_threadsafe" and "asyncio" in f.filename for f in frames)


def _install_closed_loop_filter() -> None:
    """Drop :func:`_is_closed_loop_callback` reports from ``sys.unraisablehook`` for the
    rest of the process (they can come after the run has ended, while the error is being
    printed); every other unraisable exception, and all of them with ``UCOFIA_VERBOSE=1``,
    go to the hook that was there. Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "_ucofia_closed_loop_filter", False):
        return

    def hook(unraisable):
        verbose = os.environ.get("UCOFIA_VERBOSE", "") not in ("", "0")
        if verbose or not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook._ucofia_closed_loop_filter = True
    sys.unraisablehook = hook


class _QuietUnretrievedWrites(logging.Filter):
    """asyncio's "Future exception was never retrieved" for a write into a save's temporary
    directory (``*.orbax-checkpoint-tmp``): the other echo of a failed save, logged when the
    future of a write still in flight is garbage-collected (``RESOURCE_EXHAUSTED ... No space
    left on device``, one per array), possibly after the run has ended. The failure itself is
    reported once; ``UCOFIA_VERBOSE=1`` keeps these."""

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("UCOFIA_VERBOSE", "") not in ("", "0"):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or ".orbax-checkpoint-tmp" not in str(exc)


_QUIET_UNRETRIEVED = _QuietUnretrievedWrites()


def _install_unretrieved_write_filter() -> None:
    """:data:`_QUIET_UNRETRIEVED` on asyncio's logger for the rest of the process (the
    reports come at garbage collection, after the Checkpointer may be closed). Idempotent."""
    asyncio_log = logging.getLogger("asyncio")
    if _QUIET_UNRETRIEVED not in asyncio_log.filters:
        asyncio_log.addFilter(_QUIET_UNRETRIEVED)


@contextlib.contextmanager
def _quiet_orbax():
    """:data:`_QUIET` on absl's logger for the block (unless a Checkpointer has it on)."""
    absl_log = logging.getLogger("absl")
    added = _QUIET not in absl_log.filters
    absl_log.addFilter(_QUIET)
    try:
        yield
    finally:
        if added:
            absl_log.removeFilter(_QUIET)


def _finite(tree: Any) -> bool:
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not leaves:
        return True
    return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))))


def _step_dirs(directory: str) -> List[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _missing_files(step_dir: str) -> List[str]:
    """Files every complete checkpoint has; Orbax's own error for each is misleading."""
    need = ("state/_METADATA", "meta/metadata")
    return [n for n in need if not os.path.exists(os.path.join(step_dir, n))]


class Checkpointer:
    """Last-k and best-by-R@1 managers over one workdir."""

    def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.best_directory = os.path.join(self.workdir, "checkpoints_best")
        logging.getLogger("absl").addFilter(_QUIET)
        _install_closed_loop_filter()
        _install_unretrieved_write_filter()
        self._in_flight: Dict[str, int] = {}  # manager name -> step of its async save
        self._reported = False  # a failed save was raised as a CheckpointError
        try:
            opts = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            )
            self.last = ocp.CheckpointManager(self.directory, options=opts, item_names=ITEMS)
            best_opts = ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                best_fn=lambda m: float(m["R@1"]),
                best_mode="max",
            )
            self.best = ocp.CheckpointManager(
                self.best_directory, options=best_opts, item_names=ITEMS
            )
        except OSError as e:
            raise CheckpointError(
                f"cannot create the checkpoint directories in {self.workdir}: {_why(e)}"
            ) from e

    def _managers(self):
        return (("last", self.last, self.directory), ("best", self.best, self.best_directory))

    # ------------------------------------------------------------------ save
    def check_room(self, state: Any) -> None:
        """Before training: the checkpoint directory can be written and has room for one
        checkpoint of ``state`` (its array bytes, an upper bound)."""
        need = state_nbytes(state) + (1 << 20)
        probe = os.path.join(self.directory, f".write-test-{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            os.remove(probe)
        except OSError as e:
            raise CheckpointError(
                f"cannot write checkpoints to {self.directory}: {_why(e)}. Make it writable "
                "or pass another --workdir."
            ) from e
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise CheckpointError(
                f"{self.directory} has {free / 2**20:.1f} MiB free; one checkpoint of this "
                f"state needs about {need / 2**20:.1f} MiB. Free space or pass another --workdir."
            )

    def save(self, step: int, state: Any, meta: Dict[str, Any], *, force: bool = False) -> bool:
        self.check_saves()
        if step in (self.last.all_steps() or []):
            return False
        try:
            saved = self.last.save(step, args=_save_args(state, meta), force=force)
        except Exception as e:  # pylint: disable=broad-except
            # Orbax waits for the previous save first: its failure surfaces here.
            self._failed("last", self._in_flight.get("last", step), e)
        if saved:
            self._in_flight["last"] = step
            log.info("checkpoint %d queued in %s", step, self.directory)
        return saved

    def save_best(self, step: int, state: Any, meta: Dict[str, Any], r1: float) -> bool:
        """Keep ``state`` if ``r1`` (validation text-to-video R@1) is the best so far."""
        self.check_saves()
        if step in (self.best.all_steps() or []):
            return False
        try:
            saved = self.best.save(
                step, args=_save_args(state, meta), metrics={"R@1": float(r1)}, force=True
            )
        except Exception as e:  # pylint: disable=broad-except
            self._failed("best", self._in_flight.get("best", step), e)
        if saved:
            self._in_flight["best"] = step
        return saved

    def check_saves(self) -> None:
        """Raise :class:`CheckpointError` if an asynchronous save has finished with an error.
        Cheap (no waiting): the train loop calls it after every step."""
        for name, mngr, directory in self._managers():
            step = self._in_flight.get(name)
            if step is None or mngr.is_saving_in_progress():
                continue
            self._finish(name, mngr, directory, step)

    def _finish(self, name: str, mngr, directory: str, step: int) -> None:
        try:
            mngr.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            self._failed(name, step, e)
        self._in_flight.pop(name, None)
        if distributed.is_main_process() and not os.path.isdir(os.path.join(directory, str(step))):
            self._failed(name, step, RuntimeError("the step directory is missing after the save"))

    def _failed(self, name: str, step: int, e: BaseException):
        self._in_flight.pop(name, None)
        self._reported = True
        directory = self.directory if name == "last" else self.best_directory
        self._remove_tmp()
        intact = [s for s in _step_dirs(self.directory) if s != step]
        last = (
            f"the last complete checkpoint is step {intact[-1]} "
            f"({os.path.join(self.directory, str(intact[-1]))})"
            if intact
            else "no complete checkpoint exists yet"
        )
        raise CheckpointError(
            f"saving checkpoint {step} to {directory} failed: {_why(e)}; {last}. Free disk space "
            "or make the directory writable, then re-run the same command to resume."
        ) from e

    def _remove_tmp(self) -> None:
        """Half-written step directories (Orbax's temporary names), on process 0."""
        if not distributed.is_main_process():
            return
        for directory in (self.directory, self.best_directory):
            if not os.path.isdir(directory):
                continue
            for n in os.listdir(directory):
                if TMP_MARK in n:
                    shutil.rmtree(os.path.join(directory, n), ignore_errors=True)

    def wait(self) -> None:
        for name, mngr, directory in self._managers():
            step = self._in_flight.get(name)
            if step is not None:
                self._finish(name, mngr, directory, step)
            else:
                mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves in flight and close; a failed save raises (once: not again
        while its CheckpointError is on its way up)."""
        try:
            self.wait()
        except Exception as e:  # pylint: disable=broad-except
            if not self._reported:
                raise
            log.debug("after a failed save: %s", e)
        finally:
            for _, mngr, _ in self._managers():
                try:
                    mngr.close()
                except Exception as e:  # pylint: disable=broad-except
                    log.debug("closing the checkpoint manager: %s", e)
            self._remove_tmp()
            logging.getLogger("absl").removeFilter(_QUIET)

    # ------------------------------------------------------------------ restore
    def latest_step(self) -> Optional[int]:
        return self.last.latest_step()

    def complete_steps(self) -> List[int]:
        """The steps in checkpoints/ whose directories are complete (finished renames)."""
        return _step_dirs(self.directory)

    def read_meta(self, step: int) -> Dict[str, Any]:
        """The JSON ``meta`` of ``step``, read before its arrays (the run's config is there)."""
        return _read_meta(os.path.join(self.directory, str(step)))

    def param_shapes(self, step: int) -> Dict[str, Tuple[int, ...]]:
        """``{'clip/visual/conv1/kernel': shape, ...}`` of the params saved at ``step``, from
        the checkpoint's metadata (no array is read)."""
        saved = _saved_params(os.path.join(self.directory, str(step)))
        return {k: tuple(v.shape) for k, v in saved.items()}

    def restore(
        self, target_state: Any, step: Optional[int] = None, *, best: bool = False
    ) -> Tuple[Any, Dict[str, Any]]:
        """(state, meta) of ``step`` (default latest / best), shaped and sharded like the target."""
        mngr = self.best if best else self.last
        if step is None:
            step = mngr.best_step() if best else mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
        return _restore(mngr, step, target_state)

    def restore_latest(
        self,
        target_state: Any,
        check: Optional[Callable[[int, Dict[str, Any], Dict[str, Tuple]], None]] = None,
    ) -> Optional[Tuple[Any, Dict[str, Any]]]:
        """(state, meta) of the newest readable checkpoint; None when there is none.

        ``check(step, meta, param_shapes)`` runs before any array is read and may refuse the
        resume (its exception propagates). A checkpoint that cannot be read (missing files, truncated
        arrays, non-finite values) is reported with a warning naming the step and why, set
        aside in ``checkpoints_damaged/`` and the previous one is tried.
        """
        steps = sorted(self.last.all_steps() or [], reverse=True)
        damaged: List[Tuple[int, str]] = []
        for step in steps:
            step_dir = os.path.join(self.directory, str(step))
            missing = _missing_files(step_dir)
            try:
                if missing:
                    raise CheckpointError(f"missing {', '.join(missing)}")
                meta = self.read_meta(step)
                shapes = self.param_shapes(step)
            except Exception as e:  # pylint: disable=broad-except
                why = str(e) if isinstance(e, CheckpointError) else _why(e)
                damaged.append((step, why))
                self._warn_damaged(step, why, steps)
                continue
            if check is not None:
                check(step, meta, shapes)
            try:
                state, meta = _restore(self.last, step, target_state)
                if not _finite(state):
                    raise CheckpointError("it holds non-finite (NaN/inf) values")
            except Exception as e:  # pylint: disable=broad-except
                why = str(e) if isinstance(e, CheckpointError) else _why(e)
                damaged.append((step, why))
                self._warn_damaged(step, why, steps)
                continue
            self._set_aside([s for s, _ in damaged])
            return state, meta
        if damaged:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: "
                + "; ".join(f"step {s}: {why}" for s, why in damaged)
                + ". Move the directory away to start afresh."
            )
        return None

    def _warn_damaged(self, step: int, why: str, steps: List[int]) -> None:
        earlier = [s for s in steps if s < step]
        then = f"trying step {earlier[0]}" if earlier else "no earlier checkpoint"
        log.warning(
            "checkpoint %d in %s cannot be restored (%s); %s", step, self.directory, why, then
        )

    def _set_aside(self, steps: List[int]) -> None:
        """Move unreadable checkpoints out of the way so that the resumed run can write those
        steps again; kept (not deleted) in ``checkpoints_damaged/`` for a post-mortem."""
        if not steps:
            return
        if distributed.is_main_process():
            dest = os.path.join(self.workdir, DAMAGED_DIR)
            os.makedirs(dest, exist_ok=True)
            for s in steps:
                target = os.path.join(dest, f"{s}-{int(time.time())}")
                os.rename(os.path.join(self.directory, str(s)), target)
                log.warning("unreadable checkpoint %d moved to %s", s, target)
        distributed.sync("checkpoints_set_aside")
        self.last.reload()


def _read_meta(step_dir: str) -> Dict[str, Any]:
    path = os.path.join(step_dir, "meta", "metadata")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {_why(e)}") from e


def _by_path(tree: Any) -> Dict[str, Any]:
    """``{'clip/visual/conv1/kernel': leaf, ...}``."""
    return {resume.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_sharding(meta_leaf: Any):
    """The sharding an array was saved with, on this process's devices; None (a host numpy
    array) when it was saved from the host or the devices differ."""
    sharding = getattr(meta_leaf, "sharding", None)
    if sharding is None:
        return None
    try:
        return sharding.to_jax_sharding()
    except ValueError:  # another topology than the run's
        return None


def _restore_params_only(step_dir: str, params_target: Any) -> Any:
    """The ``params`` subtree of a step's saved train state, shaped like ``params_target``:
    an Orbax partial restore, so the optimizer state, step and PRNG key are never read.

    Partial restores do not check the tree against the checkpoint (a parameter the target
    lacks would be silently dropped, a shape silently taken from the file): done here first,
    from the metadata, naming the parameters."""
    saved = _saved_params(step_dir)
    differences = resume.shape_differences(
        {k: tuple(v.shape) for k, v in saved.items()}, resume.tree_shapes(params_target), shown=3
    )
    if differences:
        raise CheckpointError(
            "the params of another model (another config.model or config.data.max_frames / "
            f"max_words?): {differences}"
        )
    target = {"params": _abstract(params_target)}
    shardings = {
        "params": jax.tree_util.tree_map_with_path(
            lambda p, x: (
                getattr(x, "sharding", None) or _saved_sharding(saved[resume.path_name(p)])
            ),
            target["params"],
        )
    }
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target, shardings),
        partial_restore=True,
    )
    with _quiet_orbax(), ocp.PyTreeCheckpointer() as reader:
        params = reader.restore(os.path.join(step_dir, "state"), args=args)["params"]
    verify_checksums(step_dir, params, prefix="params/")
    return params


def _saved_state(step_dir: str) -> Any:
    """The tree of array metadata (shapes, shardings) a step saved; no array is read."""
    with _quiet_orbax(), ocp.StandardCheckpointer() as reader:
        return reader.metadata(os.path.join(step_dir, "state")).item_metadata


def _saved_params(step_dir: str) -> Dict[str, Any]:
    """``{path: array metadata}`` of the params a step saved."""
    return _by_path(_saved_state(step_dir)["params"])


def newest_saved(workdir: str) -> Optional[Tuple[int, Dict[str, Any], Dict[str, Tuple]]]:
    """(step, meta, ``{path: shape}`` of the whole saved state) of the newest checkpoint in
    ``workdir/checkpoints`` whose meta and metadata read, without reading any array; None
    when there is none. For the resume check before anything is built; an unreadable one is
    skipped here and named when the run restores."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    for step in reversed(_step_dirs(directory)):
        step_dir = os.path.join(directory, str(step))
        if _missing_files(step_dir):
            continue
        try:
            meta = _read_meta(step_dir)
            shapes = resume.tree_shapes(_saved_state(step_dir))
        except Exception as e:  # pylint: disable=broad-except
            log.debug("resume check: checkpoint %s unreadable (%s)", step_dir, _why(e))
            continue
        return step, meta, shapes
    return None


def _save_args(state: Any, meta: Dict[str, Any]) -> ocp.args.Composite:
    # The checksums are computed before Orbax copies the arrays to the host: from the very
    # arrays it writes (a step's update cannot come in between; the caller waits for it).
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(meta),
        checksums=ocp.args.JsonSave(_checksum_item(state)),
    )


def _restore(mngr, step: int, target_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """(state, meta) of ``step``, its arrays verified against the checksums of the save."""
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target_state)), meta=ocp.args.JsonRestore()
        ),
    )
    verify_checksums(os.path.join(str(mngr.directory), str(step)), out["state"])
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
    path: str, params_target: Any, *, prefer_best: bool = True
) -> Tuple[Any, Dict[str, Any]]:
    """(params, meta) from a workdir / checkpoint dir, for ``--mode=eval`` and search (through
    ucofia_jax/weights.py). ``params_target``: the params' shapes (e.g. ``jax.eval_shape`` of
    ``Model.init``); only the params are read, not the optimizer state.

    A named step is restored or fails; otherwise the newest readable checkpoint of the chosen
    directory (best, then the last-k) is used, each unreadable one named in a warning."""
    directory, step = find_checkpoint_dir(path)
    if os.path.basename(directory) == "checkpoints_best" and not prefer_best:
        directory = os.path.join(os.path.dirname(directory), "checkpoints")
    candidates = [(directory, step)] if step is not None else []
    if step is None:
        dirs = [directory]
        if os.path.basename(directory) == "checkpoints_best":
            dirs.append(os.path.join(os.path.dirname(directory), "checkpoints"))
        candidates = [(d, s) for d in dirs for s in reversed(_step_dirs(d))]
    if not candidates:
        raise CheckpointError(
            f"no checkpoint under {path}: train first (python -m ucofia_jax.main "
            f"--config=... --workdir={path}) or point --config.model.ucofia_checkpoint at the "
            "released UCoFiA pytorch_model.bin"
        )
    problems = []
    for d, s in candidates:
        step_dir = os.path.join(d, str(s))
        try:
            missing = _missing_files(step_dir)
            if missing:
                raise CheckpointError(f"missing {', '.join(missing)}")
            meta = _read_meta(step_dir)
            return _restore_params_only(step_dir, params_target), meta
        except Exception as e:  # pylint: disable=broad-except
            why = str(e) if isinstance(e, CheckpointError) else _why(e)
            problems.append(f"{step_dir}: {why}")
            log.warning("checkpoint %s cannot be restored (%s)", step_dir, why)
    raise CheckpointError("no readable checkpoint: " + "; ".join(problems))


class PreemptionGuard:
    """SIGTERM / SIGINT -> the loop saves and stops after a step (module docstring).

    ``stop_at(step)``, called once after every step, says whether to stop there;
    ``requested`` is whether this process received a signal, ``signal_name`` the one that
    stopped the run. A second signal while the first is being handled exits at once (status
    128 + signal number, nothing saved): the user who presses Ctrl-C twice means it.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signal_name = None
        self.signum = None
        # Several processes stop together at JAX's preemption sync point, which SIGTERM reaches
        # through JAX's own handler.
        self.synced = distributed.is_initialized() and jax.process_count() > 1
        self._previous = {}
        for s in signals:
            if self.synced and s == signal.SIGTERM:
                continue
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handler(self, signum, frame):  # pylint: disable=unused-argument
        name = signal.Signals(signum).name
        if self.requested:
            sys.stderr.write(f"\n{name} again: exiting now, without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = True
        self.signal_name = name
        self.signum = signum
        sys.stderr.write(
            f"\n{name}: saving a checkpoint after this step, then exiting "
            f"({name} again exits at once)\n"
        )
        sys.stderr.flush()
        if self.synced:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notice reaches every process

    def stop_at(self, step: int) -> bool:
        """Whether the loop saves and stops after ``step`` (every process the same answer)."""
        if not self.synced:
            return self.requested
        if not multihost_utils.reached_preemption_sync_point(step):
            return False
        self.signal_name = self.signal_name or "SIGTERM"
        return True

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
