"""``meshnet launch -n N -- CMD``: N processes on this host, joined like torchrun.

Each process gets ``MESHNET_COORDINATOR`` (a free local port),
``MESHNET_NUM_PROCESSES``, ``MESHNET_PROCESS_ID`` and
``MESHNET_DEVICES_PER_PROCESS`` (``--devices-per-process K``, default 1: one
simulated CPU device per process, like one GPU per torchrun rank; ignored on
accelerators). ``--cpus-per-process K`` pins process ``i`` to its own ``K``
cores (``sched_setaffinity``) and sets the math libraries' thread counts
(``OMP_NUM_THREADS`` ...) to ``K``, as torchrun sets ``OMP_NUM_THREADS``, and
keeps glibc's allocator from handing XLA's large buffers back to the kernel
after every step (:func:`placement_environment`). Output lines are prefixed with ``[i]``; third-party noise (gloo's
connection lines, C++ warnings) is left out unless ``--verbose``
(:mod:`meshnet.noise`). SIGINT and SIGTERM are forwarded to every process. When a process fails, the others are stopped
(SIGTERM, then SIGKILL after a grace period) and the launcher exits with the
failing process's code and a one-line summary: jax's own handling of a dead
peer is to let the survivors wait for its heartbeat timeout and then abort.

``--max-restarts N`` (like torchrun's) starts the whole group again after a
failure, up to ``N`` times, on a fresh coordinator port, each process told
which restart it is in ``MESHNET_RESTART_COUNT``. A ``meshnet train``
command continues from the newest checkpoint this job saved in its
``--checkpoint-dir`` (``--resume`` is added and ``--overwrite`` dropped: a
restart continues the job's checkpoints, it never replaces them); before
the job's first save it is run again as given (an ``--overwrite`` then still
has the old checkpoints to replace, and a restart never resumes a step the
job did not save unless the command had ``--resume``); without a checkpoint
directory, or for any other command, it starts from scratch. A clean exit
(every process 0) ends the job, and so does SIGINT/SIGTERM to the launcher:
a stop asked for is not a failure to restart from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

from meshnet.distributed import (
    ENV_COORDINATOR, ENV_DEVICES_PER_PROCESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID,
)
from meshnet.errors import MeshnetError
from meshnet.faults import EXIT_PEER_FAILED
from meshnet.noise import child_environment, is_noise

GRACE_SECONDS = 10.0
ENV_RESTART_COUNT = "MESHNET_RESTART_COUNT"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
ALLOCATOR_VARIABLES = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                       "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
"""glibc's allocator for a pinned CPU worker: one arena, every block from
its heap, and freed memory kept for the next step. By default XLA:CPU's
buffers for a step (one temporary block of ~100 MB for a pipelined step of
8 MB stages) come from a thread's arena, which maps a block over 64 MB fresh
from the kernel and unmaps it on free, whatever ``MALLOC_MMAP_MAX_`` says:
every step then pays a page fault per 4 KiB it touches. Measured on a
pipelined step (MLP 784-1024x8-10, stage=2, one process, 2 cores): 58,000
page faults and 886 ms a step by default, 9,500 and 760 ms so (1.4-1.5 s
against 0.83 s with another job competing for the cores)."""


def placement_environment(cpus: int, env: Mapping[str, str]) -> dict[str, str]:
  """What a CPU worker pinned to ``cpus`` cores gets on top of ``env``: the
  math libraries' thread counts, and :data:`ALLOCATOR_VARIABLES` unless
  ``env`` already tunes glibc's allocator (any ``MALLOC_*`` variable or
  ``GLIBC_TUNABLES``): set ``MALLOC_MMAP_MAX_=65536`` to keep glibc's default."""
  placed = {name: str(cpus) for name in THREAD_VARIABLES}
  if not any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in env):
    placed.update(ALLOCATOR_VARIABLES)
  return placed


def cpu_sets(num_processes: int, cpus_per_process: int) -> list[list[int]]:
  """Disjoint cores for each process, from the cores this process may use.

  Raises:
    MeshnetError: fewer usable cores than ``num_processes * cpus_per_process``.
  """
  available = sorted(os.sched_getaffinity(0))
  needed = num_processes * cpus_per_process
  if cpus_per_process < 1 or needed > len(available):
    raise MeshnetError(
        f"--cpus-per-process {cpus_per_process} x -n {num_processes} needs {needed} cores "
        f"but {len(available)} are usable here; lower -n or --cpus-per-process")
  return [available[i * cpus_per_process:(i + 1) * cpus_per_process]
          for i in range(num_processes)]


def free_port(avoid: Sequence[int] = ()) -> int:
  """A free local TCP port, none of ``avoid`` (ports of earlier attempts may
  linger in TIME_WAIT)."""
  while True:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    if port not in avoid:
      return port


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f"signal {signal.Signals(-code).name}"
    except ValueError:
      return f"signal {-code}"
  return f"exit code {code}"




def _why(index: int, code: int) -> str:
  """``"process 1 exited with 75 (a peer stopped responding)"``, ``"process 1
  was killed by SIGKILL"``."""
  if code < 0:
    return f"process {index} was killed by {_describe(code).removeprefix('signal ')}"
  reason = " (a peer stopped responding)" if code == EXIT_PEER_FAILED else ""
  return f"process {index} exited with {code}{reason}"


def _pump(stream, index: int, out, verbose: bool) -> None:
  """Relays a child's output, each line prefixed with ``[index]``, leaving
  out third-party noise unless ``verbose`` (:func:`meshnet.noise.is_noise`)."""
  for line in iter(stream.readline, ""):
    if verbose or not is_noise(line):
      out.write(f"[{index}] {line}")
      out.flush()
  stream.close()


@dataclasses.dataclass(frozen=True)
class TrainCommand:
  """What a launched ``meshnet train`` command says about its checkpoints.

  Attributes:
    checkpoint_dir: its ``--checkpoint-dir``, or ``None``.
    resume: it has ``--resume``.
    overwrite: it has ``--overwrite``.
  """
  checkpoint_dir: str | None
  resume: bool
  overwrite: bool


def _train_args(command: Sequence[str]) -> list[str] | None:
  """The arguments after ``train`` when ``command`` is ``meshnet train ...``
  or ``python -m meshnet train ...``; else ``None``."""
  for i in range(1, len(command)):
    if command[i] == "train" and os.path.basename(command[i - 1]) == "meshnet":
      return list(command[i + 1:])
  return None


def _parse_train(args: Sequence[str]):
  """``meshnet train``'s parsed ``args`` (an ``argparse.Namespace``), or
  ``None`` when they do not parse (the run itself will say why)."""
  from meshnet.cli import build_parser
  sink = io.StringIO()
  try:
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
      parsed, _ = build_parser().parse_known_args(["train", *args])
  except SystemExit:
    return None
  return parsed


def train_command(command: Sequence[str]) -> TrainCommand | None:
  """How ``command`` checkpoints, when it is ``meshnet train ...`` (or
  ``python -m meshnet train ...``) whose flags parse; else ``None``."""
  args = _train_args(command)
  parsed = None if args is None else _parse_train(args)
  if parsed is None:
    return None
  return TrainCommand(parsed.checkpoint_dir or None, bool(parsed.resume),
                      bool(parsed.overwrite))


def resume_command(command: Sequence[str]) -> list[str]:
  """``command`` (a ``meshnet train`` command) continuing its checkpoints:
  ``--resume`` added unless there, ``--overwrite`` (or an abbreviation of
  it) left out.

  >>> resume_command(["meshnet", "train", "--checkpoint-dir", "ck", "--overwrite"])
  ['meshnet', 'train', '--checkpoint-dir', 'ck', '--resume']
  """
  command = list(command)
  start = len(command) - len(_train_args(command) or [])
  for i in reversed(range(start, len(command))):
    token = command[i]
    if len(token) > 2 and "--overwrite".startswith(token):
      rest = command[:i] + command[i + 1:]
      parsed = _parse_train(rest[start:])
      if parsed is not None and not parsed.overwrite:
        command = rest
  info = train_command(command)
  if info is not None and not info.resume:
    command.append("--resume")
  return command


def _saved_steps(directory: str) -> set[tuple[int, float]]:
  """``(step, time)`` of the complete checkpoints in ``directory`` (none when
  it is missing or holds none)."""
  from meshnet.checkpoint import list_checkpoints
  try:
    return {(row["step"], row["time"]) for row in list_checkpoints(directory)}
  except MeshnetError:
    return set()


class _Group:
  """One attempt: ``num_processes`` processes of ``command`` joined on ``port``."""

  def __init__(self, out, verbose: bool):
    self.out, self.verbose = out, verbose
    self.procs: list[subprocess.Popen] = []
    self.pumps: list[threading.Thread] = []

  def start(self, command: Sequence[str], port: int, cores, devices_per_process: int,
            restart: int, stopping: list[int]) -> None:
    """Starts the processes one by one (none more once ``stopping`` is set)."""
    num_processes = len(cores)
    for i in range(num_processes):
      if stopping:
        break
      env = dict(os.environ)
      env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes),
                  ENV_PROCESS_ID: str(i), ENV_DEVICES_PER_PROCESS: str(devices_per_process),
                  ENV_RESTART_COUNT: str(restart), "PYTHONUNBUFFERED": "1"})
      env.update(child_environment(self.verbose))
      pin = None
      if cores[i] is not None:
        env.update(placement_environment(len(cores[i]), env))
        pin = lambda cpus=cores[i]: os.sched_setaffinity(0, cpus)
      try:
        proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=pin)
      except FileNotFoundError:
        for p in self.procs:
          p.kill()
        raise MeshnetError(f"command not found: {command[0]}") from None
      self.procs.append(proc)
      where = "" if cores[i] is None else f", cpus {','.join(map(str, cores[i]))}"
      self.out.write(f"meshnet launch: process {i} started (pid {proc.pid}{where})\n")
      thread = threading.Thread(target=_pump, args=(proc.stdout, i, self.out, self.verbose),
                                daemon=True)
      thread.start()
      self.pumps.append(thread)
    self.out.flush()

  def signal(self, signum: int) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signum)

  def wait(self) -> tuple[int, int] | None:
    """Waits until every process exits 0 (``None``) or one fails: then stops
    the others (SIGTERM, SIGKILL after :data:`GRACE_SECONDS`) and returns
    ``(index, code)`` of the first to fail (a process killed or crashed
    before one that exited :data:`EXIT_PEER_FAILED` because of it)."""
    failed = None
    try:
      while True:
        bad = self._failures()
        if bad:
          if all(c == EXIT_PEER_FAILED for _, c in bad):
            # A survivor of a dead peer exits within a second of it; name the
            # peer (killed, crashed) as the cause once its exit is seen.
            deadline = time.time() + 1.0
            while time.time() < deadline and all(c == EXIT_PEER_FAILED for _, c in bad):
              time.sleep(0.05)
              bad = self._failures()
          failed = min(bad, key=lambda failure: failure[1] == EXIT_PEER_FAILED)
          break
        codes = [p.poll() for p in self.procs]
        if all(c == 0 for c in codes):
          break
        time.sleep(0.05)
      if failed is not None:
        self.signal(signal.SIGTERM)
        deadline = time.time() + GRACE_SECONDS
        while any(p.poll() is None for p in self.procs) and time.time() < deadline:
          time.sleep(0.05)
        for p in self.procs:
          if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    finally:
      for thread in self.pumps:
        thread.join(timeout=5)
    return failed

  def _failures(self) -> list[tuple[int, int]]:
    """``(index, code)`` of every process that has exited non-zero."""
    codes = [p.poll() for p in self.procs]
    return [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]

  def others(self, index: int) -> str:
    return ", ".join(f"{i}: {_describe(p.returncode)}" for i, p in enumerate(self.procs)
                     if i != index)


def launch(num_processes: int, command: Sequence[str], *,
           devices_per_process: int | None = None, cpus_per_process: int | None = None,
           max_restarts: int = 0, verbose: bool = False, out=None) -> int:
  """Runs ``command`` in ``num_processes`` processes; returns the exit status.

  Args:
    num_processes: processes to start.
    command: the command each runs.
    devices_per_process: simulated CPU devices each process brings (default 1).
    cpus_per_process: pin each process to this many cores of its own and set
      its math libraries' thread counts to match (default: no pinning).
    max_restarts: after a process fails (non-zero exit or a signal), stop the
      others and start the whole group again, at most this many times (a
      ``meshnet train`` command continues from its newest checkpoint: see the
      module's docstring). 0 status when a run completes; the last failure's
      when the restarts are used up.
    verbose: relay the libraries' noise too (gloo's connection lines, C++
      warnings); by default it is left out (:mod:`meshnet.noise`).
    out: where the prefixed output goes (default stdout).

  Raises:
    MeshnetError: bad counts, too few cores, or an empty command.
  """
  out = out or sys.stdout
  if num_processes < 1:
    raise MeshnetError(f"-n {num_processes}: need at least one process")
  if devices_per_process is not None and devices_per_process < 1:
    raise MeshnetError(f"--devices-per-process {devices_per_process} must be >= 1")
  if max_restarts < 0:
    raise MeshnetError(f"--max-restarts {max_restarts} must be >= 0 (0: never restart)")
  if not command:
    raise MeshnetError("nothing to launch: give the command after --, e.g. "
                       "meshnet launch -n 2 -- meshnet train")
  cores = (cpu_sets(num_processes, cpus_per_process) if cpus_per_process is not None
           else [None] * num_processes)
  train = train_command(command) if max_restarts else None
  directory = train.checkpoint_dir if train else None
  before = _saved_steps(directory) if directory else set()

  stopping: list[int] = []
  group = _Group(out, verbose)

  def forward(signum, frame):
    del frame
    stopping.append(signum)
    group.signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  ports: list[int] = []
  current = list(command)
  try:
    for restart in range(max_restarts + 1):
      ports.append(free_port(ports))
      group.start(current, ports[-1], cores, devices_per_process or 1, restart, stopping)
      failed = group.wait()
      if failed is None or stopping or restart == max_restarts:
        break
      current, origin = _next_attempt(command, train, directory, before)
      out.write(f"meshnet launch: {_why(*failed)}; restart {restart + 1} of {max_restarts} "
                f"{origin}\n")
      out.flush()
      group = _Group(out, verbose)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  procs = group.procs
  if failed is not None:
    index, code = failed
    used = (f"; restarts used up ({max_restarts} of {max_restarts})"
            if max_restarts and not stopping else "")
    out.write(f"meshnet launch: process {index} failed ({_describe(code)}); stopped the "
              f"others ({group.others(index)}){used}\n")
    out.flush()
    return code if code > 0 else 128 - code
  if stopping:
    return 128 + stopping[0] if any(p.returncode for p in procs) else 0
  if restart:
    out.write(f"meshnet launch: completed after {restart} restart{'s' if restart > 1 else ''}\n")
    out.flush()
  return 0


def _next_attempt(command: Sequence[str], train: TrainCommand | None, directory: str | None,
                  before: set[tuple[int, float]]) -> tuple[list[str], str]:
  """The command of the next attempt, and where it starts from as the restart
  line says it: a ``meshnet train`` command with checkpoints of this job's
  own continues them (``--resume``, no ``--overwrite``); before its first
  save, it runs again as given."""
  if train is None:
    return list(command), "with the same command (not meshnet train: nothing to resume)"
  if directory is None:
    return list(command), "from scratch (the command has no --checkpoint-dir)"
  steps = _saved_steps(directory)
  if not steps - before and not train.resume:
    return list(command), f"from scratch (no checkpoint of this run in {directory} yet)"
  newest = max(step for step, _ in steps) if steps else None
  if newest is None:
    return resume_command(command), f"from scratch (no checkpoint in {directory} yet)"
  return resume_command(command), (f"from the newest checkpoint in {directory} "
                                   f"(step {newest})")
