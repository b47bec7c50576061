"""Training logs: TensorBoard scalars and a plain-text ``log.txt``, on process 0 only."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Dict

import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2

log = logging.getLogger(__name__)


class MetricWriter:
    """TensorBoard scalars + a plain-text log (``log.txt``), on process 0 only.

    Event files are TFRecords of ``Event`` protos, written with tf.io directly: that needs no
    ``tensorboard`` package (tf.summary does) and TensorBoard reads them as usual.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._text = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._text = open(os.path.join(workdir, "log.txt"), "a", encoding="utf-8")
        try:
            tb_dir = os.path.join(workdir, "tensorboard")
            os.makedirs(tb_dir, exist_ok=True)
            path = os.path.join(
                tb_dir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
            )
            self._tb = tf.io.TFRecordWriter(path)
            self._tb.write(
                event_pb2.Event(
                    wall_time=time.time(), file_version="brain.Event:2"
                ).SerializeToString()
            )
            self._tb.flush()
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
            summ = summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=prefix + k, simple_value=float(v))
                    for k, v in values.items()
                ]
            )
            self._tb.write(
                event_pb2.Event(
                    wall_time=time.time(), step=int(step), summary=summ
                ).SerializeToString()
            )
            self._tb.flush()

    def close(self) -> None:
        if self._text:
            self._text.close()
            self._text = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
