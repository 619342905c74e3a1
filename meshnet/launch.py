"""``meshnet launch -n N -- CMD``: N processes on this host, joined like torchrun.

Each process gets ``MESHNET_COORDINATOR`` (a free local port),
``MESHNET_NUM_PROCESSES``, ``MESHNET_PROCESS_ID`` and
``MESHNET_DEVICES_PER_PROCESS`` (``--devices-per-process K``, default 1: one
simulated CPU device per process, like one GPU per torchrun rank; ignored on
accelerators). ``--cpus-per-process K`` pins process ``i`` to its own ``K``
cores (``sched_setaffinity``) and sets the math libraries' thread counts
(``OMP_NUM_THREADS`` ...) to ``K``, as torchrun sets ``OMP_NUM_THREADS``. Output lines are prefixed with ``[i]``; third-party noise (gloo's
connection lines, C++ warnings) is left out unless ``--verbose``
(:mod:`meshnet.noise`). SIGINT and SIGTERM are forwarded to every process. When a process fails, the others are stopped
(SIGTERM, then SIGKILL after a grace period) and the launcher exits with the
failing process's code and a one-line summary: jax's own handling of a dead
peer is to let the survivors wait for its heartbeat timeout and then abort.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from meshnet.distributed import (
    ENV_COORDINATOR, ENV_DEVICES_PER_PROCESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID,
)
from meshnet.errors import MeshnetError
from meshnet.noise import child_environment, is_noise

GRACE_SECONDS = 10.0
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f"signal {signal.Signals(-code).name}"
    except ValueError:
      return f"signal {-code}"
  return f"exit code {code}"


def _pump(stream, index: int, out, verbose: bool) -> None:
  """Relays a child's output, each line prefixed with ``[index]``, leaving
  out third-party noise unless ``verbose`` (:func:`meshnet.noise.is_noise`)."""
  for line in iter(stream.readline, ""):
    if verbose or not is_noise(line):
      out.write(f"[{index}] {line}")
      out.flush()
  stream.close()


def launch(num_processes: int, command: Sequence[str], *,
           devices_per_process: int | None = None, cpus_per_process: int | None = None,
           verbose: bool = False, out=None) -> int:
  """Runs ``command`` in ``num_processes`` processes; returns the exit status.

  Args:
    num_processes: processes to start.
    command: the command each runs.
    devices_per_process: simulated CPU devices each process brings (default 1).
    cpus_per_process: pin each process to this many cores of its own and set
      its math libraries' thread counts to match (default: no pinning).
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
  if not command:
    raise MeshnetError("nothing to launch: give the command after --, e.g. "
                       "meshnet launch -n 2 -- meshnet train")
  cores = (cpu_sets(num_processes, cpus_per_process) if cpus_per_process is not None
           else [None] * num_processes)
  port = free_port()
  procs: list[subprocess.Popen] = []
  pumps = []
  for i in range(num_processes):
    env = dict(os.environ)
    env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes),
                ENV_PROCESS_ID: str(i), "PYTHONUNBUFFERED": "1"})
    env[ENV_DEVICES_PER_PROCESS] = str(devices_per_process or 1)
    env.update(child_environment(verbose))
    pin = None
    if cores[i] is not None:
      env.update({name: str(len(cores[i])) for name in THREAD_VARIABLES})
      pin = lambda cpus=cores[i]: os.sched_setaffinity(0, cpus)
    try:
      proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              preexec_fn=pin)
    except FileNotFoundError:
      for p in procs:
        p.kill()
      raise MeshnetError(f"command not found: {command[0]}") from None
    procs.append(proc)
    where = "" if cores[i] is None else f", cpus {','.join(map(str, cores[i]))}"
    out.write(f"meshnet launch: process {i} started (pid {proc.pid}{where})\n")
    thread = threading.Thread(target=_pump, args=(proc.stdout, i, out, verbose),
                              daemon=True)
    thread.start()
    pumps.append(thread)
  out.flush()

  forwarded: list[int] = []

  def forward(signum, frame):
    del frame
    forwarded.append(signum)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  failed: tuple[int, int] | None = None
  try:
    while True:
      codes = [p.poll() for p in procs]
      bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if bad and failed is None:
        failed = bad[0]
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(0.05)
    if failed is not None:
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGTERM)
      deadline = time.time() + GRACE_SECONDS
      while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
      for p in procs:
        if p.poll() is None:
          os.killpg(p.pid, signal.SIGKILL)
          p.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for thread in pumps:
      thread.join(timeout=5)
  if failed is not None:
    index, code = failed
    others = ", ".join(f"{i}: {_describe(p.returncode)}" for i, p in enumerate(procs)
                       if i != index)
    out.write(f"meshnet launch: process {index} failed ({_describe(code)}); stopped the "
              f"others ({others})\n")
    out.flush()
    return code if code > 0 else 128 - code
  if forwarded:
    return 128 + forwarded[0] if any(p.returncode for p in procs) else 0
  return 0
