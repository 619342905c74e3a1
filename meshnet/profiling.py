"""Profiler traces of chosen training steps: ``meshnet train --profile-steps A:B DIR``.

:class:`StepProfiler` runs ``jax.profiler`` around whole steps of the
training loop: the steps after the first ``A`` and up to ``B`` (``3:5``
traces steps 4 and 5 as the progress line counts them; a Python slice of
0-based step indices). Every process writes its own trace, so a run of
several processes on one host (or a shared directory) leaves::

  DIR/process_0/plugins/profile/<time>/<host>.xplane.pb   the trace (also .trace.json.gz)
  DIR/process_0/train_step.hlo.txt                       the compiled step's HLO
  DIR/process_0/meshnet_profile.json                     steps traced, module, devices
  DIR/process_1/...

The HLO says what each op in the trace is (its collective kind, bytes and
named scope); ``meshnet profile DIR`` (:func:`meshnet.profile_report.profile_summary`)
reads all three.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import tempfile
from typing import Any, Callable

import jax

from meshnet.errors import MeshnetError
from meshnet.metrics import nearest_existing

META_FILE = "meshnet_profile.json"
HLO_FILE = "train_step.hlo.txt"
FORMAT = 1


def process_dir(directory: str, process: int) -> str:
  """Where process ``process`` writes its trace: ``DIR/process_<i>``."""
  return os.path.join(directory, f"process_{process}")


def parse_step_range(text: str) -> tuple[int, int]:
  """``"3:5"`` -> ``(3, 5)``.

  Raises:
    MeshnetError: ``text`` is not two integers ``A:B``.
  """
  first, sep, last = str(text).partition(":")
  try:
    if not sep:
      raise ValueError
    return int(first), int(last)
  except ValueError:
    raise MeshnetError(
        f"--profile-steps {text!r} is not a step range A:B; write e.g. "
        "--profile-steps 3:5 DIR (traces steps 4 and 5)") from None


def holds_trace(directory: str) -> bool:
  """Whether ``directory`` holds a meshnet profile or a ``jax.profiler`` trace
  (``[process_*/]plugins/profile/<run>/*.xplane.pb``)."""
  root = glob.escape(directory)
  patterns = [os.path.join(root, "process_*", META_FILE),
              os.path.join(root, "process_*", "plugins", "profile", "*", "*.xplane.pb"),
              os.path.join(root, "plugins", "profile", "*", "*.xplane.pb")]
  return any(glob.glob(pattern) for pattern in patterns)


def check_profile_dir(directory: str, *, replace: bool) -> None:
  """Refuses, before any work, a profile directory that cannot be written, or
  one that holds an earlier trace unless ``replace``. Nothing is created.

  Raises:
    MeshnetError: naming the directory and what to do.
  """
  full = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(full) and not os.path.isdir(full):
    raise MeshnetError(f"profile directory {directory} is a file; give a directory "
                       "(--profile-steps A:B DIR)")
  existing = full if os.path.exists(full) else nearest_existing(full)
  if not os.path.isdir(existing):
    raise MeshnetError(f"profile directory {directory} cannot be created: {existing} is a "
                       "file, not a directory; choose another --profile-steps DIR")
  try:  # what access() cannot tell (a read-only mount); leaves nothing behind
    if not os.access(existing, os.W_OK | os.X_OK):
      raise PermissionError(13, "permission denied")
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise MeshnetError(f"profile directory {directory} cannot be written "
                       f"({e.strerror or type(e).__name__}); choose another "
                       "--profile-steps DIR") from None
  if not replace and os.path.isdir(full) and holds_trace(full):
    raise MeshnetError(f"profile directory {directory} already holds a trace; give a new "
                       "--profile-steps DIR, remove that one, or pass --overwrite to "
                       "replace it")


def check_step_range(steps: tuple[int, int], total: int) -> None:
  """Refuses a range ``A:B`` that does not lie within the run's ``total`` steps.

  Raises:
    MeshnetError: naming the range, the run's steps and a range that fits.
  """
  first, last = steps
  if last > total:
    example = f"{max(0, min(first, total - 1))}:{total}"
    raise MeshnetError(
        f"--profile-steps {first}:{last} reaches past the run's last step {total}; "
        f"choose B <= {total} (e.g. --profile-steps {example}) or raise --steps")


class StepProfiler:
  """Traces whole training steps with ``jax.profiler``; a context manager.

  The loop calls :meth:`before_step` before dispatching step ``s`` (1-based)
  and :meth:`after_step` after: the trace starts once the steps before
  ``A + 1`` have finished, and stops once step ``B``'s results are ready, so
  it holds whole steps and nothing of the others. A run resumed after ``A``
  traces the steps of the range it runs; one resumed after ``B`` none.

  Example::

    with StepProfiler((3, 5), "runs/prof", log=print) as profiler:
      profiler.program = compiled_step   # its HLO is saved with the trace
      for s in range(1, 7):
        profiler.before_step(s, state)
        state, metrics = compiled_step(state, batch)
        profiler.after_step(s, (state, metrics))

  Args:
    steps: ``(A, B)``: trace the steps after the first ``A``, up to ``B``
      (``0 <= A < B``), or ``None`` to trace nothing.
    directory: where the traces go (``DIR/process_<i>`` per process).
    replace: replace an earlier trace in ``directory`` (``--overwrite``, or a
      resumed run tracing again) instead of refusing it.
    log: where to say what was traced (process 0 only).
    mesh: the run's mesh, recorded with the trace.
  """

  def __init__(self, steps: tuple[int, int] | None, directory: str | None, *,
               replace: bool = False, log: Callable[[str], None] | None = None,
               mesh: jax.sharding.Mesh | None = None):
    self.steps = steps
    self.directory = directory
    self.replace = replace
    self.program: Any = None  # the compiled step (jax.stages.Compiled), for its HLO
    self._log = log if log is not None and jax.process_index() == 0 else None
    self._mesh = mesh
    self._traced: list[int] = []
    self._active = False
    self._annotation: jax.profiler.StepTraceAnnotation | None = None

  @property
  def enabled(self) -> bool:
    return self.steps is not None and self.directory is not None

  @property
  def out_dir(self) -> str:
    """This process's trace directory."""
    return process_dir(self.directory, jax.process_index())

  def check(self, total: int) -> None:
    """Refuses, before any work, a range past ``total`` steps or a directory
    that cannot take the trace (:func:`check_step_range`,
    :func:`check_profile_dir`)."""
    if self.enabled:
      check_step_range(self.steps, total)
      check_profile_dir(self.directory, replace=self.replace)

  def starts_at(self, step: int) -> None:
    """Says so when a resumed run starts after the range: nothing to trace."""
    if self.enabled and self._log is not None and step > self.steps[1]:
      self._log(f"--profile-steps {self.steps[0]}:{self.steps[1]}: this run starts at "
                f"step {step}, after them; no trace written")

  def before_step(self, step: int, state: Any) -> None:
    """Starts the trace before the range's first step, once ``state`` (the
    previous steps' result) is ready."""
    if not self._active:
      if not self.enabled or self._traced or not self.steps[0] < step <= self.steps[1]:
        return
      jax.block_until_ready(state)
      self._clear()
      try:
        jax.profiler.start_trace(self.out_dir)
      except RuntimeError as e:
        raise MeshnetError(f"cannot start the profiler ({str(e).strip()}); stop the trace "
                           "already running (jax.profiler.stop_trace())") from None
      self._active = True
    # Marks the step's dispatch on the host line (TensorBoard's step view).
    self._annotation = jax.profiler.StepTraceAnnotation("train_step", step_num=step)
    self._annotation.__enter__()

  def after_step(self, step: int, outputs: Any) -> None:
    """Notes that ``step`` ran; after the range's last step, waits for
    ``outputs`` and writes the trace."""
    if not self._active:
      return
    self._end_annotation()
    self._traced.append(step)
    if step == self.steps[1]:
      jax.block_until_ready(outputs)
      self._stop(complete=True)

  def __enter__(self) -> "StepProfiler":
    return self

  def __exit__(self, *exc) -> None:
    if self._active:  # stopped early (a signal, an error): keep what was traced
      self._stop(complete=False)

  def _end_annotation(self) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None

  def _clear(self) -> None:
    """Removes an earlier trace this process (process 0: and any process
    beyond this run's count) would otherwise leave beside the new one."""
    stale = [self.out_dir]
    if jax.process_index() == 0:
      stale += [d for d in glob.glob(os.path.join(glob.escape(self.directory), "process_*"))
                if d.rsplit("_", 1)[-1].isdigit()
                and int(d.rsplit("_", 1)[-1]) >= jax.process_count()]
    for path in stale:
      shutil.rmtree(path, ignore_errors=True)

  def _stop(self, *, complete: bool) -> None:
    self._end_annotation()
    self._active = False
    jax.profiler.stop_trace()
    module = ""
    if self.program is not None:
      text = self.program.as_text()
      module = text.split("\n", 1)[0].split()[1].rstrip(",") if text.startswith(
          "HloModule ") else ""
      with open(os.path.join(self.out_dir, HLO_FILE), "w") as f:
        f.write(text)
    meta = {
        "format": FORMAT, "steps": self._traced, "range": list(self.steps),
        "complete": complete, "module": module,
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "local_devices": (len(self._mesh.local_devices) if self._mesh is not None
                          else jax.local_device_count()),
        "mesh": dict(self._mesh.shape) if self._mesh is not None else None,
    }
    with open(os.path.join(self.out_dir, META_FILE), "w") as f:
      json.dump(meta, f, indent=1)
    if self._log is not None and self._traced:
      steps = self._traced
      span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
      where = self.directory if jax.process_count() > 1 else self.out_dir
      self._log(f"profile of {span} written to {where} (summary: meshnet profile "
                f"{shlex.quote(self.directory)})")
