"""Device mesh and shardings, declared by logical axis rules (MaxText style).

Mesh axes: ``('data', 'fsdp', 'model')`` from ``config.mesh`` (-1 = all remaining devices).
The global batch is split over ``data`` x ``fsdp`` (FSDP shards the batch as well as the
params); parameters are replicated unless ``fsdp`` or ``model`` is > 1, in which case the
rules below place their largest divisible dimension on those axes. The contrastive loss
needs no explicit collective: with the batch sharded, the [B, B] similarity over the *global*
batch is one jnp expression and XLA inserts the all-gathers (exact global negatives).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ucofia_jax.runtime import distributed

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axes. 'batch' rows of every input; 'param_rows' / 'param_cols' the two
# dims of a weight matrix; 'replicated' everything small (biases, LN, scalars).
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("param_rows", "fsdp"),
    ("param_cols", "model"),
    ("replicated", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)
# Params smaller than this stay replicated whatever the mesh: sharding them costs more in
# collectives than it saves in memory.
MIN_SHARDED_PARAM_SIZE = 2**14


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over ``devices`` (default: all processes' devices) shaped by ``config.mesh``."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.model)]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"config.mesh: {len(devices)} devices not divisible by the fixed axes "
                f"({dict(zip(MESH_AXES, sizes))})"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    total = int(np.prod(sizes))
    if total > len(devices):
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices, "
            f"only {len(devices)} available"
        )
    grid = np.asarray(devices[:total], dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical: Sequence[str | None]) -> P:
    return P(*[_RULES.get(a) if a is not None else None for a in logical])


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated: the one batch sharding
    (`distributed.local_batch_slice` / `global_batch_from_local` take it as an argument)."""
    return NamedSharding(mesh, logical_to_spec(["batch"] + [None] * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (devices along the batch axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _param_spec(shape: tuple, mesh: Mesh) -> P:
    fsdp, model = mesh.shape["fsdp"], mesh.shape["model"]
    if len(shape) < 2 or int(np.prod(shape)) < MIN_SHARDED_PARAM_SIZE or fsdp * model == 1:
        return logical_to_spec(["replicated"] * len(shape))
    logical: list = [None] * len(shape)
    # Columns (output features) on 'model', rows (input features) on 'fsdp', when divisible.
    if model > 1 and shape[-1] % model == 0:
        logical[-1] = "param_cols"
    if fsdp > 1 and shape[-2] % fsdp == 0:
        logical[-2] = "param_rows"
    return logical_to_spec(logical)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedSharding per leaf (works on arrays or ShapeDtypeStructs); optimizer states too."""
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _param_spec(tuple(np.shape(x)), mesh)), params
    )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch (this process's rows) -> global arrays sharded on the batch axes."""
    return {
        k: distributed.global_batch_from_local(v, sharding=batch_sharding(mesh, np.ndim(v)))
        for k, v in batch.items()
    }
