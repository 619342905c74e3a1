"""Averaging between processes on one host through POSIX shared memory.

A gloo all-reduce between two processes on this machine costs about 2 ms
whatever its size up to ~100k floats, and ~3 ms for an MLP's 567k-float
gradient (``benchmarks/RESULTS.md``): a large share of a data-parallel step
when each process has one core. Processes on one host can instead write
their buffer into a shared segment and each add all of them: one copy in,
one pass to sum, no network stack. :class:`SharedMemoryMean` does that, and
:func:`host_mean` runs it inside a jitted step with ``jax.pure_callback``
(``meshnet train --grad-transport shm``).

Protocol for the ``g``-th call: wait until every process has finished
reading call ``g - 1``; copy this process's buffer into its slot; publish
``arrived = g``; wait until every process has arrived; sum the slots in
process order (so every process computes the same bits, and the result does
not depend on which process is fastest); publish ``done = g``. Each flag
has one writer and sits on its own cache line; x86-64 keeps stores in order,
so a reader that sees a flag sees the data written before it. A process
that waits longer than ``timeout`` seconds raises instead of hanging.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Callable

import numpy as np

from meshnet.errors import MeshnetError

_LINE = 64  # bytes: one flag per cache line
_SPIN_S = 1e-3  # busy-wait this long before sleeping between looks


def segment_name(key: str) -> str:
  """A short POSIX shared-memory name for ``key`` (e.g. the coordinator address)."""
  return "meshnet-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class SharedMemoryMean:
  """Mean of one array over ``size`` processes on this host.

  Build it in every process with the same ``name`` and ``nbytes`` (the
  largest buffer it will average); process ``rank`` 0 creates the segment
  with :meth:`create` before the others :meth:`attach` (a barrier between
  the two), then :meth:`unlink` once all have attached: the mapping lives
  on, and nothing is left behind if a process dies.
  """

  def __init__(self, segment: shared_memory.SharedMemory, rank: int, size: int,
               nbytes: int, timeout: float):
    self._segment, self.rank, self.size, self.nbytes = segment, rank, size, nbytes
    self.timeout = timeout
    flags = np.ndarray((2 * size * _LINE // 8,), np.int64, segment.buf, 0)
    self._arrived = flags[0:size * _LINE // 8:_LINE // 8]
    self._done = flags[size * _LINE // 8::_LINE // 8]
    # Next to each process's ``arrived`` flag: the byte count and dtype of
    # what it brought, checked against every peer's (the exchanges of one
    # step must pair up, bucket for bucket).
    self._what = np.ndarray((size, _LINE // 8), np.int64, segment.buf, 0)[:, 1:3]
    self._data_offset = 2 * size * _LINE
    self._calls = 0

  @staticmethod
  def _bytes(size: int, nbytes: int) -> int:
    return 2 * size * _LINE + size * nbytes

  @classmethod
  def create(cls, name: str, rank: int, size: int, nbytes: int,
             timeout: float = 300.0) -> "SharedMemoryMean":
    _check_platform()
    try:  # a segment left by a run that died before unlinking it
      stale = shared_memory.SharedMemory(name=name)
      stale.close()
      stale.unlink()
    except FileNotFoundError:
      pass
    segment = shared_memory.SharedMemory(name=name, create=True,
                                         size=cls._bytes(size, nbytes))
    np.ndarray((2 * size * _LINE // 8,), np.int64, segment.buf, 0)[:] = 0
    return cls(segment, rank, size, nbytes, timeout)

  @classmethod
  def attach(cls, name: str, rank: int, size: int, nbytes: int,
             timeout: float = 300.0) -> "SharedMemoryMean":
    _check_platform()
    try:
      segment = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
      raise MeshnetError(
          f"shared memory segment {name} not found: the processes of a data-parallel group "
          "are not on one host: use the default --grad-transport xla") from None
    # Python < 3.13 registers attached segments for deletion at exit: the
    # creator owns it.
    resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001
    if segment.size < cls._bytes(size, nbytes):
      raise MeshnetError(f"shared memory segment {name} is {segment.size} bytes, "
                         f"expected {cls._bytes(size, nbytes)}: another run uses its name")
    return cls(segment, rank, size, nbytes, timeout)

  def unlink(self) -> None:
    """Removes the segment's name (mappings stay valid). Creator only."""
    try:
      self._segment.unlink()
    except FileNotFoundError:
      pass

  def _slot(self, rank: int, dtype: Any, count: int) -> np.ndarray:
    return np.ndarray((count,), dtype, self._segment.buf,
                      self._data_offset + rank * self.nbytes)

  def _wait(self, flags: np.ndarray, value: int, what: str) -> None:
    start = time.monotonic()
    while True:
      if int(flags.min()) >= value:
        return
      waited = time.monotonic() - start
      if waited > self.timeout:
        late = [r for r in range(self.size) if flags[r] < value]
        raise MeshnetError(
            f"shared-memory gradient mean: process(es) {late} did not {what} within "
            f"{self.timeout:g} s (a peer died or hangs); rerun, or drop --grad-transport shm")
      if waited > _SPIN_S:
        time.sleep(5e-5)
      else:
        os.sched_yield()

  def __call__(self, x: np.ndarray) -> np.ndarray:
    """The mean of ``x`` over the processes (every process gets the same bits)."""
    x = np.ascontiguousarray(x)
    flat = x.reshape(-1)
    if flat.nbytes > self.nbytes:
      raise MeshnetError(f"buffer of {flat.nbytes} bytes exceeds the shared segment's "
                         f"{self.nbytes}")
    self._calls += 1
    g = self._calls
    self._wait(self._done, g - 1, "finish the previous exchange")
    self._slot(self.rank, flat.dtype, flat.size)[:] = flat
    self._what[self.rank] = (flat.nbytes, flat.dtype.num)
    self._arrived[self.rank] = g
    self._wait(self._arrived, g, "arrive")
    if (self._what != self._what[self.rank]).any():
      raise MeshnetError(
          f"shared-memory gradient mean: exchange {g} pairs buffers of different sizes or "
          f"dtypes across processes ({self._what.tolist()}); the processes do not run "
          "the same program: drop --grad-transport shm")
    total = self._slot(0, flat.dtype, flat.size).copy()
    for r in range(1, self.size):
      total += self._slot(r, flat.dtype, flat.size)
    self._done[self.rank] = g
    total /= np.asarray(self.size, flat.dtype)
    return total.reshape(x.shape)


def _check_platform() -> None:
  if platform.machine().lower() not in ("x86_64", "amd64"):
    raise MeshnetError(
        f"--grad-transport shm relies on x86-64 store ordering; this host is "
        f"{platform.machine()}: use the default transport")


def host_mean(group: SharedMemoryMean) -> Callable:
  """``x -> mean over the group's processes`` for use inside ``shard_map``
  (one device per process). The result is typed as invariant over the
  mesh, which it is: every process computes the same sum."""
  import jax

  def mean(x, axis_name=None):
    del axis_name
    return jax.pure_callback(group, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

  return mean


def make_host_mean(mesh: Any, axis: str, nbytes: int, timeout: float = 300.0) -> Callable:
  """Sets up the shared segments for averaging over ``axis`` of ``mesh`` and
  returns the in-``shard_map`` mean (see :func:`host_mean`).

  Every process must call it (it synchronises them). Each process must own
  exactly one device of ``mesh``; the processes that differ only in their
  ``axis`` coordinate share one segment, and must be on one host.

  Raises:
    MeshnetError: a single process, several devices per process, processes
      of one group on different hosts, or a non-x86-64 host.
  """
  import socket

  import jax
  from jax.experimental import multihost_utils

  _check_platform()
  devices = np.asarray(mesh.devices)
  mine = [idx for idx, d in np.ndenumerate(devices) if d.process_index == jax.process_index()]
  if jax.process_count() == 1 or len(mine) != 1 or devices.size != jax.process_count():
    raise MeshnetError(
        f"--grad-transport shm averages between processes on one host, one device per "
        f"process; this run has {jax.process_count()} process(es) and {len(mine)} of the "
        f"mesh's {devices.size} devices in this one: use meshnet launch -n N "
        "(default one device per process), or the default transport")
  (coords,) = mine
  axis_index = list(mesh.axis_names).index(axis)
  rank, size = coords[axis_index], devices.shape[axis_index]
  group = tuple(c for i, c in enumerate(coords) if i != axis_index)
  token = multihost_utils.broadcast_one_to_all(
      np.frombuffer(os.urandom(8), np.int64)[0] if jax.process_index() == 0 else np.int64(0))
  host = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:7], "big")
  hosts = np.asarray(multihost_utils.process_allgather(np.int64(host)))
  peers = [devices[tuple(c)].process_index for c in np.ndindex(*devices.shape)
           if tuple(c[i] for i in range(len(c)) if i != axis_index) == group]
  if len({int(hosts[p]) for p in peers}) != 1:
    raise MeshnetError("--grad-transport shm needs every process of a data-parallel group "
                       "on one host; these are on several: use the default transport")
  name = segment_name(f"{int(token)}-{group}")
  if rank == 0:
    mean = SharedMemoryMean.create(name, rank, size, nbytes, timeout)
  multihost_utils.sync_global_devices(f"meshnet shm create {name}")
  if rank != 0:
    mean = SharedMemoryMean.attach(name, rank, size, nbytes, timeout)
  multihost_utils.sync_global_devices(f"meshnet shm attach {name}")
  if rank == 0:
    mean.unlink()
  return host_mean(mean)
