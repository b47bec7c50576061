"""TS2-Net token shift (SPEC §3), as applied to the LayerNormed input of CLIP visual attention.

With ``fold = N // n_div``: tokens ``range(1, N, fold)`` of frame t take the vectors of frame
t-1 (t >= 1), tokens ``range(4, N, fold)`` of frame t take those of frame t+1 (t <= F-2);
whole channel vectors move, frames at the ends keep their own tokens on the missing side.
Both shifts read the unshifted input; the right shift is written last, so where the two sets
overlap (fold | 3, e.g. N = 8 or 10) it wins for frames 0..F-2 while the last frame keeps the
left-shifted value, exactly as the original ``PatchShiftModule``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def shift_index_sets(num_tokens: int, n_div: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) token indices: left <- frame t-1, right <- frame t+1."""
    fold = num_tokens // n_div
    if fold < 1:
        raise ValueError(f"token_shift.py: {num_tokens} tokens per frame < n_div={n_div}")
    return np.arange(1, num_tokens, fold), np.arange(4, num_tokens, fold)


def token_shift(x: jax.Array, num_frames: int, n_div: int = 7) -> jax.Array:
    """x: 'bf n c' (frames folded into the batch, frame-major per video) -> same shape."""
    bf, n, c = x.shape
    if bf % num_frames:
        raise ValueError(
            f"token_shift.py: batch*frames={bf} is not a multiple of num_frames={num_frames}"
        )
    left, right = shift_index_sets(n, n_div)
    # Per-token source-frame offset (-1, 0, +1) in the middle frames; the end frames fall
    # back to offset 0 on the side that has no neighbour.
    x = x.reshape(bf // num_frames, num_frames, n, c)  # 'b f n c'
    prev = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)  # frame t-1 (frame 0: itself)
    nxt = jnp.concatenate([x[:, 1:], x[:, -1:]], axis=1)  # frame t+1 (last: itself)
    is_left = np.zeros(n, bool)
    is_left[left] = True
    is_right = np.zeros(n, bool)
    is_right[right] = True
    # Where the sets overlap, the last frame has no right neighbour, so keeps the left value.
    f = np.arange(num_frames)[:, None]
    use_right = is_right[None, :] & (f < num_frames - 1)  # 'f n'
    use_left = is_left[None, :] & ~use_right  # 'f n'
    out = jnp.where(use_right[None, :, :, None], nxt, x)
    out = jnp.where(use_left[None, :, :, None], prev, out)
    return out.reshape(bf, n, c)
