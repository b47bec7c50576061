"""Multi-host runtime: ``jax.distributed`` initialisation, global batches, gathers, logging.

One code path for one CPU, one GPU host, a SLURM cluster and a TPU pod. ``launch.sh`` sets
the environment; the program calls :func:`maybe_initialize` first thing (before anything
touches ``jax.devices()``), then builds its mesh over ``jax.devices()`` (all processes'
devices) as usual.

Settings, highest priority first: keyword arguments, ``config.distributed`` (or a flat mapping
of the same names), environment variables set by ``launch.sh``:

``UCOFIA_DISTRIBUTED``      ``auto`` (default), ``on`` or ``off``.
                            ``auto``: initialise when a coordinator is given, inside a SLURM
                            job step with more than one task, or on a multi-worker TPU VM;
                            ``on``: always call ``jax.distributed.initialize`` (with JAX's
                            own cluster detection for anything not given); ``off``: never.
``UCOFIA_COORDINATOR``      ``host:port`` of process 0's coordinator service.
``UCOFIA_NUM_PROCESSES``    number of processes.
``UCOFIA_PROCESS_ID``       this process's index, 0 .. num_processes - 1.
``UCOFIA_LOCAL_DEVICE_IDS`` optional, comma-separated local device ids for this process
                            (one process per GPU).
``UCOFIA_INIT_TIMEOUT``     seconds to wait for the other processes (default 300).

On CPU the cross-process collectives need an implementation: this jax defaults to gloo;
we set ``jax_cpu_collectives_implementation='gloo'`` explicitly when it is unset/``none``.

Data: each process reads exactly the rows of the global batch its devices hold under the
batch sharding (:func:`process_rows`: from the sharding's device-to-rows map, so it holds for
every mesh; where a ``model`` axis spans processes, the processes of a group read the same
rows), and :func:`global_batch_from_local` turns those rows into global ``jax.Array`` s with
the batch sharding it is given (``sharding.batch_sharding``, the one definition of it),
stating the global shape. Metrics
are brought to every host with :func:`process_allgather` or :func:`to_host`. Logging,
reports and checkpoint metadata are written by process 0 only (:func:`is_main_process`,
:func:`setup_logging`); Orbax saves from every process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from ucofia_jax.config import base_config

__all__ = [
    "DistributedSettings",
    "settings_from_env",
    "maybe_initialize",
    "is_initialized",
    "is_main_process",
    "process_index",
    "process_count",
    "process_rows",
    "local_batch_slice",
    "global_batch_from_local",
    "process_allgather",
    "to_host",
    "check_mesh_spans_processes",
    "sync",
    "quiet_logs",
    "setup_logging",
]

ENV_MODE = "UCOFIA_DISTRIBUTED"
ENV_COORDINATOR = "UCOFIA_COORDINATOR"
ENV_NUM_PROCESSES = "UCOFIA_NUM_PROCESSES"
ENV_PROCESS_ID = "UCOFIA_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "UCOFIA_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "UCOFIA_INIT_TIMEOUT"

MODES = ("auto", "on", "off")
_DEFAULTS = base_config().distributed  # the one home of the defaults (mode)
_initialized_by_us = False


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """What ``jax.distributed.initialize`` gets; ``None`` = let JAX detect it.

    ``mode`` is required: :func:`settings_from_env` falls back to config.distributed.mode's
    default (``ucofia_jax.config.base_config``, its one home).
    """

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300

    def validate(self) -> "DistributedSettings":
        if self.mode not in MODES:
            raise ValueError(
                f"distributed mode must be one of {MODES}, got {self.mode!r} "
                f"(config.distributed.mode / ${ENV_MODE})"
            )
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and any(v is None for v in explicit):
            missing = [
                name
                for name, v in zip((ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID), explicit)
                if v is None
            ]
            raise ValueError(
                "an explicit multi-process launch needs the coordinator address, the number of "
                f"processes and the process id together; missing: {', '.join(missing)} "
                "(set them, or use launch.sh, which sets all three)"
            )
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError(
                f"coordinator address must be host:port, got {self.coordinator_address!r}"
            )
        if self.num_processes is not None:
            if self.num_processes < 1:
                raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
            if not 0 <= self.process_id < self.num_processes:
                raise ValueError(f"process_id {self.process_id} not in [0, {self.num_processes})")
        return self


def _int_or_none(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _ids_or_none(value: Any) -> tuple[int, ...] | None:
    if value is None or value == "" or value == ():
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


def settings_from_env(env: Mapping[str, str] | None = None) -> DistributedSettings:
    """The settings ``launch.sh`` exports (see the module docstring)."""
    env = os.environ if env is None else env
    return DistributedSettings(
        mode=env.get(ENV_MODE) or _DEFAULTS.mode,
        coordinator_address=env.get(ENV_COORDINATOR) or None,
        num_processes=_int_or_none(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES),
        process_id=_int_or_none(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID),
        local_device_ids=_ids_or_none(env.get(ENV_LOCAL_DEVICE_IDS)),
        initialization_timeout=_int_or_none(env.get(ENV_INIT_TIMEOUT), ENV_INIT_TIMEOUT) or 300,
    )


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    try:
        return getattr(obj, key)
    except Exception:  # ConfigDict raises on missing keys
        return None


_FIELDS = (
    # field, names looked up (flat name first, then config.distributed.<name>), converter
    ("mode", ("distributed_mode", "mode"), str),
    ("coordinator_address", ("coordinator_address",), str),
    ("num_processes", ("num_processes",), lambda v: _int_or_none(v, "num_processes")),
    ("process_id", ("process_id",), lambda v: _int_or_none(v, "process_id")),
    ("local_device_ids", ("local_device_ids",), _ids_or_none),
    ("initialization_timeout", ("initialization_timeout",), lambda v: _int_or_none(v, "timeout")),
)


def _merge(settings: DistributedSettings, source: Any) -> DistributedSettings:
    """Overlay the values ``source`` sets (None, '' and -1 mean unset)."""
    if source is None:
        return settings
    updates = {}
    sub = _get(source, "distributed")
    for field, names, conv in _FIELDS:
        for obj in (source, sub if not isinstance(sub, str) else None):
            # ``mode`` is only read inside config.distributed (a flat "mode" means something else).
            value = next(
                (
                    v
                    for n in names
                    if not (obj is source and n == "mode")
                    for v in [_get(obj, n)]
                    if v not in (None, "", -1)
                ),
                None,
            )
            if value is not None:
                updates[field] = conv(value)
                break
    if isinstance(sub, str) and sub:  # {"distributed": "on"}
        updates["mode"] = sub
    return dataclasses.replace(settings, **updates)


def _slurm_multi_task(env: Mapping[str, str]) -> bool:
    """Inside an ``srun`` step with several tasks. SLURM_STEP_NUM_TASKS is set by srun only:
    a batch script (where SLURM_NTASKS may be > 1 but there is one process) is not one."""
    return (
        "SLURM_JOB_ID" in env
        and "SLURM_PROCID" in env
        and int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1
    )


def _tpu_multi_worker(env: Mapping[str, str]) -> bool:
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def is_initialized() -> bool:
    """True when ``jax.distributed`` is up (ours or someone else's call)."""
    public = getattr(jax.distributed, "is_initialized", None)
    if public is not None:
        return public()
    try:  # an older jax without the public query: the state it reads
        return jax._src.distributed.global_state.client is not None
    except AttributeError:
        return _initialized_by_us


def _ensure_cpu_collectives() -> None:
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:
        return  # older/newer jax without the option: its default is what we get
    if current in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def maybe_initialize(
    config: Any = None, *, env: Mapping[str, str] | None = None, **overrides: Any
) -> bool:
    """Initialise ``jax.distributed`` when the launch asks for it; returns whether it is up.

    ``config``: a ConfigDict (reads ``config.distributed.{mode, coordinator_address,
    num_processes, process_id, local_device_ids}``), a flat mapping or attribute object with
    those names (``distributed_mode`` for the mode), or None (environment only).
    ``overrides``: the same names as keywords. Must run before the first ``jax.devices()``;
    calling it again is a no-op.
    """
    global _initialized_by_us
    env = os.environ if env is None else env
    settings = _merge(settings_from_env(env), config)
    settings = _merge(settings, overrides).validate()
    if is_initialized():
        return True
    explicit = settings.coordinator_address is not None
    if settings.mode == "off":
        return False
    if settings.mode == "auto" and not (
        explicit or _slurm_multi_task(env) or _tpu_multi_worker(env)
    ):
        return False
    if settings.mode == "auto" and explicit and settings.num_processes == 1:
        # One process: nothing to coordinate; skip the service (and its port).
        return False

    platforms = (env.get("JAX_PLATFORMS") or env.get("JAX_PLATFORM_NAME") or "").lower()
    if platforms in ("", "cpu") or platforms.startswith("cpu"):
        _ensure_cpu_collectives()
    kwargs: dict[str, Any] = dict(initialization_timeout=settings.initialization_timeout)
    if explicit:
        kwargs.update(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
    if settings.local_device_ids is not None:
        kwargs["local_device_ids"] = list(settings.local_device_ids)
    jax.distributed.initialize(**kwargs)
    _initialized_by_us = True
    # Printed by every process, not logged: the one line that shows a job is wired (each
    # process its index, and the device counts it sees), and not a library's chatter that
    # quiet_logs hides.
    print(
        f"jax.distributed up: process {jax.process_index()}/{jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices",
        flush=True,
    )
    return True


# --------------------------------------------------------------------------- queries


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """Process 0 writes logs, reports, results.json and checkpoint metadata."""
    return process_index() == 0


def check_mesh_spans_processes(devices: Any, what: str = "the mesh") -> None:
    """Raise ValueError unless ``devices`` (a mesh's) include devices of every process.

    A process none of whose devices is in the mesh holds no rows of any batch and cannot fetch
    a value of the mesh's arrays (``Fetching value for jax.Array that spans non-addressable
    devices``), so the run would die after compiling, with its peers waiting in collectives.
    """
    devices = list(devices)
    held = {d.process_index for d in devices}
    left_out = sorted(set(range(jax.process_count())) - held)
    if left_out:
        raise ValueError(
            f"{what} uses {len(devices)} of the {jax.device_count()} devices of "
            f"{jax.process_count()} processes and none of process(es) {left_out}: every "
            "process must hold devices of the mesh. Use config.mesh.data=-1 (all devices), "
            "or sizes whose product is the global device count "
            f"({jax.device_count()} = {jax.local_device_count()} per process x "
            f"{jax.process_count()})."
        )


# --------------------------------------------------------------------------- data


def _check_sharding(sharding: Any) -> None:
    # Both functions once took a mesh in this position; say what they take now.
    if not isinstance(sharding, Sharding):
        raise TypeError(
            f"expected a jax.sharding.Sharding (e.g. sharding.batch_sharding(mesh, 1)), "
            f"got {type(sharding).__name__}"
        )


def process_rows(
    global_batch_size: int, sharding: Sharding, process: int | None = None
) -> np.ndarray:
    """The rows of a global batch that ``process`` (default: this one) feeds, as int indices.

    They are the rows its devices hold under ``sharding`` (the batch sharding,
    ``sharding.batch_sharding(mesh, 1)``): the distinct row blocks of those devices in
    ascending order, which is the order :func:`global_batch_from_local` (and
    ``jax.make_array_from_process_local_data``) reads a process's rows in. Derived from the
    sharding, not from the process index: with the batch replicated over a ``model`` axis that
    spans processes, every process that holds the same blocks gets the same rows (with
    ``mesh.data=1`` every process reads the whole batch). ValueError when ``process`` holds
    no device of the sharding (``check_mesh_spans_processes`` refuses such a mesh first).
    """
    _check_sharding(sharding)
    process = jax.process_index() if process is None else int(process)
    blocks = sorted(
        {
            index[0].indices(global_batch_size)[:2]
            for device, index in sharding.devices_indices_map((global_batch_size,)).items()
            if device.process_index == process
        }
    )
    if not blocks:
        raise ValueError(f"process {process} holds no device of the batch sharding")
    return np.concatenate([np.arange(lo, hi) for lo, hi in blocks])


def local_batch_slice(global_batch_size: int, sharding: Sharding | None = None) -> slice:
    """:func:`process_rows` of this process as a slice, where they are contiguous.

    ``sharding``: the batch's sharding (``sharding.batch_sharding(mesh, 1)``). None: the
    ``p``-th of ``process_count`` equal blocks, the rows of a batch split over every device
    when the mesh lists each process's devices together. ValueError where this process's
    rows are not one contiguous block (use :func:`process_rows` there).
    """
    if sharding is None:
        n = jax.process_count()
        if global_batch_size % n:
            raise ValueError(f"global batch {global_batch_size} not divisible by {n} processes")
        per = global_batch_size // n
        return slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    rows = process_rows(global_batch_size, sharding)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if len(rows) != hi - lo:
        raise ValueError(
            "this process's rows of the batch are not contiguous; use distributed.process_rows"
        )
    return slice(lo, hi)


@functools.lru_cache(maxsize=256)  # called per leaf per step; the answer is per sharding
def _global_shape(local_shape: tuple, sharding: Sharding) -> tuple:
    """Global shape of an array of which this process holds ``local_shape`` under ``sharding``
    (leading axis: this process's rows). Every device holds a block of the same size, so the
    global row count is local rows x (distinct row blocks / distinct blocks of this process).
    Stated to JAX rather than left for it to infer, which it cannot do where processes hold
    overlapping sets of blocks."""
    # A probe size that every block count divides (there are at most mesh-size blocks).
    probe = (local_shape[0] * len(sharding.device_set),) + tuple(local_shape[1:])
    every = {
        index[0].indices(probe[0])[:2] for index in sharding.devices_indices_map(probe).values()
    }
    mine = {
        index[0].indices(probe[0])[:2]
        for index in sharding.addressable_devices_indices_map(probe).values()
    }
    if local_shape[0] % len(mine):
        raise ValueError(
            f"{local_shape[0]} local rows do not split into the {len(mine)} row blocks this "
            "process holds under the batch sharding"
        )
    return (local_shape[0] // len(mine) * len(every),) + tuple(local_shape[1:])


def global_batch_from_local(local_batch: Any, sharding: Sharding) -> Any:
    """Process-local numpy batch (pytree) -> global ``jax.Array`` s with ``sharding``.

    Every leaf's leading axis is this process's rows (:func:`process_rows`, in that order);
    the global leading size follows from the sharding (:func:`_global_shape`): local rows x
    process count when the batch is split over every device, the local rows themselves when
    it is replicated over the processes. ``sharding`` shards the leading axis
    (``sharding.batch_sharding``); a spec shorter than a leaf's rank leaves the other axes
    replicated. In a single process this is a plain ``device_put``.
    """
    _check_sharding(sharding)

    def one(x):
        x = np.asarray(x)
        shape = _global_shape(tuple(x.shape), sharding)
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local_batch)


def process_allgather(tree: Any, tiled: bool = True) -> Any:
    """Every process gets the full value of each leaf as numpy.

    Global (sharded) ``jax.Array`` s come back whole; process-local arrays are concatenated
    over processes along axis 0 (``tiled=True``) or stacked on a new leading axis.
    """
    if jax.process_count() == 1:

        def local(x):
            x = np.asarray(x)
            return x if tiled else x[None]

        if tiled:
            return jax.tree.map(lambda x: np.asarray(x), tree)
        return jax.tree.map(local, tree)
    return multihost_utils.process_allgather(tree, tiled=tiled)


def to_host(tree: Any) -> Any:
    """Global arrays (sharded over all processes) -> full numpy on every process."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


SYNC_TIMEOUT_S = 3600  # a barrier may wait for process 0 to build a dataset
_barriers = 0  # every process passes the same barriers in the same order


def sync(name: str, timeout_s: int = SYNC_TIMEOUT_S) -> None:
    """Barrier across processes (no-op for one process).

    A barrier of the coordination service, not a collective: the CPU (gloo) collectives give
    the other processes 30 s to join a new communicator, which a process building the
    synthetic dataset for the others overruns on a busy machine (``Gloo context
    initialization failed: DEADLINE_EXCEEDED``)."""
    global _barriers
    if jax.process_count() == 1:
        return
    client = _coordination_client()
    if client is None:  # jax.distributed initialised in a way we cannot reach: a collective
        multihost_utils.sync_global_devices(name)
        return
    _barriers += 1
    client.wait_at_barrier(f"ucofia:{_barriers}:{name}", timeout_in_ms=int(timeout_s * 1000))


def _coordination_client():
    try:
        return jax._src.distributed.global_state.client
    except AttributeError:
        return None


# The libraries whose INFO lines, and warnings about their own internals (TFDS's "Using custom
# data configuration", Orbax's metadata notes), fill a user's terminal; --verbose shows them.
LIBRARY_LOGGERS = ("absl", "jax", "orbax", "tensorflow", "tensorstore")
# A command's log lines when not --verbose: our own warnings and errors, as plain lines.
QUIET_FORMAT = "%(levelname)s: %(message)s"


def quiet_logs(verbose: bool) -> None:
    """The console logging of a command (main.py, data_pipeline.build). By default our own
    warnings and errors, one plain line each, and the libraries' errors only; ``verbose``: every
    logger's INFO lines too, in the handler's own format (absl's under ``app.run``)."""
    root = logging.getLogger()
    if not root.handlers:  # not under absl's app.run (data_pipeline.build)
        logging.basicConfig()
    if verbose:
        root.setLevel(logging.INFO)
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)  # root's INFO
        return
    # Read when TensorFlow's C++ logging starts: quiets its start-up lines in the build's
    # decode workers and wherever TensorFlow loads after this.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(QUIET_FORMAT))
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_logging(level: int = logging.INFO) -> None:
    """Process 0 logs at ``level``; the others log warnings and errors only, each line prefixed
    with ``[process i]``. Loggers given a level of their own keep it (:func:`quiet_logs` quiets
    the libraries' on every process)."""
    idx = jax.process_index()
    root = logging.getLogger()
    if idx == 0:
        root.setLevel(level)
        return
    absl_log = logging.getLogger("absl")
    absl_log.setLevel(max(absl_log.getEffectiveLevel(), logging.WARNING))
    root.setLevel(max(level, logging.WARNING))
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[process {idx}] %(levelname)s %(message)s"))
