"""Device mesh and shardings, declared by logical axis rules (MaxText style).

Mesh axes: ``('data', 'fsdp', 'model')`` from ``config.mesh`` (-1 = all remaining devices).
The global batch is split over ``data`` x ``fsdp`` (FSDP shards the batch as well as the
params). Every parameter carries logical axis names (``Model.logical_axes``: tables beside
the modules that own the weights), and :data:`LOGICAL_AXIS_RULES` -- the one place -- maps
them to mesh axes: the residual width ``embed`` over ``fsdp`` (ZeRO-3 style: each device
keeps 1/fsdp of every large weight and XLA all-gathers it where it is used), the hidden
dims of attention/MLP, the vocabulary and the joint embedding over ``model`` (tensor
parallel). A dim stays whole when its mesh axis has size 1, does not divide it, or is
already used by another dim of the same array. The optimizer state follows the params.

The contrastive loss needs no explicit collective: with the batch sharded, the [B, B]
similarity over the *global* batch is one jnp expression and XLA inserts the all-gathers
(exact global negatives).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ucofia_jax.runtime import distributed

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axes (None: never split). 'batch' the rows of every input; the others
# name parameter dims (models/layers.py BLOCK_PARAM_AXES, clip.CLIP_PARAM_AXES,
# head.HEAD_PARAM_AXES): 'embed' a residual / embedding width, 'mlp' the MLP hidden, 'qkv' the
# packed q|k|v, 'heads' the concatenated head outputs, 'vocab' the token table, 'joint' the
# joint embedding, 'norm' LayerNorm vectors and other small vectors.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("qkv", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("joint", "model"),
    ("norm", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


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
    """Logical names -> mesh PartitionSpec by the rules (no size checks: for the batch)."""
    unknown = [a for a in logical if a is not None and a not in _RULES]
    if unknown:
        raise KeyError(f"sharding.py: logical axes {unknown} have no rule in LOGICAL_AXIS_RULES")
    return P(*[_RULES[a] if a is not None else None for a in logical])


def param_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """Mesh PartitionSpec of a parameter of ``shape`` with logical names ``logical``: the
    rule's mesh axis where it has size > 1, divides the dim and is not used by an earlier
    dim; else the dim stays whole."""
    if len(logical) != len(shape):
        raise ValueError(f"sharding.py: logical axes {tuple(logical)} for shape {tuple(shape)}")
    used: set = set()
    out = []
    for name, dim in zip(logical_to_spec(logical), shape):
        axes = () if name is None else (name,) if isinstance(name, str) else tuple(name)
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated: the one batch sharding
    (`distributed.local_batch_slice` / `global_batch_from_local` take it as an argument)."""
    return NamedSharding(mesh, logical_to_spec(["batch"] + [None] * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (devices along the batch axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def param_shardings(params: Any, logical: Any, mesh: Mesh) -> Any:
    """NamedSharding per leaf of ``params`` (arrays or ShapeDtypeStructs) from ``logical``
    (the same tree, a PartitionSpec of logical names per leaf: ``Model.logical_axes``)."""
    return jax.tree.map(
        lambda x, names: NamedSharding(mesh, param_spec(tuple(names), np.shape(x), mesh)),
        params,
        logical,
    )


def _dict_keys(path) -> tuple:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(state: Any, params: Any, param_sh: Any, mesh: Mesh) -> Any:
    """Shardings of a tree holding copies of the params (optimizer moments): a leaf whose
    dict-key path ends with a parameter's path and has its shape gets that parameter's
    sharding (optax nests the moments under labels and field names); anything else (step
    counts, scalars) is replicated."""
    table = {}
    for (path, p), sh in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh)
    ):
        table[_dict_keys(path)] = (np.shape(p), sh)

    def pick(path, x):
        keys = _dict_keys(path)
        for i in range(len(keys)):
            hit = table.get(keys[i:])
            if hit is not None and hit[0] == np.shape(x):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, state)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch (this process's rows) -> global arrays sharded on the batch axes."""
    return {
        k: distributed.global_batch_from_local(v, sharding=batch_sharding(mesh, np.ndim(v)))
        for k, v in batch.items()
    }
