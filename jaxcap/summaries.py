"""Training metrics to the log and to a TensorBoard event file, without TensorFlow.

clu's default writer writes TensorBoard summaries through TensorFlow: importing
it took 4 of the 5.5 s that `import jaxcap.train` took on the development VM,
in every `launch.py` and in every process of a multi-host run, and a GPU or TPU
machine without TensorFlow could not train at all. TensorFlow is otherwise needed
only to build TFDS data sets. The events here are the same protocol buffers in
the same record format, written with the `tensorboard` package's TensorFlow-free
pieces (TensorBoard reads them as it reads TensorFlow's).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections.abc import Mapping

import numpy as np
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

Scalar = int | float | np.number
# Two writers in one process within a second get different files, as TensorFlow's do.
_FILE_NUMBERS = itertools.count()


class SummaryWriter:
    """Scalars, texts and hyperparameters: to `logging`, and to an event file in `logdir` if given.

    The file is named as TensorFlow names its own (`events.out.tfevents.<time>.
    <host>.<pid>.<n>`), and every write is flushed: a run that dies keeps every
    point it logged.
    """

    def __init__(self, logdir: str | os.PathLike | None = None):
        self.path, self._records = None, None  # the event file's path, when there is one
        if logdir is not None:
            directory = epath.Path(logdir)
            directory.mkdir(parents=True, exist_ok=True)
            name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}'
                    f'.{next(_FILE_NUMBERS)}')
            self.path = directory / name
            self._records = record_writer.RecordWriter(self.path.open('wb'))
            self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        logging.info('[%d] %s', step, ', '.join(f'{k}={v}' for k, v in scalars.items()))
        self._write_summary(step, [summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                   for tag, value in scalars.items()])

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        logging.info('[%d] %s', step, ', '.join(f'{k}={v!r}' for k, v in texts.items()))
        metadata = text_metadata.create_summary_metadata(display_name=None, description=None)
        self._write_summary(step, [summary_pb2.Summary.Value(
            tag=tag, metadata=metadata, tensor=tensor_util.make_tensor_proto(np.array(value, dtype=object)))
            for tag, value in texts.items()])

    def write_hparams(self, hparams: Mapping[str, bool | int | float | str]) -> None:
        """TensorBoard's HPARAMS tab: the run's configuration (values: bool, number or string)."""
        logging.info('Hyperparameters: %s', dict(hparams))
        if self._records is not None:
            self._write(event_pb2.Event(wall_time=time.time(), step=0,
                                        summary=hparams_summary.hparams_pb(dict(hparams))))

    def close(self) -> None:
        if self._records is not None and not self._records.closed:
            self._records.close()

    def _write_summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        if self._records is not None:
            self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                        summary=summary_pb2.Summary(value=values)))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()


def create_writer(workdir: str | os.PathLike, just_logging: bool = False) -> SummaryWriter:
    """The writer of a training run: events in `workdir`, or (`just_logging`, other hosts) the log alone."""
    return SummaryWriter(None if just_logging else workdir)
