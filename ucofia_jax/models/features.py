"""The typed features that cross the model's door (``Model.encode_text`` / ``encode_video``).

Both are pytrees (``flax.struct.dataclass``): they go through ``jax.jit``, ``jax.tree.map``
(slicing, concatenating, moving to the host) and blockwise scoring as they are, and every
consumer reads fields by name, never by string key.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax


@flax.struct.dataclass
class TextFeatures:
    """Per text, once: what the head needs from one caption (L2-normalised)."""

    sentence: jax.Array  # 't d'   the EOT token's feature
    words: jax.Array  # 't w d' every word position (padding included, as the original)
    mask: Optional[jax.Array] = None  # 't w' 1 = a real token (SOT..EOT); for mask_padding

    @property
    def count(self) -> int:
        return self.sentence.shape[0]


@flax.struct.dataclass
class VideoFeatures:
    """Per video, once: CLIP + token selection + temporal encoder (SPEC §4-6)."""

    video: jax.Array  # 'v d'   mean of the temporal encoder's frames, L2-normalised
    frames: jax.Array  # 'v f d' raw frame CLS features, L2-normalised (level 2)
    pixels: jax.Array  # 'v (f k) d' per frame: CLS + the k selected patch tokens
    mask: jax.Array  # 'v f'   1 = a real frame

    @property
    def count(self) -> int:
        return self.video.shape[0]
