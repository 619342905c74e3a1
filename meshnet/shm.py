"""Averaging between processes on one host through POSIX shared memory.

A gloo all-reduce between two processes on this machine costs about 2 ms
whatever its size up to ~100k floats, and ~3 ms for an MLP's 567k-float
gradient (``benchmarks/RESULTS.md``): a large share of a data-parallel step
when each process has one core. Processes on one host can instead write
their buffer into a shared segment and each add all of them: with no
network stack. :class:`SharedMemoryMean` does that, and :func:`host_mean`
runs it inside a jitted step through XLA's FFI (:mod:`meshnet.hostcall`;
``meshnet train --grad-transport shm``).

Protocol for the ``g``-th call, in process ``r`` of ``n`` (each array is
cut into ``n`` contiguous shares; process ``r`` sums share ``r``): copy
the shares the others sum into this process's input slot; publish
``arrived = g``; wait until every process has arrived; sum share ``r`` of
every array in process order (its own values read in place, the others'
from their slots; so every process gets the same bits, whichever is
fastest), into the result and the shared result region; publish ``summed
= g``; wait until every process has summed; copy the other shares from the
result region. Passing the ``arrived`` barrier of call ``g`` means every
peer finished reading call ``g - 1``'s result region, and passing the
``summed`` one that they finished reading the input slots, so no other
wait is needed. Each flag has one writer and sits on its own cache line;
x86-64 keeps stores in order, so a reader that sees a flag sees the data
written before it. A process that waits longer than ``timeout`` seconds
raises instead of hanging.

Per process and call this moves ``(n - 1) / n`` of the bytes in, sums
``1 / n`` of them and reads ``(n - 1) / n`` back: at ``n = 2`` about 0.3 ms
for the 567k-float gradient of ``benchmarks/ddp.py``'s MLP, where summing
everything in every process took twice that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import threading
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Callable, Sequence

import numpy as np

from meshnet.errors import MeshnetError

_LINE = 64  # bytes: one flag per cache line
_SPIN_S = 1e-3  # busy-wait this long before sleeping between looks


_ONE_PER_RUN = (
    "shared-memory gradient mean: two exchanges of one group {what}; XLA may run "
    "independent calls of a program at once and in another order in each process, which "
    "would pair different exchanges: average the whole tree with one mean(tree) call per "
    "program (not one per leaf, nor one per loop iteration)")


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
    self._summed = flags[size * _LINE // 8::_LINE // 8]
    # Next to each process's ``arrived`` flag: the byte count and a digest
    # of the shapes and dtypes it brought, checked against every peer's
    # (the exchanges of one step must pair up).
    self._what = np.ndarray((size, _LINE // 8), np.int64, segment.buf, 0)[:, 1:3]
    self._data_offset = 2 * size * _LINE  # then size input slots, then the results
    self._calls = 0
    self._plans: dict[tuple, _Plan] = {}
    self._busy = threading.Lock()  # one exchange at a time in this process
    self._last_run: int | None = None  # the program run of the last exchange

  @staticmethod
  def _bytes(size: int, nbytes: int) -> int:
    return 2 * size * _LINE + (size + 1) * nbytes

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
    out = np.empty_like(x)
    self.sum_into([x], [out])
    return out / np.asarray(self.size, out.dtype)

  def sum_into(self, arrays: Sequence[np.ndarray], out: Sequence[np.ndarray],
               run: int | None = None) -> None:
    """Writes into ``out[i]`` the sum of ``arrays[i]`` over the processes,
    added in process order, for every ``i`` in one exchange (any shapes and
    dtypes, the same in every process; ``out[i]`` contiguous, like
    ``arrays[i]``).

    Exchanges pair up by their order in each process, so the processes must
    make them one at a time in the same order. XLA runs independent calls
    of one program on several threads, in an order that differs between
    processes, so the caller passes ``run`` (:func:`meshnet.hostcall.run_id`)
    and a second exchange of one program run raises MeshnetError in every
    process, as does a call while another runs in this process.
    """
    if not self._busy.acquire(blocking=False):
      raise MeshnetError(_ONE_PER_RUN.format(what="ran at once in this process"))
    try:
      if run is not None and run == self._last_run:
        raise MeshnetError(_ONE_PER_RUN.format(what="ran in one program run"))
      self._last_run = run
      self._exchange(arrays, out)
    finally:
      self._busy.release()

  def _exchange(self, arrays: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None:
    """:meth:`sum_into`'s protocol (see the module docstring)."""
    _check_out(arrays, out)
    plan = self._plan(arrays)
    self._calls += 1
    g, r = self._calls, self.rank
    flats = [a.reshape(-1) for a in arrays]
    outs = [o.reshape(-1) for o in out]
    for a, sends in zip(flats, plan.sends):  # the shares the others sum
      for lo, hi, slot in sends:
        np.copyto(slot, a[lo:hi])
    self._what[r] = (plan.end, plan.signature)
    self._arrived[r] = g
    self._wait(self._arrived, g, "arrive")
    if (self._what != self._what[r]).any():
      raise MeshnetError(
          f"shared-memory gradient mean: exchange {g} pairs buffers of different sizes or "
          f"dtypes across processes ({self._what.tolist()}); the processes do not run "
          "the same program: drop --grad-transport shm")
    for a, o, (lo, hi), parts, result in zip(flats, outs, plan.mine, plan.parts, plan.results):
      mine = o[lo:hi]
      terms = [a[lo:hi] if part is None else part for part in parts]
      if len(terms) == 1:
        np.copyto(mine, terms[0])
      else:
        np.add(terms[0], terms[1], out=mine)
        for more in terms[2:]:  # in process order: the same bits everywhere
          mine += more
      np.copyto(result, mine)
    self._summed[r] = g
    self._wait(self._summed, g, "sum its share")
    for o, receives in zip(outs, plan.receives):
      for lo, hi, result in receives:
        np.copyto(o[lo:hi], result)

  def _plan(self, arrays: Sequence[np.ndarray]) -> "_Plan":
    """Where every share of these arrays goes (cached per shapes and dtypes:
    a train step exchanges the same arrays every call)."""
    key = tuple((a.dtype.str, a.dtype.name, a.shape) for a in arrays)  # see _signature
    plan = self._plans.get(key)
    if plan is not None:
      return plan
    offsets, end = _offsets(arrays)
    if end > self.nbytes:
      raise MeshnetError(f"buffers of {end} bytes exceed the shared segment's {self.nbytes}")
    r, n = self.rank, self.size
    plan = _Plan(end, _signature(arrays), [], [], [], [], [])
    for a, offset in zip(arrays, offsets):
      flat = a.reshape(-1)
      slots = [self._view(q, flat, offset) for q in range(n + 1)]  # inputs, then results
      shares = [_share(flat.size, q, n) for q in range(n)]
      plan.sends.append([(lo, hi, slots[r][lo:hi]) for q, (lo, hi) in enumerate(shares)
                         if q != r])
      lo, hi = shares[r]
      plan.mine.append((lo, hi))
      plan.parts.append([None if q == r else slots[q][lo:hi] for q in range(n)])
      plan.results.append(slots[n][lo:hi])
      plan.receives.append([(lo, hi, slots[n][lo:hi]) for q, (lo, hi) in enumerate(shares)
                            if q != r])
    self._plans[key] = plan
    return plan

  def _view(self, slot: int, like: np.ndarray, offset: int) -> np.ndarray:
    """``like``'s place in ``slot`` (a process's inputs; ``size``: the results)."""
    return np.ndarray(like.shape, like.dtype, self._segment.buf,
                      self._data_offset + slot * self.nbytes + offset)


@dataclasses.dataclass
class _Plan:
  """One exchange's layout, from one process's side: per array, the
  ``(lo, hi, slot view)`` s it copies in for the others, its own share
  ``(lo, hi)``, the share's terms in process order (``None``: its own
  values, read in place), the share's place in the result region, and the
  ``(lo, hi, result view)`` s it copies out."""

  end: int
  signature: int
  sends: list
  mine: list
  parts: list
  results: list
  receives: list


def _check_out(arrays: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None:
  """Refuses ``out`` that cannot take ``arrays``' sums in place (a reshape of
  a non-contiguous array would copy, and the sum would be lost)."""
  if len(out) != len(arrays):
    raise MeshnetError(f"sum_into got {len(arrays)} arrays and {len(out)} outputs: "
                       "pass one output per array")
  for i, (a, o) in enumerate(zip(arrays, out)):
    if o.shape != a.shape or o.dtype != a.dtype or not o.flags.c_contiguous:
      raise MeshnetError(
          f"sum_into output {i} is {o.dtype}{list(o.shape)}"
          f"{'' if o.flags.c_contiguous else ' (not contiguous)'}, its array "
          f"{a.dtype}{list(a.shape)}: pass a contiguous output of the array's shape and dtype")


def _share(count: int, share: int, size: int) -> tuple[int, int]:
  """Elements ``[lo, hi)`` of a ``count``-element array that process
  ``share`` of ``size`` sums."""
  return count * share // size, count * (share + 1) // size


def _offsets(arrays: Sequence[np.ndarray]) -> tuple[list[int], int]:
  """Each array's byte offset in a slot (64-byte aligned), and the end."""
  offsets, end = [], 0
  for a in arrays:
    offsets.append(end)
    end += -(-a.nbytes // _LINE) * _LINE
  return offsets, end


def slot_bytes(shapes_dtypes: Sequence[tuple[Sequence[int], Any]]) -> int:
  """Bytes one process's slot needs for one exchange of arrays of these
  ``(shape, dtype)`` s (see :meth:`SharedMemoryMean.sum_into`)."""
  return sum(-(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // _LINE)
             * _LINE for shape, dtype in shapes_dtypes)


def _signature(arrays: Sequence[np.ndarray]) -> int:
  """A number that differs, almost surely, between two lists of arrays of
  other sizes or dtypes (the same in every process: no salted hashing)."""
  layout = [(a.dtype.str, a.dtype.name, a.shape) for a in arrays]  # name: 8-bit floats share str
  digest = hashlib.sha256(repr(layout).encode()).digest()
  return int.from_bytes(digest[:7], "big")


def _check_platform() -> None:
  if platform.machine().lower() not in ("x86_64", "amd64"):
    raise MeshnetError(
        f"--grad-transport shm relies on x86-64 store ordering; this host is "
        f"{platform.machine()}: use the default transport")


def host_mean(group: SharedMemoryMean) -> Callable:
  """``tree -> mean over the group's processes`` for use inside ``shard_map``
  (one device per process): one exchange for every leaf, through
  :func:`meshnet.hostcall.host_call` (XLA's buffers, no copies but the
  exchange's own). The result is typed as invariant over the mesh, which it
  is: every process computes the same sum.

  Call ``mean`` once per compiled program, with everything to average:
  XLA may run two independent calls of one program at once, or in another
  order in each process, and the processes would then pair different
  exchanges, so a program run that makes a second exchange fails with
  MeshnetError (:meth:`SharedMemoryMean.sum_into`)."""
  import jax
  import jax.numpy as jnp

  from meshnet.hostcall import host_call, run_id

  def exchange(operands, results):
    group.sum_into(operands, results, run=run_id())

  call = host_call(exchange, "shm_sum")

  def mean(tree, axis_name=None):
    del axis_name
    leaves, treedef = jax.tree.flatten(tree)
    sums = call([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves], *leaves)
    # Divided here, where XLA fuses it into what reads the mean.
    return jax.tree.unflatten(treedef, [s / jnp.asarray(group.size, s.dtype) for s in sums])

  return mean


def make_host_mean(mesh: Any, axis: str, nbytes: int, timeout: float = 300.0) -> Callable:
  """Sets up the shared segments for averaging over ``axis`` of ``mesh`` and
  returns the in-``shard_map`` mean (see :func:`host_mean`): ``nbytes`` is
  what one process brings to an exchange (:func:`slot_bytes`). Every
  process must call it (it synchronises them); see :func:`make_group`."""
  return host_mean(make_group(mesh, axis, nbytes, timeout))


def make_group(mesh: Any, axis: str, nbytes: int, timeout: float = 300.0) -> SharedMemoryMean:
  """This process's :class:`SharedMemoryMean` for averaging over ``axis`` of
  ``mesh`` (its segment set up, named, attached by every peer and unlinked).

  Every process must call it (it synchronises them). Each process must own
  exactly one device of ``mesh``; the processes that differ only in their
  ``axis`` coordinate share one segment, and must be on one host.

  Raises:
    MeshnetError: devices other than CPUs, a single process, several
      devices per process, processes of one group on different hosts, or a
      non-x86-64 host.
  """
  import socket

  import jax
  from jax.experimental import multihost_utils

  _check_platform()
  devices = np.asarray(mesh.devices)
  platforms = sorted({d.platform for d in devices.flat})
  if platforms != ["cpu"]:
    raise MeshnetError(
        f"--grad-transport shm averages CPU processes' gradients in host memory; this "
        f"mesh's devices are {platforms}: use the default --grad-transport xla (NCCL/ICI)")
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
  return mean
