"""In-memory training data and a loss check for the loop tests (the program reads TFDS)."""

import dataclasses
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ucofia_jax.errors import NonFiniteLossError
from ucofia_jax.training import loop


@dataclasses.dataclass
class ArrayData:
    """``loop.TrainData`` from arrays: a deterministic shuffle per (seed, epoch)."""

    arrays: Dict[str, np.ndarray]
    batch_size: int
    seed: int = 0
    video_ids: Optional[Sequence[str]] = None  # row i of 'video_index' is video_ids[i]

    @property
    def steps_per_epoch(self) -> int:
        return len(next(iter(self.arrays.values()))) // self.batch_size

    def epoch(self, epoch: int, start_step: int = 0):
        n = len(next(iter(self.arrays.values())))
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        for s in range(start_step, self.steps_per_epoch):
            idx = order[s * self.batch_size : (s + 1) * self.batch_size]
            yield {k: v[idx] for k, v in self.arrays.items()}


def check_finite_loss(loss: float, step: int, batch: Dict[str, Any], video_ids=None) -> None:
    """Raise ``NonFiniteLossError`` when ``loss`` (of the update from state ``step``) is
    not finite, with the loop's message."""
    if not loop.step_is_finite({"loss": loss}):
        ids = loop.batch_video_ids(batch, video_ids)
        raise NonFiniteLossError(loop.nonfinite_message(step + 1, loss, ids, None))
