"""Training logs: TensorBoard scalars (``tf.summary``) and a plain-text ``log.txt``, on
process 0 only."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict

import tensorflow as tf

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
    """TensorBoard scalars (``WORKDIR/tensorboard``) + a plain-text log (``WORKDIR/log.txt``),
    on process 0 only (``enabled=False`` elsewhere writes nothing)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._text = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._text = open(os.path.join(workdir, "log.txt"), "a", encoding="utf-8")
        try:
            # The summary writer starts TensorFlow's runtime: without the GPUs, so that it
            # takes none of the memory JAX needs (a no-op once the input pipeline hid them).
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                pass  # TensorFlow is already running; its devices are settled
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))
        except Exception as e:  # pylint: disable=broad-except
            log.warning("TensorBoard event file disabled: %s", e)
            self._tb = None

    def text(self, line: str) -> None:
        if self._text:
            self._text.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")
            self._text.flush()

    def scalars(self, step: int, values: Dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        self.text(
            f"step {step} "
            + json.dumps({prefix + k: round(float(v), 6) for k, v in values.items()})
        )
        if self._tb is not None:
            with self._tb.as_default():
                for k, v in values.items():
                    tf.summary.scalar(prefix + k, float(v), step=int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._text:
            self._text.close()
            self._text = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
