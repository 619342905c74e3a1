"""Joining several processes (hosts) into one JAX runtime, and logging from them.

Every process runs the same program; :func:`initialize` connects them with
``jax.distributed`` so that ``jax.devices()`` lists every process's devices
and one mesh spans them all. Where the settings come from, first match wins:

1. explicit arguments;
2. ``MESHNET_COORDINATOR`` (host:port), ``MESHNET_NUM_PROCESSES``,
   ``MESHNET_PROCESS_ID`` (set by ``meshnet launch``);
3. JAX's own cluster detection (TPU pod slices, SLURM, Open MPI) when such a
   cluster with more than one process is seen;
4. otherwise: one process, nothing to do.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import jax

from meshnet.errors import MeshnetError

# jax's defaults are 300 s to wait for peers and 100 s of missed heartbeats
# before a dead peer is noticed; a training job should fail faster than that.
DEFAULT_INITIALIZATION_TIMEOUT = 90
DEFAULT_HEARTBEAT_TIMEOUT = 30
ENV_COORDINATOR = "MESHNET_COORDINATOR"
ENV_NUM_PROCESSES = "MESHNET_NUM_PROCESSES"
ENV_PROCESS_ID = "MESHNET_PROCESS_ID"
ENV_DEVICES_PER_PROCESS = "MESHNET_DEVICES_PER_PROCESS"


def _cluster_detected() -> bool:
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID")
  return bool(hosts and "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def multi_process_requested() -> bool:
  """Whether this process was started as one of several: ``MESHNET_*``
  variables for more than one process, or a SLURM / Open MPI / TPU pod job
  of several (what :func:`initialize` joins). Reads the environment only."""
  try:
    count = _env_int(ENV_NUM_PROCESSES)
  except MeshnetError:
    return False  # initialize() reports it
  if count is not None:
    return count > 1
  return _cluster_detected()


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise MeshnetError(f"{name}={value!r} is not an integer") from None


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None,
    process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
    initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT,
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
) -> bool:
  """Joins this process to the others; returns whether it runs multi-process.

  Safe to call with one process (then it does nothing) and to call twice.
  Must run before JAX computes anything. On CPU, collectives go over gloo.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator.
    num_processes: how many processes take part.
    process_id: this process's index, ``0 .. num_processes - 1``.
    local_device_ids: the local devices this process uses (default all).
    initialization_timeout: seconds to wait for every peer to arrive.
    heartbeat_timeout: seconds without a peer's heartbeat before the job is
      stopped (a dead or hung peer ends the others within about this long).

  Raises:
    MeshnetError: partial or invalid settings (names what is missing).
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise MeshnetError(
        f"multi-process settings are incomplete: coordinator={coordinator_address}, "
        f"num_processes={num_processes}, process_id={process_id}; set all three (or "
        f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
  if num_processes == 1 or (num_processes is None and not _cluster_detected()):
    return False
  if process_id is not None and not 0 <= process_id < num_processes:
    raise MeshnetError(f"process_id={process_id} must be in [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout,
  )
  return jax.process_count() > 1


def log(message: str, *, all_processes: bool = True) -> None:
  """Prints ``message`` prefixed with this process's index (``[process 1/2]``);
  with ``all_processes=False`` only process 0 prints."""
  index, count = jax.process_index(), jax.process_count()
  if not all_processes and index != 0:
    return
  prefix = f"[process {index}/{count}] " if count > 1 else ""
  print(prefix + message, file=sys.stderr, flush=True)
