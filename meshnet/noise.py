"""Third-party noise: what the libraries under meshnet print that users need
not see, and how meshnet keeps it off the terminal unless ``--verbose``.

Where each kind comes from (jax 0.10.2 on CPU):

- **gloo** (compiled into jaxlib's ``libjax_common.so``) writes
  ``[Gloo] Rank R is connected to N peer ranks. Expected number of connected
  peer ranks is : N`` with C++ ``std::cout`` when a process first talks to
  the others: straight to file descriptor 1, past Python's ``sys.stdout``,
  with no setting that turns it off. Only a filter on the file descriptor
  (or on a pipe read by someone else) can drop it.
- **absl C++ logging** (XLA, the coordination service) writes
  ``W1125 18:11:12.195 12345 file.cc:80] ...`` lines to file descriptor 2.
  jax sets ``TF_CPP_MIN_LOG_LEVEL=1`` (no INFO) when imported; the variable
  is read once, when jaxlib loads, so a running process changes the level
  with ``jax.config.update("jax_logging_level", ...)`` instead.
- **absl Python logging** (orbax) writes ``WARNING:absl:...`` through
  :mod:`logging`.

What meshnet does, unless ``--verbose`` (or ``MESHNET_VERBOSE=1``):

- ``meshnet train`` shows C++ and absl log messages from ERROR up only
  (:func:`quiet_logs`); when it is one of several processes started by hand
  (``MESHNET_*`` variables, SLURM, a TPU pod: not ``meshnet launch``), its
  file descriptor 1 goes through a filter process that drops the lines
  :func:`is_noise` names (:func:`filter_stdout`). The filter is a separate
  process, so when the run crashes it still writes every line it was sent.
  Its file descriptor 2 goes through one too, which holds back jaxlib's
  abort when a peer is lost (:func:`filter_stderr`, :mod:`meshnet.faults`);
  with ``--verbose`` that one only copies the abort to its log file.
- ``meshnet launch`` drops those lines from the output it relays, and starts
  its children with ``TF_CPP_MIN_LOG_LEVEL=2`` (:func:`child_environment`).

Errors are never dropped: a gloo line is noise only when every expected
peer connected; C++ errors, Python tracebacks and meshnet's own lines pass.
``--verbose`` drops nothing and leaves the libraries' log levels at their
defaults (set ``TF_CPP_MIN_LOG_LEVEL=0`` as well for C++ INFO lines).

This module imports only the standard library at load time: run as a
script (``python -I -S noise.py``) it is the filter process.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys

ENV_VERBOSE = "MESHNET_VERBOSE"
# Set by `meshnet launch` for its children: it filters what they print.
ENV_FILTERED = "MESHNET_OUTPUT_FILTERED"

_GLOO = re.compile(r"\[Gloo\] Rank (\d+) is connected to (\d+) peer ranks\. Expected number "
                   r"of connected peer ranks is : (\d+)")
_NOISE = (
    re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called are "
               r"written to STDERR"),
)
# A line without its end that waited this long is flushed (no noise line is
# written in pieces: gloo's is one write).
_PARTIAL_WAIT_S = 0.05


def is_noise(line: str) -> bool:
  """Whether ``line`` (with or without its line end) is known noise: gloo's
  connection line when every expected peer connected, or absl's note that it
  logs to stderr before being initialised."""
  text = line.rstrip("\r\n")
  gloo = _GLOO.fullmatch(text)
  if gloo:
    return gloo.group(2) == gloo.group(3)
  return any(pattern.fullmatch(text) for pattern in _NOISE)


def verbose_from_env() -> bool:
  """``MESHNET_VERBOSE`` is set to something other than ``""``/``0``."""
  return os.environ.get(ENV_VERBOSE, "") not in ("", "0")


def quiet_logs(verbose: bool = False) -> None:
  """C++ (absl) logs and Python absl logs (orbax) from ERROR up; nothing
  changes when ``verbose``. For the ``meshnet`` command: a library user's
  logging is theirs to set.

  The C++ level is set in the running process with jaxlib's
  ``absl_set_min_log_level`` (what ``jax_logging_level`` calls, without
  the handler that option also adds to the ``jax`` logger, which would print
  each of jax's own error logs twice once orbax has configured logging).
  """
  if verbose:
    return
  import logging

  try:
    from jax._src.lib import utils
    utils.absl_set_min_log_level(2)  # absl severities: 0 INFO, 1 WARNING, 2 ERROR
  except (ImportError, AttributeError):
    import jax
    jax.config.update("jax_logging_level", "ERROR")
  logging.getLogger("absl").setLevel(logging.ERROR)


def child_environment(verbose: bool = False) -> dict[str, str]:
  """Variables ``meshnet launch`` gives its children: C++ logs from ERROR up
  (``TF_CPP_MIN_LOG_LEVEL=2``, read when their jaxlib loads) and a mark that
  the launcher filters their output; when ``verbose``, a mark that they are
  verbose and nothing else."""
  if verbose:
    return {ENV_VERBOSE: "1"}
  return {"TF_CPP_MIN_LOG_LEVEL": "2", ENV_FILTERED: "1"}


def filter_stdout() -> bool:
  """Sends this process's file descriptor 1 through a filter process that
  drops :func:`is_noise` lines and passes everything else, in order.

  What C++ writes to the descriptor is filtered as well as ``print``. The
  filter exits when the last writer closes the pipe, after writing what it
  holds, so the last lines of a crash reach the terminal; at a normal exit
  this process waits for it. The filter ignores Ctrl-C (it runs in its own
  session) and never ends the run: if it cannot start, nothing changes.

  Returns:
    Whether the filter is in place.
  """
  return _filter_fd(1, [])


def filter_stderr(fatal_log: str, *, verbose: bool = False) -> bool:
  """Sends file descriptor 2 through a filter process that watches for
  jaxlib's abort when the coordination service reports a lost task (the
  ``F... Terminating process because the JAX distributed service detected
  fatal errors`` line and the C++ stack dump after it).

  From that line (or the coordination service's ERROR lines before it) on,
  what arrives is written to ``fatal_log`` (created at that moment; read by
  :func:`meshnet.faults.catch_abort`) and, unless ``verbose``, held back
  from the terminal until a ``meshnet:`` line (the one-line error that
  replaces it) ends the hold; if none comes, the held lines are written at
  the end, so no error is lost. Everything else passes unchanged.

  Returns:
    Whether the filter is in place.
  """
  return _filter_fd(2, ["--fatal-log", fatal_log] + (["--verbose"] if verbose else []))


def _filter_fd(fd: int, args: list[str]) -> bool:
  import atexit
  import subprocess

  stream = sys.stdout if fd == 1 else sys.stderr
  try:
    stream.flush()
    terminal = os.dup(fd)
    read_end, write_end = os.pipe()
  except (OSError, AttributeError, ValueError):
    return False
  try:
    proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), *args],
                            stdin=read_end, stdout=terminal, close_fds=True,
                            start_new_session=True)
  except OSError:
    for end in (terminal, read_end, write_end):
      os.close(end)
    return False
  os.close(read_end)
  os.dup2(write_end, fd)
  os.close(write_end)

  def finish() -> None:
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
    os.dup2(terminal, fd)  # closes the pipe: the filter writes what is left and exits
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # another process still holds the pipe
      pass

  atexit.register(finish)
  return True


def _write_all(fd: int, data: bytes) -> None:
  while data:
    data = data[os.write(fd, data):]


def _split(pending: bytes) -> tuple[list[bytes], bytes]:
  """Complete lines (with their ends: ``\n``, ``\r\n`` or ``\r``) and the rest."""
  end = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
  if end < 0:
    return [], pending
  return pending[:end + 1].splitlines(True), pending[end + 1:]


def _keep(line: bytes) -> bool:
  try:
    return not is_noise(line.decode("utf-8", "replace"))
  except Exception:  # noqa: BLE001 - when in doubt, a line is shown
    return True


# jaxlib's LOG(FATAL) when the coordination service reports a lost task, and
# the ERROR lines that come before it (the service and its agents report it).
_COORDINATION_FATAL = re.compile(
    rb"^(F\d{4} .*Terminating process because the JAX distributed service detected fatal"
    rb"|E\d{4} .*(coordination_service|coordination_service_agent|preemption_sync_manager)"
    rb"\.cc:\d+\])")
_MESHNET_LINE = b"meshnet:"


class _FatalHold:
  """Holds back jaxlib's coordination-service abort (the service's ERROR
  lines, the fatal line, then the C++ stack dump) and copies it to a log
  file; a ``meshnet:`` line ends it."""

  def __init__(self, log_path: str, verbose: bool):
    self.log_path = log_path
    self.verbose = verbose
    self.log = None
    self.held: list[bytes] = []

  def keep(self, line: bytes) -> bool:
    """Whether ``line`` goes to the terminal now."""
    if self.log is None and _COORDINATION_FATAL.match(line):
      self.log = open(self.log_path, "wb", buffering=0)
    if self.log is None:
      return True
    if line.startswith(_MESHNET_LINE):
      self.held = []
      return True
    self.log.write(line)
    if not self.verbose:
      self.held.append(line)
    return self.verbose

  def rest(self) -> bytes:
    """What was held and not replaced by a ``meshnet:`` line."""
    return b"".join(self.held)


def _filter(read_fd: int = 0, write_fd: int = 1, hold: _FatalHold | None = None) -> None:
  """Copies ``read_fd`` to ``write_fd`` line by line, leaving out noise (and
  what ``hold`` holds back), until end of file."""
  keep = _keep if hold is None else (lambda line: _keep(line) and hold.keep(line))
  pending = b""
  while True:
    if pending:
      ready, _, _ = select.select([read_fd], [], [], _PARTIAL_WAIT_S)
      if not ready:  # a partial line (a prompt, a bar without its end): not noise
        if hold is None or hold.keep(pending):
          _write_all(write_fd, pending)
        pending = b""
        continue
    chunk = os.read(read_fd, 1 << 16)
    if not chunk:
      break
    lines, pending = _split(pending + chunk)
    _write_all(write_fd, b"".join(line for line in lines if keep(line)))
  _write_all(write_fd, pending)
  if hold is not None:
    _write_all(write_fd, hold.rest())


def _main() -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run decides when output ends
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  hold = None
  if "--fatal-log" in sys.argv:
    hold = _FatalHold(sys.argv[sys.argv.index("--fatal-log") + 1], "--verbose" in sys.argv)
  try:
    _filter(hold=hold)
  except OSError:  # the terminal went away
    pass


if __name__ == "__main__":
  _main()
