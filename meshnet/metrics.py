"""Progress bar and JSON-lines metrics, written by process 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO

import jax

from meshnet.errors import MeshnetError


def is_main_process() -> bool:
  """True on the process that logs (``jax.process_index() == 0``)."""
  return jax.process_index() == 0


def _clock(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """A one-line progress bar: step, loss, samples/s and ETA.

  On a terminal the line is redrawn in place; otherwise (files, CI, notebooks
  capturing output) each update is a new line. Only process 0 draws.

  Args:
    total: steps in the run.
    stream: where to draw (default stderr).
    enabled: draw at all.
  """

  def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True,
               width: int = 24):
    self.total = total
    self.stream = stream or sys.stderr
    self.main = is_main_process()
    self.enabled = enabled and self.main
    self.width = width
    self._inline = self.stream.isatty()
    self._drawn = False

  def update(self, step: int, *, loss: float, samples_per_sec: float,
             seconds_per_step: float) -> None:
    if not self.enabled:
      return
    done = int(self.width * step / max(self.total, 1))
    bar = "#" * done + "-" * (self.width - done)
    eta = (self.total - step) * seconds_per_step
    line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] "
            f"loss {loss:.4f}  {samples_per_sec:,.0f} samples/s  ETA {_clock(eta)}")
    if self._inline:
      self.stream.write("\r" + line + "\x1b[K")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()
    self._drawn = True

  def message(self, text: str) -> None:
    """Prints ``text`` on its own line without breaking the bar (process 0
    only; printed even when the bar is turned off)."""
    if not self.main:
      return
    if self._inline and self._drawn:
      self.stream.write("\n")
    self.stream.write(text + "\n")
    self.stream.flush()
    self._drawn = False

  def close(self) -> None:
    if self.enabled and self._inline and self._drawn:
      self.stream.write("\n")
      self.stream.flush()
    self._drawn = False


def check_metrics_file(path: str | None) -> None:
  """Refuses a metrics path that cannot be written, before any training work.

  Raises:
    MeshnetError: ``path`` is a directory, or a path under a regular file.
  """
  if not path:
    return
  full = os.path.abspath(path)
  if os.path.isdir(full):
    raise MeshnetError(f"metrics file {path} is a directory; give a file path, e.g. "
                       f"{os.path.join(path, 'metrics.jsonl')}")
  parent = os.path.dirname(full)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise MeshnetError(f"metrics file {path} cannot be created: {parent} is a file, not a "
                       "directory; choose another --metrics-file")
  if not os.access(full if os.path.exists(full) else parent, os.W_OK):
    raise MeshnetError(f"metrics file {path} is not writable; choose another --metrics-file")
  if not os.path.isdir(os.path.dirname(full)):
    return  # the writer creates the missing directories
  existed = os.path.exists(full)
  try:  # what access() cannot tell: a name too long, /proc
    with open(full, "a") as f:
      f.flush()
  except OSError as e:
    raise MeshnetError(f"metrics file {path} cannot be opened for writing "
                       f"({e.strerror or type(e).__name__}); choose another --metrics-file"
                       ) from None
  if not existed:
    os.remove(full)


def _keep_until(path: str, step: int) -> None:
  """Drops the records of steps after ``step`` from ``path`` (and a torn last
  line), rewriting it atomically."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill
      later = (isinstance(record, dict) and isinstance(record.get("step"), int)
               and record["step"] > step)
      if not later:
        kept.append(line if line.endswith("\n") else line + "\n")
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class MetricsWriter:
  """Appends one JSON object per line to ``path`` (process 0 only).

  Every record gets a ``time`` field (seconds since the epoch). Values must
  be JSON numbers or strings; numpy and JAX scalars are converted.

  Args:
    path: the file; ``None`` writes nothing. Parent directories are created.
    append: keep existing lines (a resumed run) instead of starting afresh.
    resumed_from: the run resumed from this checkpoint step: keep the
      existing lines up to it, drop those of later steps (the stopped run
      wrote them after its last checkpoint and they are run again), append;
      so every step appears once.
  """

  def __init__(self, path: str | None, *, append: bool = False,
               resumed_from: int | None = None):
    self.path = path
    self._file = None
    if path and is_main_process():
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      if resumed_from is not None:
        _keep_until(path, resumed_from)
      append = append or resumed_from is not None
      self._file = open(path, "a" if append else "w")

  def write(self, record: dict[str, Any]) -> None:
    if self._file is None:
      return
    clean = {k: v if isinstance(v, str) else float(v) if not isinstance(v, int) else v
             for k, v in record.items()}
    clean.setdefault("time", time.time())
    self._file.write(json.dumps(clean) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
