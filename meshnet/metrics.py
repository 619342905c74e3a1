"""Progress bars and JSON-lines metrics, written by process 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import weakref
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


# The bar whose line is still open (drawn in place, no newline yet) on each
# stream, so that another bar or a message starts below it instead of
# overwriting it.
_open_lines: "weakref.WeakKeyDictionary[TextIO, Bar]" = weakref.WeakKeyDictionary()


def _open_line(stream: TextIO) -> "Bar | None":
  try:
    return _open_lines.get(stream)
  except TypeError:  # a stream that takes no weak references
    return None


def _set_open_line(stream: TextIO, bar: "Bar | None") -> None:
  try:
    if bar is None:
      _open_lines.pop(stream, None)
    else:
      _open_lines[stream] = bar
  except TypeError:
    pass


class Bar:
  """A one-line progress bar over ``total`` units of work.

  Draws ``LABEL n/total [#####-------] NOTE  ETA 0:01:05``. On a terminal
  the line is redrawn in place; on anything else (a file, a pipe, CI) it
  writes a line at most every ``interval`` seconds (and, if it wrote any, a
  last one when done), so a long job still shows it is alive and a short
  one stays quiet. The bar draws in whatever process holds it: callers in a
  multi-process job enable it on process 0 only (:func:`is_main_process`).

  Example::

    with Bar(len(cases), label="cases") as bar:
      for case in cases:
        run(case)
        bar.advance(note=case.name)

  Args:
    total: units of work (steps, batches, cases); ``>= 0``.
    label: what is counted, printed first.
    stream: where to draw (default: ``sys.stderr`` at creation time).
    enabled: draw at all; a disabled bar ignores every call but
      :meth:`message`.
    width: characters of the bar itself.
    interval: seconds between lines when ``stream`` is not a terminal; 0
      writes a line on every update.
  """

  def __init__(self, total: int, *, label: str = "", stream: TextIO | None = None,
               enabled: bool = True, width: int = 24, interval: float = 10.0):
    self.total = max(int(total), 0)
    self.label = label
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.width = width
    self.interval = interval
    self.done = 0
    self._inline = _isatty(self.stream)
    self._started = time.perf_counter()
    self._last_line = self._started
    self._lines = 0  # written off a terminal

  def update(self, done: int, note: str = "", *, eta: float | None = None) -> None:
    """Shows ``done`` of ``total`` units finished.

    Args:
      done: units finished so far.
      note: text after the bar (e.g. ``loss 0.1234``).
      eta: seconds left; by default from the mean time per unit so far.
    """
    self.done = done
    if not self.enabled:
      return
    now = time.perf_counter()
    if not self._inline:  # a line when due; the last one only after earlier ones
      finished = done >= self.total and self._lines > 0
      if now - self._last_line < self.interval and not finished:
        return
      self._lines += 1
    self._last_line = now
    if eta is None:
      eta = (self.total - done) * (now - self._started) / done if done else math.inf
    self._draw(self.render(done, note, eta))

  def advance(self, n: int = 1, note: str = "") -> None:
    """Shows ``n`` more units finished."""
    self.update(self.done + n, note)

  def render(self, done: int, note: str, eta: float) -> str:
    """The bar's text for ``done`` units (no newline)."""
    filled = int(self.width * min(done, self.total) / max(self.total, 1))
    bar = "#" * filled + "-" * (self.width - filled)
    label = f"{self.label} " if self.label else ""
    note = f"{note}  " if note else ""
    return (f"{label}{done:>{len(str(self.total))}}/{self.total} [{bar}] "
            f"{note}ETA {_clock(eta)}")

  def _draw(self, line: str) -> None:
    if not self._inline:
      self.stream.write(line + "\n")
    else:
      if _open_line(self.stream) not in (None, self):
        self.stream.write("\n")  # keep the other bar's last line
      self.stream.write("\r" + line + "\x1b[K")
      _set_open_line(self.stream, self)
    self.stream.flush()

  def message(self, text: str) -> None:
    """Prints ``text`` on its own line below any bar drawn in place (also
    when this bar is disabled)."""
    if _open_line(self.stream) is not None:
      self.stream.write("\n")
      _set_open_line(self.stream, None)
    self.stream.write(text + "\n")
    self.stream.flush()

  def close(self, *, clear: bool = False) -> None:
    """Ends the bar's line: kept on screen, or erased with ``clear``."""
    if _open_line(self.stream) is self:
      self.stream.write("\r\x1b[K" if clear else "\n")
      self.stream.flush()
      _set_open_line(self.stream, None)

  def __enter__(self) -> "Bar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Ticker:
  """Seconds counted on a terminal while one long call runs that has no
  units to count (an Orbax restore): ``LABEL ... 3s`` redrawn every
  ``period`` seconds by a daemon thread and erased when the call returns.
  Anywhere but a terminal it draws nothing (the caller's lines before and
  after say what happened).

  Example::

    with Ticker("restoring checkpoint 30 (120 MB)"):
      manager.restore(...)

  Args:
    label: what is running.
    stream: where to draw (default: ``sys.stderr`` at creation time).
    enabled: draw at all.
    period: seconds between redraws.
  """

  def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool = True,
               period: float = 0.5):
    self.label = label
    self.stream = stream or sys.stderr
    self.enabled = enabled and _isatty(self.stream)
    self.period = period
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._drawn = False

  def _run(self) -> None:
    began = time.perf_counter()
    while not self._stop.wait(self.period):
      self.stream.write(f"\r{self.label} ... {time.perf_counter() - began:.0f}s\x1b[K")
      self.stream.flush()
      self._drawn = True

  def __enter__(self) -> "Ticker":
    if self.enabled:
      self._thread = threading.Thread(target=self._run, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    if self._drawn:
      self.stream.write("\r\x1b[K")
      self.stream.flush()


def _isatty(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # no isatty, or closed
    return False


class Progress:
  """The training loop's bar: step, loss, samples/s and ETA.

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
    self.main = is_main_process()
    self.enabled = enabled and self.main
    self._bar = Bar(total, label="step", stream=stream, enabled=self.enabled, width=width,
                    interval=0)
    self.stream = self._bar.stream

  def update(self, step: int, *, loss: float, samples_per_sec: float,
             seconds_per_step: float) -> None:
    self._bar.update(step, f"loss {loss:.4f}  {samples_per_sec:,.0f} samples/s",
                     eta=(self.total - step) * seconds_per_step)

  def message(self, text: str) -> None:
    """Prints ``text`` on its own line without breaking the bar (process 0
    only; printed even when the bar is turned off)."""
    if self.main:
      self._bar.message(text)

  def close(self) -> None:
    self._bar.close()


def nearest_existing(path: str) -> str:
  """The closest ancestor of ``path`` (absolute) that exists: where creating
  ``path`` with its missing parents would start."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  return parent


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
  parent = nearest_existing(full)
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


def _json_value(value: Any) -> Any:
  """``value`` as JSON can write it: numpy and JAX scalars become floats."""
  if value is None or isinstance(value, (str, int)):  # bool is an int
    return value
  if isinstance(value, dict):
    return {str(k): _json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  return float(value)


class MetricsWriter:
  """Appends one JSON object per line to ``path`` (process 0 only).

  Every record gets a ``time`` field (seconds since the epoch). Values are
  JSON values (numbers, strings, booleans, ``None``, lists and dicts of
  them) or numpy and JAX scalars, which become numbers.

  A training run writes a run record first (``"kind": "run"``: what it costs
  per device, :func:`meshnet.runcost.run_record`), then one record per logged
  step and evaluation (each with an integer ``step`` and no ``kind``).

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
    clean = {k: _json_value(v) for k, v in record.items()}
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
