"""meshnet.hostcall (a Python function as an XLA FFI target) and the
shared-memory sum it carries (meshnet.shm), checked against NumPy."""

import multiprocessing
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meshnet import shm
from meshnet.hostcall import host_call


def _like(*arrays):
  return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]


def test_host_call_sees_xla_buffers_of_every_dtype_and_shape():
  seen = []

  def double(operands, results):
    seen.append([(a.dtype, a.shape) for a in operands])
    for a, out in zip(operands, results):
      out[...] = a * 2 if a.dtype != np.bool_ else ~a

  call = host_call(double, "test_double")
  inputs = [jnp.arange(6, dtype=jnp.float32).reshape(2, 3), jnp.asarray(1.5, jnp.bfloat16),
            jnp.arange(5, dtype=jnp.int32), jnp.zeros((0, 4), jnp.float32),
            jnp.asarray([True, False]), jnp.ones((3, 1, 2), jnp.float16)]
  out = jax.jit(lambda *xs: call(_like(*xs), *xs))(*inputs)
  assert len(out) == len(inputs)
  for got, x in zip(out, inputs):
    assert got.shape == x.shape and got.dtype == x.dtype
    want = ~np.asarray(x) if x.dtype == jnp.bool_ else np.asarray(x) * 2
    np.testing.assert_array_equal(np.asarray(got), want)
  assert seen[-1][1] == (np.dtype(jnp.bfloat16), ())


def test_host_call_error_fails_the_program_with_its_message():
  def broken(operands, results):
    raise ValueError("peer 3 never arrived")

  call = host_call(broken, "test_broken")
  x = jnp.ones(4)
  with pytest.raises(Exception, match="ValueError: peer 3 never arrived"):
    jax.block_until_ready(jax.jit(lambda x: call(_like(x), x)[0] + 1)(x))


def test_host_call_inside_shard_map_runs_once_per_device_on_its_shard():
  """Each device calls with its own shard; the results are typed invariant
  (the caller's promise), so out_specs P() takes device 0's."""
  calls = []

  def total(operands, results):
    calls.append(float(operands[0].sum()))
    results[0][...] = operands[0].sum()

  call = host_call(total, "test_total")
  mesh = jax.make_mesh((2,), ("data",))
  x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("data")))
  f = jax.jit(jax.shard_map(lambda x: call(_like(x.sum()), x)[0], mesh=mesh,
                            in_specs=P("data"), out_specs=P()))
  out = jax.block_until_ready(f(x))  # every device's run, not only the shard read
  assert float(out) == 6.0  # device 0: 0 + 1 + 2 + 3
  assert sorted(calls) == [6.0, 22.0]


def _sum_worker(name, rank, size, seed, queue):
  rng = np.random.default_rng(seed + rank)
  arrays = [rng.standard_normal(1001).astype(np.float32),
            rng.standard_normal((3, 7)).astype(np.float32),
            np.asarray(rng.standard_normal(), np.float32),  # one element: some shares empty
            np.zeros((0,), np.float32),
            rng.standard_normal(17).astype(jnp.bfloat16),
            rng.integers(-5, 5, 9).astype(np.int32)]
  nbytes = shm.slot_bytes([(a.shape, a.dtype) for a in arrays])
  if rank == 0:
    group = shm.SharedMemoryMean.create(name, rank, size, nbytes, timeout=60)
    queue.put("created")
  else:
    group = None
    while group is None:
      try:
        group = shm.SharedMemoryMean.attach(name, rank, size, nbytes, timeout=60)
      except Exception:  # noqa: BLE001 - not created yet
        import time
        time.sleep(0.01)
  results = []
  for step in range(3):  # the same layout again: the cached plan, new values
    inputs = [a + step if a.dtype != np.int32 else a * (step + 1) for a in arrays]
    out = [np.empty_like(a) for a in inputs]
    group.sum_into(inputs, out)
    results.append([o.tobytes() for o in out])
  queue.put((rank, results))


@pytest.mark.parametrize("size", [2, 3])
def test_shared_memory_sum_adds_in_process_order_in_every_process(tmp_path, size):
  """Real processes: each sums its share of every array; all get the bits
  of ``x_0 + x_1 + ...`` added in process order, for odd sizes, an empty
  array, a scalar (shares of zero elements), bfloat16 and int32."""
  name = shm.segment_name(f"{tmp_path}-{size}")
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  procs = [ctx.Process(target=_sum_worker, args=(name, r, size, 7, queue))
           for r in range(size)]
  for p in procs:
    p.start()
  try:
    got = {}
    for _ in range(size + 1):
      item = queue.get(timeout=120)
      if item != "created":
        got[item[0]] = item[1]
  finally:
    for p in procs:
      p.join(timeout=60)
    try:
      from multiprocessing import shared_memory
      segment = shared_memory.SharedMemory(name=name)
      segment.close()
      segment.unlink()
    except FileNotFoundError:
      pass
  assert sorted(got) == list(range(size))
  per_rank = []
  for rank in range(size):
    rng = np.random.default_rng(7 + rank)
    per_rank.append([rng.standard_normal(1001).astype(np.float32),
                     rng.standard_normal((3, 7)).astype(np.float32),
                     np.asarray(rng.standard_normal(), np.float32), np.zeros((0,), np.float32),
                     rng.standard_normal(17).astype(jnp.bfloat16),
                     rng.integers(-5, 5, 9).astype(np.int32)])
  for step in range(3):
    for i in range(6):
      terms = [a[i] + step if a[i].dtype != np.int32 else a[i] * (step + 1) for a in per_rank]
      want = terms[0] + terms[1]
      for more in terms[2:]:
        want = want + more
      for rank in range(size):
        assert got[rank][step][i] == np.asarray(want, terms[0].dtype).tobytes(), (rank, step, i)
  assert all(p.exitcode == 0 for p in procs)
  assert not [n for n in os.listdir("/dev/shm") if n == name.lstrip("/")]
