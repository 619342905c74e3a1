"""TensorBoard event files without TensorFlow (tensorboardX), process 0 only.

:class:`TensorBoardWriter` takes the same records as
:class:`~meshnet.metrics.MetricsWriter` (``{"step": 10, "loss": ...}``) and
writes each number as a scalar at its step. Tags:

=========================  ===============================================
record field               tag
=========================  ===============================================
``loss``                   ``train/loss`` (the last step's loss)
``lr``                     ``train/lr``
``grad_norm``              ``train/grad_norm``
``samples_per_sec``        ``train/samples_per_sec``
``epoch``                  ``train/epoch``
``eval_loss``              ``eval/loss``
``eval_accuracy``          ``eval/accuracy``
any other ``eval_NAME``    ``eval/NAME``; any other number ``train/NAME``
=========================  ===============================================

``step`` is the x axis and ``time`` the wall time, not scalars. Text
summaries ``run/mesh`` and ``run/config`` (JSON) and, for a pipelined run,
``pipeline/schedule`` (the text grid) and the image ``pipeline/timeline``
describe the run (:meth:`TensorBoardWriter.describe_run`), at the run's
first step less one. TensorBoard's Text tab lists them with tensorboardX's
suffix: ``run/mesh/text_summary``.

Events reach the disk within ``flush_secs`` (default 2 s), so
``tensorboard --logdir DIR`` shows a run live. A resumed run writes a new
event file into the same directory and its curves continue the earlier
ones: the writer drops the events of steps after the checkpoint it resumed
from out of the earlier files (the stopped run wrote them before it was
stopped, and they are run again), and marks the restart in the new file
(TensorBoard's ``purge_step``), so every step appears once. A run started
afresh (``replace=True``) deletes the event files of earlier runs in the
directory instead, as ``--metrics-file`` starts its file afresh.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from typing import Any, Mapping

import numpy as np

from meshnet.errors import MeshnetError
from meshnet.metrics import is_main_process, nearest_existing

_NOT_SCALARS = ("step", "time")


def tag(field: str) -> str:
  """The TensorBoard tag of a metrics-record field: ``eval_loss`` ->
  ``eval/loss``, ``loss`` -> ``train/loss``."""
  if field.startswith("eval_"):
    return "eval/" + field[len("eval_"):]
  return "train/" + field


def check_logdir(path: str | None, flag: str = "--tensorboard") -> None:
  """Refuses a TensorBoard directory that cannot be written, before any work.

  Nothing is created (the writer makes the directory and its parents), so
  every process of a run may check.

  Raises:
    MeshnetError: ``path`` is a file, lies under a file, or is not writable.
  """
  if not path:
    return
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(full) and not os.path.isdir(full):
    raise MeshnetError(f"TensorBoard directory {path} is a file; give a directory "
                       f"({flag} DIR), e.g. {os.path.join(os.path.dirname(path), 'runs')}")
  existing = full if os.path.exists(full) else nearest_existing(full)
  if not os.path.isdir(existing):
    raise MeshnetError(f"TensorBoard directory {path} cannot be created: {existing} is a "
                       f"file, not a directory; choose another {flag} DIR")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise MeshnetError(f"TensorBoard directory {path} is not writable ({existing}); "
                       f"choose another {flag} DIR")
  try:  # what access() cannot tell (a read-only mount, /proc); leaves nothing behind
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise MeshnetError(f"TensorBoard directory {path} cannot be written "
                       f"({e.strerror or type(e).__name__}); choose another {flag} DIR"
                       ) from None


class TensorBoardWriter:
  """Writes metrics records as TensorBoard scalars into ``logdir`` (process 0).

  Example::

    with TensorBoardWriter("runs/digits") as board:
      board.write({"step": 10, "loss": 0.31, "lr": 1e-3})
      board.write({"step": 10, "eval_loss": 0.35, "eval_accuracy": 0.91})

  Args:
    logdir: the run's directory (created with its parents); ``None``
      writes nothing.
    resumed_from: the run resumed from this checkpoint step: events of
      later steps are dropped from the event files already in ``logdir``
      and the restart is marked for TensorBoard (``purge_step``), so the
      curves continue with every step once.
    replace: a run started afresh: delete the event files earlier runs left
      directly in ``logdir`` (as ``--metrics-file`` starts its file afresh),
      so their curves do not zigzag with this run's over the same steps.
      Ignored with ``resumed_from``. Default False: a second writer into
      the same directory keeps the first one's events.
    flush_secs: at most this many seconds between a value and the disk.

  Raises:
    MeshnetError: ``logdir`` cannot be written (:func:`check_logdir`).
  """

  def __init__(self, logdir: str | None, *, resumed_from: int | None = None,
               replace: bool = False, flush_secs: float = 2.0):
    self.logdir = os.path.expanduser(logdir) if logdir else logdir
    self._writer = None
    if not logdir or not is_main_process():
      return
    check_logdir(logdir)
    logdir = self.logdir
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover - a dependency of meshnet
      raise MeshnetError("TensorBoard output needs tensorboardX: pip install tensorboardX"
                         ) from None
    purge_step = None if resumed_from is None else resumed_from + 1
    # Files are named by the second they are opened in; the suffix orders
    # (and keeps apart) two opened in the same second, as TensorBoard reads
    # them in name order.
    suffix = f".{time.time_ns() % 10**9:09d}.{os.getpid()}"
    try:
      os.makedirs(logdir, exist_ok=True)
      earlier = [os.path.join(logdir, name) for name in sorted(os.listdir(logdir))
                 if "tfevents" in name and os.path.isfile(os.path.join(logdir, name))]
      for path in earlier:
        if resumed_from is not None:
          _keep_until(path, resumed_from)
        elif replace:
          os.remove(path)
      self._writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=flush_secs,
                                   filename_suffix=suffix)
    except OSError as e:
      raise MeshnetError(f"cannot write TensorBoard events to {logdir} "
                         f"({e.strerror or type(e).__name__}); choose another "
                         "--tensorboard DIR") from None

  def write(self, record: Mapping[str, Any]) -> None:
    """Writes every number of ``record`` except ``step``/``time`` as a scalar
    at ``record["step"]`` (tags: :func:`tag`); strings are skipped."""
    if self._writer is None:
      return
    step = int(record["step"])
    walltime = record.get("time")
    for field, value in record.items():
      if field in _NOT_SCALARS or isinstance(value, (str, bool)) or value is None:
        continue
      self._writer.add_scalar(tag(field), float(value), step, walltime=walltime)

  def text(self, name: str, text: str, step: int = 0) -> None:
    """A text summary; shown verbatim (as a code block) in TensorBoard."""
    if self._writer is None:
      return
    block = "\n".join("    " + line for line in text.splitlines())
    self._writer.add_text(name, block, step)

  def image(self, name: str, pixels: np.ndarray, step: int = 0) -> None:
    """An image summary of ``pixels``: ``uint8 [H, W, 3]`` (or ``[H, W, 4]``)."""
    if self._writer is None:
      return
    self._writer.add_image(name, np.asarray(pixels), step, dataformats="HWC")

  def describe_run(self, *, mesh=None, config=None, pipeline=None, step: int = 0) -> None:
    """Text and image summaries that say what the run is, at ``step``.

    Args:
      mesh: the run's ``jax.sharding.Mesh`` -> ``run/mesh``
        (:func:`~meshnet.mesh.describe_mesh`).
      config: a :class:`~meshnet.config.Config` (or a dict) -> ``run/config``
        as JSON.
      pipeline: the run's pipeline (anything with a ``schedule``) ->
        ``pipeline/schedule`` (the text grid) and ``pipeline/timeline`` (the
        picture of :func:`~meshnet.pipeline.timeline.save_png`).
      step: the step they are shown at (the first step of this run less one).
    """
    if self._writer is None:
      return
    if mesh is not None:
      from meshnet.mesh import describe_mesh
      self.text("run/mesh", describe_mesh(mesh), step)
    if config is not None:
      fields = config if isinstance(config, Mapping) else config.to_dict()
      self.text("run/config", json.dumps(fields, indent=2, default=str), step)
    if pipeline is not None:
      from meshnet.pipeline.timeline import image, text
      self.text("pipeline/schedule", text(pipeline.schedule), step)
      self.image("pipeline/timeline", image(pipeline.schedule), step)
    self.flush()

  def flush(self) -> None:
    """Writes what is queued to disk now."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "TensorBoardWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _records(data: bytes):
  """``(start, end, payload)`` of each whole TFRecord in ``data`` (length
  u64, its CRC u32, payload, its CRC u32); a torn last record is left out."""
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    end = offset + 12 + length + 4
    if end > len(data):
      return
    yield offset, end, data[offset + 12:offset + 12 + length]
    offset = end


def _keep_until(path: str, step: int) -> None:
  """Drops the events of steps after ``step`` from the event file ``path``
  (and a torn last record), rewriting it atomically when anything goes."""
  from tensorboardX.proto.event_pb2 import Event

  with open(path, "rb") as f:
    data = f.read()
  kept, dropped = [], False
  for start, end, payload in _records(data):
    try:
      later = Event.FromString(payload).step > step
    except Exception:  # noqa: BLE001 - not an event: leave it as it is
      later = False
    if later:
      dropped = True
    else:
      kept.append(data[start:end])
  if not dropped and sum(map(len, kept)) == len(data):
    return
  # Not named like an event file: TensorBoard must not read it half-written.
  tmp = os.path.join(os.path.dirname(path), f".meshnet-rewrite.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    f.write(b"".join(kept))
  os.replace(tmp, path)
