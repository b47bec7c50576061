"""Blockwise N x M evaluation of per-pair similarities (SPEC §6: every softmax lives inside
one (text, video) pair, so computing the matrix in blocks is exact).

``blockwise_similarity(pair_fn, text, video, shared)`` pads the N texts and M videos to whole
blocks, reshapes them to 'nT tb ...' / 'nV vb ...' and runs one jitted kernel: ``lax.map`` over
text blocks of ``lax.map`` over video blocks of ``pair_fn``. Peak memory is set by the block
size (the per-pair tensors of one tb x vb block plus the N x M outputs), not by N x M. With a
``mesh``, the text blocks are split over the mesh axis with ``shard_map``; videos and
``shared`` are replicated.

``map_in_blocks(fn, tree, block)`` is the same idea for per-item work (e.g. the token selection
of 1k videos, whose [b f, 500, n] noise would not fit at once).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

PyTree = Any


def _leading(tree, what):
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(
            f"all {what} leaves need the same leading (item) size, got {sorted(sizes)}"
        )
    return sizes.pop()


def _pad_blocks(tree, n, block, n_blocks):
    # 'n ...' -> 'nb block ...'; padding repeats the last item (finite, cropped afterwards).
    pad = n_blocks * block - n

    def f(x):
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
        return x.reshape((n_blocks, block) + x.shape[1:])

    return jax.tree_util.tree_map(f, tree)


def _map_pairs(pair_fn, tblocks, vblocks, shared):
    # tblocks 'nT tb ...', vblocks 'nV vb ...' -> outputs 'nT nV tb vb'
    def per_text(tb):
        return jax.lax.map(lambda vb: pair_fn(tb, vb, shared), vblocks)

    return jax.lax.map(per_text, tblocks)


@partial(
    jax.jit,
    static_argnames=(
        "pair_fn",
        "n",
        "m",
        "text_block",
        "video_block",
        "mesh",
        "axis",
        "video_block_fn",
    ),
)
def _blockwise(
    text, video, shared, *, pair_fn, n, m, text_block, video_block, mesh, axis, video_block_fn
):
    n_dev = 1 if mesh is None else mesh.shape[axis]
    n_tb = -(-n // text_block)
    n_tb = -(-n_tb // n_dev) * n_dev  # whole text blocks per device
    n_vb = -(-m // video_block)
    tblocks = _pad_blocks(text, n, text_block, n_tb)
    vblocks = _pad_blocks(video, m, video_block, n_vb)
    if video_block_fn is not None:  # once per video block, not per pair
        vblocks = jax.lax.map(video_block_fn, vblocks)
    if mesh is None:
        out = _map_pairs(pair_fn, tblocks, vblocks, shared)
    else:
        rep = lambda tree: jax.tree_util.tree_map(lambda _: P(), tree)
        out = jax.shard_map(
            partial(_map_pairs, pair_fn),
            mesh=mesh,
            in_specs=(
                jax.tree_util.tree_map(lambda _: P(axis), tblocks),
                rep(vblocks),
                rep(shared),
            ),
            out_specs=P(axis),
            check_vma=False,
        )(tblocks, vblocks, shared)

    def unblock(x):  # 'nT nV tb vb' -> 'n m'
        x = jnp.transpose(x, (0, 2, 1, 3)).reshape(n_tb * text_block, n_vb * video_block)
        return x[:n, :m]

    return jax.tree_util.tree_map(unblock, out)


def blockwise_similarity(
    pair_fn: Callable[[PyTree, PyTree, PyTree], Any],
    text: PyTree,
    video: PyTree,
    shared: PyTree = None,
    *,
    text_block: int,
    video_block: int,
    mesh: Optional[Mesh] = None,
    axis: str = "data",
    video_block_fn: Optional[Callable[[PyTree], PyTree]] = None,
):
    """N x M similarities (one array, or a tuple/pytree of them, e.g. the three levels).

    pair_fn(text_block_tree, video_block_tree, shared) -> pytree of [tb, vb] arrays; it must
    be hashable and stable (a module-level function, not a fresh lambda per call) since it is
    a static argument of the jitted kernel. ``text``: pytree of [N, ...] arrays (per-text
    features), ``video``: pytree of [M, ...] arrays, ``shared``: arrays every block needs.
    ``video_block_fn`` (same rules), if given, maps each [vb, ...] video block once before the
    pairs are formed (e.g. to lay out a block-level GEMM operand); pair_fn then receives its
    output instead of the raw block.
    """
    if text_block < 1 or video_block < 1:
        raise ValueError(f"block sizes must be >= 1, got {text_block} x {video_block}")
    if mesh is not None and axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, no {axis!r}")
    n = _leading(text, "text")
    m = _leading(video, "video")
    return _blockwise(
        text,
        video,
        shared,
        pair_fn=pair_fn,
        n=n,
        m=m,
        text_block=min(text_block, n),
        video_block=min(video_block, m),
        mesh=mesh,
        axis=axis,
        video_block_fn=video_block_fn,
    )


def map_in_blocks(fn: Callable[[PyTree], PyTree], tree: PyTree, block: int) -> PyTree:
    """``fn`` applied to 'block'-sized slices of the leading axis with ``lax.map`` (traceable).

    fn(tree of [block, ...]) -> tree of [block, ...]; the result is cropped back to N items.
    """
    n = _leading(tree, "input")
    block = min(block, n)
    nb = -(-n // block)
    blocks = _pad_blocks(tree, n, block, nb)
    out = jax.lax.map(fn, blocks)
    return jax.tree_util.tree_map(lambda x: x.reshape((nb * block,) + x.shape[2:])[:n], out)
