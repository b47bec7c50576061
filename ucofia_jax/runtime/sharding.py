"""Device mesh and shardings, declared by logical axis rules (MaxText style).

Mesh axes: ``('data', 'fsdp', 'model')`` from ``config.mesh`` (-1 = all remaining devices).
The global batch is always split over ``data`` x ``fsdp`` (``BATCH_AXES``: that is what the
two axes mean; FSDP shards the batch as well as the params). Every parameter declares
logical axis names where it is created (``Model.logical_axes`` reads them), and
``config.mesh.logical_axis_rules`` -- the one place, passed to the functions here as
``rules`` -- maps them to mesh axes: by default the residual width ``embed`` over ``fsdp``
(ZeRO-3 style: each device keeps 1/fsdp of every large weight and XLA all-gathers it where
it is used), the hidden dims of attention/MLP, the vocabulary and the joint embedding over
``model`` (tensor parallel). A dim stays whole when its mesh axis has size 1, does not
divide it, or is already used by another dim of the same array. The optimizer state
follows the params.

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

# The rows of every input: split over these mesh axes (batch_size_multiple).
BATCH_AXES = ("data", "fsdp")


def rules_table(rules: Sequence[Sequence[Any]]) -> dict:
    """``config.mesh.logical_axis_rules`` -- (logical name, a mesh axis, a tuple of mesh axes,
    or None: never split) pairs -- as {name: tuple of mesh axes}. ValueError naming the
    config key for a malformed pair, a name given twice or an unknown mesh axis."""
    key = "config.mesh.logical_axis_rules"
    table: dict = {}
    for pair in rules:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"{key}: {pair!r} is not a (logical name, mesh axes) pair")
        name, target = pair
        axes = () if target is None else (target,) if isinstance(target, str) else target
        if not isinstance(axes, (tuple, list)) or any(a not in MESH_AXES for a in axes):
            raise ValueError(
                f"{key}: {name!r} -> {target!r}; mesh axes are {MESH_AXES} (or None: never split)"
            )
        if name in table:
            raise ValueError(f"{key}: {name!r} has two rules")
        table[name] = tuple(axes)
    return table


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


def param_spec(logical: tuple, shape: tuple, mesh: Mesh, table: dict) -> P:
    """Mesh PartitionSpec of a parameter of ``shape`` with logical names ``logical``: the
    mesh axes ``table`` (:func:`rules_table` of ``config.mesh.logical_axis_rules``) gives its
    name, where they have size > 1, divide the dim and are not used by an earlier dim; else
    the dim stays whole."""
    if len(logical) != len(shape):
        raise ValueError(f"sharding.py: logical axes {logical} for shape {shape}")
    unknown = [a for a in logical if a is not None and a not in table]
    if unknown:
        raise ValueError(
            f"config.mesh.logical_axis_rules: no rule for the logical axes {unknown} "
            "(a parameter declares them)"
        )
    used: set = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = () if name is None else table[name]
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def batch_spec(ndim: int, axis: int = 0) -> P:
    """Dim ``axis`` of an ``ndim`` array over the batch axes (data x fsdp), the rest whole."""
    return P(*[BATCH_AXES if i == axis else None for i in range(ndim)])


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated: the one batch sharding
    (`distributed.process_rows` / `global_batch_from_local` take it as an argument)."""
    return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (devices along the batch axes)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def param_shardings(params: Any, logical: Any, mesh: Mesh, rules: Sequence) -> Any:
    """NamedSharding per leaf of ``params`` (arrays or ShapeDtypeStructs) from ``logical``
    (the same tree, a PartitionSpec of logical names per leaf: ``Model.logical_axes``) and
    ``rules`` (``config.mesh.logical_axis_rules``)."""
    table = rules_table(rules)
    return jax.tree.map(
        lambda x, names: NamedSharding(
            mesh, param_spec(tuple(names), tuple(np.shape(x)), mesh, table)
        ),
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
