"""A peer that dies: every surviving process ends with one line and one exit code.

When one process of several dies (SIGKILL, a crashed host) the others learn
it in one of two ways (jax 0.10.2, CPU/gloo):

- **a collective fails** at once: gloo's TCP pair reads a reset connection
  and XLA raises ``JaxRuntimeError`` (or ``ValueError`` out of a jitted
  ``process_allgather``) with ``Gloo ... failed: ... Connection reset by
  peer`` where the loop waits on a result, a barrier or a save;
- **the coordination service** stops hearing the dead task's heartbeats
  (after the heartbeat timeout, :data:`meshnet.distributed.DEFAULT_HEARTBEAT_TIMEOUT`)
  or, when the dead process hosted the service (process 0), the others'
  error polls fail at once. jaxlib then ends the process with ``LOG(FATAL)``
  (exit 134 and a C++ stack dump): its ``missed_heartbeat_callback`` cannot
  be a Python function in 0.10.2 (calling it throws ``std::bad_cast``).

:class:`PeerGuard` turns the first into one line::

  meshnet: error: process 1 of 2 stopped responding during step 812 (gloo:
  connection reset by peer); newest checkpoint: step 800 in runs/ck; continue
  with --resume

and exit status :data:`EXIT_PEER_FAILED`, within a second or two of the
death and long before the coordination service would abort. Nothing waits
on the dead peer: a checkpoint save in flight gets a short grace period and
is otherwise left as Orbax's ``<step>.orbax-checkpoint-tmp`` directory, which
no restore takes for a complete step. For the second, :func:`catch_abort`
gives jaxlib's abort the same line and code, and
:func:`meshnet.noise.filter_stderr` keeps the C++ dump off the terminal
unless ``--verbose``.

A peer that is alive but stuck (hung I/O, a deadlock) fails nothing: the
others wait in a collective. :class:`StepWatchdog` (``--step-timeout``) ends
them with the same kind of line and the same exit code.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any, Iterator

import jax

# sysexits.h EX_TEMPFAIL ("a temporary failure; the user is invited to
# retry"): the run itself was sound, a peer was lost; continue with --resume.
EXIT_PEER_FAILED = 75
# How long a save in flight may take to finish after a peer is lost: a save
# whose every process wrote its part only has its rename left; one that waits
# for the dead peer never finishes.
SAVE_GRACE_SECONDS = 2.0

# (pattern in the error's text, the cause as the line names it), first match wins.
_CAUSES = (
    (re.compile(r"connection reset by peer", re.I), "gloo: connection reset by peer"),
    (re.compile(r"connection closed by peer", re.I), "gloo: connection closed by peer"),
    (re.compile(r"broken pipe", re.I), "gloo: broken pipe"),
    (re.compile(r"Gloo \w+ failed", re.I), "gloo: collective failed"),
    (re.compile(r"heartbeat timeout|stopped sending heartbeats", re.I),
     "coordination service: no heartbeat"),
    (re.compile(r"Barrier failed|CoordinationServiceError|coordination service", re.I),
     "coordination service: task failed"),
    (re.compile(r"NCCL|remote process exited", re.I), "nccl: collective failed"),
)


def peer_failure_cause(error: BaseException) -> str | None:
  """How ``error`` reads as a lost peer (``"gloo: connection reset by
  peer"``), or ``None`` when it is not one. Looks through the exception's
  causes and context too (Orbax wraps a failed barrier in a ``TimeoutError``)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    for pattern, cause in _CAUSES:
      if pattern.search(text):
        return cause
    error = error.__cause__ or error.__context__
  return None


def lost_peer(ids: list[int] | None = None) -> str:
  """Which process stopped responding, as the line names it: ``ids`` when
  known (the coordination service names them), with two processes the other
  one (``"process 1 of 2"``), else ``"a peer process of N"`` (gloo's error
  names an address, not a process)."""
  count, index = jax.process_count(), jax.process_index()
  if not ids and count == 2:
    ids = [1 - index]
  if not ids:
    return f"a peer process of {count}"
  names = ", ".join(map(str, ids))
  return f"process{'es' if len(ids) > 1 else ''} {names} of {count}"


def newest_checkpoint(directory: str | None) -> str:
  """``"newest checkpoint: step 800 in runs/ck; continue with --resume"``,
  or what to say when there is none (only complete steps count)."""
  if not directory:
    return "no checkpoint directory (with --checkpoint-dir, a rerun could continue)"
  from meshnet.checkpoint import list_checkpoints
  from meshnet.errors import MeshnetError
  try:
    steps = [row["step"] for row in list_checkpoints(directory)]
  except MeshnetError:
    steps = []
  if not steps:
    return f"no complete checkpoint in {directory} yet; start the run again"
  return f"newest checkpoint: step {steps[-1]} in {directory}; continue with --resume"


def _finish(checkpointer: Any, seconds: float) -> None:
  """Waits at most ``seconds`` for ``checkpointer``'s save in flight."""
  if checkpointer is None:
    return
  waiter = threading.Thread(target=_quiet_wait, args=(checkpointer,), daemon=True)
  waiter.start()
  waiter.join(seconds)


def _quiet_wait(checkpointer: Any) -> None:
  try:
    checkpointer.wait()
  except Exception:  # noqa: BLE001 - the save waited on the dead peer: it stays unfinished
    pass


def _exit(message: str) -> None:
  """Prints ``meshnet: error: <message>`` as the last line and leaves at once,
  before jax's shutdown barrier (which would wait on the dead peer and abort)."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  line = f"meshnet: error: {message}\n".encode()
  try:
    os.write(2, line)
  except OSError:
    pass
  os._exit(EXIT_PEER_FAILED)


_FAILING = threading.Lock()


class PeerGuard:
  """The run's answer to a lost peer, as a context manager around the work.

  An exception that reads as a lost peer (:func:`peer_failure_cause`) in a
  run of several processes does not propagate: the guard gives the save in
  flight :data:`SAVE_GRACE_SECONDS`, prints one line naming the lost process,
  the step and the newest complete checkpoint, and ends the process with
  :data:`EXIT_PEER_FAILED` (``os._exit``: nothing else may wait on the dead
  peer). Other exceptions pass untouched. Entering it again (an inner scope,
  e.g. inside the block that closes the checkpointer) is allowed.

  Attributes:
    step: the step the loop is in (set by the loop; ``None`` before it).
    checkpointer: the run's :class:`~meshnet.checkpoint.Checkpointer`, once open.
  """

  def __init__(self, checkpoint_dir: str | None, *, verbose: bool = False):
    self.checkpoint_dir = checkpoint_dir
    self.verbose = verbose
    self.step: int | None = None
    self.checkpointer: Any = None

  def message(self, cause: str, ids: list[int] | None = None) -> str:
    """The one line (without ``meshnet: error:``) for a peer lost to ``cause``."""
    during = f" during step {self.step}" if self.step is not None else ""
    return (f"{lost_peer(ids)} stopped responding{during} ({cause}); "
            f"{newest_checkpoint(self.checkpoint_dir)}")

  def fail(self, cause: str, error: BaseException | None = None,
           ids: list[int] | None = None) -> None:
    """Ends the process for a peer lost to ``cause`` (never returns)."""
    self.end(lambda: self.message(cause, ids), error)

  def end(self, message, error: BaseException | None = None) -> None:
    """Ends the process with ``message()`` as its last line, after the save
    in flight's grace period (never returns). The first caller wins: another
    thread that ends it at the same time waits for the exit."""
    if not _FAILING.acquire(blocking=False):
      while True:
        time.sleep(1)
    if self.verbose and error is not None:
      traceback.print_exception(error, file=sys.stderr)
    _finish(self.checkpointer, SAVE_GRACE_SECONDS)
    _exit(message())

  def __enter__(self) -> "PeerGuard":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is None or not isinstance(exc, Exception) or jax.process_count() < 2:
      return
    cause = peer_failure_cause(exc)
    if cause is not None:
      self.fail(cause, exc)


# Where meshnet.noise.filter_stderr copies jaxlib's coordination-service abort
# (set by the `meshnet` command when it filters file descriptor 2).
_fatal_log: str | None = None
_FATAL_LOG_WAIT_S = 1.0


def set_fatal_log(path: str | None) -> None:
  """Tells :func:`catch_abort` where the stderr filter writes jaxlib's
  coordination-service abort (:func:`meshnet.noise.filter_stderr`)."""
  global _fatal_log
  _fatal_log = path


_FATAL_MARK = "Terminating process because the JAX distributed service detected fatal"


def _read(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()
  except OSError:
    return ""


def _fatal_report(text: str) -> tuple[str, list[int] | None]:
  """The cause and the lost processes (when named) in jaxlib's abort text."""
  if re.search(r"leader task|Failed to send RPC to coordination service", text):
    return "coordination service unreachable", [0] if jax.process_index() != 0 else None
  named = re.search(r"stopped sending heartbeats\):\s*([\d,\s]+?)\s*\n\s*The tasks", text)
  ids = [int(t) for t in re.findall(r"\d+", named.group(1))] if named else None
  if re.search(r"heartbeat", text):
    return "coordination service: no heartbeat", ids
  return "coordination service: task failed", ids


@contextlib.contextmanager
def catch_abort(guard: PeerGuard) -> Iterator[None]:
  """While active, jaxlib's abort for a lost task ends the process the way
  ``guard`` ends it for a failed collective (one line, exit
  :data:`EXIT_PEER_FAILED`) instead of exit 134.

  jaxlib aborts from a C++ thread (``LOG(FATAL)``, then ``abort()``); a
  C-level ``SIGABRT`` handler (ctypes) runs in that thread before the
  process dies. It acts only when the stderr filter saw the
  coordination service's fatal line (:func:`set_fatal_log`); any other abort
  goes on as before. A no-op without the filter or with one process.
  """
  if _fatal_log is None or jax.process_count() < 2 or not hasattr(signal, "SIGABRT"):
    yield
    return
  import ctypes

  libc = ctypes.CDLL(None)
  handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
  libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
  libc.signal.restype = ctypes.c_void_p
  path = _fatal_log

  def on_abort(signum: int) -> None:
    del signum
    deadline = time.monotonic() + _FATAL_LOG_WAIT_S
    while _FATAL_MARK not in (text := _read(path)):  # the filter copies it there
      if time.monotonic() > deadline:
        return  # another abort: glibc's abort() goes on with the default action
      time.sleep(0.01)
    cause, ids = _fatal_report(text)
    guard.fail(cause, ids=ids)

  handler = handler_type(on_abort)
  previous = libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))
  try:
    yield
  finally:
    libc.signal(signal.SIGABRT, previous)
    del handler


# The steps before the watchdog has measured the pace (the first runs slow:
# autotuning, the first save) may take this long.
FIRST_STEPS_ALLOWANCE_S = 300.0
WARMUP_STEPS = 5
MEASURED_STEPS = 20
MIN_STEP_TIMEOUT_S = 60.0
STEP_TIME_FACTOR = 20.0


class StepWatchdog:
  """Ends a run whose step does not finish in time (a peer that is alive but
  stuck: the others would wait in a collective forever).

  The loop calls :meth:`beat` each time a step's result is back; a thread
  checks the time since the last beat. Until :data:`WARMUP_STEPS` +
  :data:`MEASURED_STEPS` steps have run the limit is
  :data:`FIRST_STEPS_ALLOWANCE_S` (or ``timeout`` when larger); then it is
  ``timeout``, or when that is ``None``, max(:data:`MIN_STEP_TIMEOUT_S`,
  :data:`STEP_TIME_FACTOR` x the median step time of the measured steps).
  On timeout, ``guard`` ends the process with one line naming the step and
  how long it waited (exit :data:`EXIT_PEER_FAILED`). :meth:`paused` covers
  work that is not a step (evaluation).

  Args:
    guard: the run's :class:`PeerGuard` (its ``step`` names the step).
    timeout: seconds per step, or ``None`` for the measured default.
  """

  def __init__(self, guard: PeerGuard, timeout: float | None):
    self.guard = guard
    self.timeout = timeout
    self.limit = max(FIRST_STEPS_ALLOWANCE_S, timeout or 0.0)
    self._last = time.monotonic()
    self._intervals: list[float] = []
    self._paused = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="meshnet-step-watchdog",
                                    daemon=True)

  def beat(self) -> None:
    """A step finished (its result is back)."""
    now = time.monotonic()
    self._intervals.append(now - self._last)
    self._last = now
    if len(self._intervals) == WARMUP_STEPS + MEASURED_STEPS:
      if self.timeout is None:
        median = float(sorted(self._intervals[WARMUP_STEPS:])[MEASURED_STEPS // 2])
        self.limit = max(MIN_STEP_TIMEOUT_S, STEP_TIME_FACTOR * median)
      else:
        self.limit = self.timeout

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """No limit while inside (work that is not a step); the clock restarts after."""
    self._paused += 1
    try:
      yield
    finally:
      self._paused -= 1
      self._last = time.monotonic()

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self.limit / 10)):
      waited = time.monotonic() - self._last
      if not self._paused and waited > self.limit:
        self.guard.end(lambda: self._message(waited))

  def _message(self, waited: float) -> str:
    step = self.guard.step
    setting = ("--step-timeout" if self.timeout is not None and self.limit == self.timeout
               else "the limit; set it with --step-timeout")
    return (f"step {step} did not finish in {waited:.1f}s ({self.limit:g}s is {setting}); "
            f"a peer process is stuck or too slow; {newest_checkpoint(self.guard.checkpoint_dir)}")

  def __enter__(self) -> "StepWatchdog":
    self._last = time.monotonic()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
