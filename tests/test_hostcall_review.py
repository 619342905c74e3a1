"""Hostile checks of meshnet.hostcall (a Python function as an XLA FFI
target) and the shared-memory exchange it carries (meshnet.shm): every
dtype XLA can hand over, failures and odd programs, the two-barrier
protocol under hundreds of back-to-back exchanges of changing layouts in
real processes, two exchanges in one program, and real training runs
(three processes; a peer killed mid-run)."""

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multiprocessing import shared_memory

import meshnet
from meshnet import checkpoint, shm
from meshnet.hostcall import host_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(meshnet.__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV["PYTHONPATH"] = ROOT
MESHNET = [sys.executable, "-m", "meshnet"]
TRAIN = ["train", "--no-progress", "--eval-every", "0", "--log-every", "10"]


def _like(*arrays):
  return [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in arrays]


def _identity(operands, results):
  for a, out in zip(operands, results):
    out[...] = a


def _segments():
  return {n for n in os.listdir("/dev/shm") if n.startswith("meshnet-")}


def _unlink(name):
  try:
    segment = shared_memory.SharedMemory(name=name)
  except FileNotFoundError:
    return
  segment.close()
  segment.unlink()


# --- the FFI handler ------------------------------------------------------


def test_host_call_passes_every_viewable_dtype_bit_for_bit_and_refuses_the_rest():
  call = jax.jit(lambda *xs: host_call(_identity, "review_id")(_like(*xs), *xs))
  ramp = jnp.arange(7, dtype=jnp.float32) * 0.37 - 1
  inputs = [ramp.astype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn,
                                     jnp.float8_e5m2, jnp.float8_e4m3fnuz)]
  inputs += [jnp.arange(-3, 4, dtype=jnp.int8), jnp.arange(7, dtype=jnp.uint32) * 2**29,
             jnp.asarray([True, False, True]), jnp.arange(3) * (1 + 2j),
             jnp.asarray(2.5), jnp.zeros((0, 5)), jnp.zeros((3, 0, 2), jnp.int16)]
  outs = call(*inputs)
  for got, want in zip(outs, inputs):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), want.dtype
  with pytest.raises(meshnet.MeshnetError, match=r"operand 1 is int4, which it cannot pass"):
    call(jnp.ones(2), jnp.ones(2, jnp.int4))
  bad_result = host_call(_identity, "review_bad_result")
  with pytest.raises(meshnet.MeshnetError, match=r"result 0 is uint4"):
    jax.jit(lambda x: bad_result([jax.ShapeDtypeStruct((2,), jnp.uint4)], x))(jnp.ones(2))


def test_host_call_with_many_operands_in_loops_branches_and_two_programs():
  call = host_call(_identity, "review_many")
  xs = [jnp.full((i % 5, 3), i, jnp.float32) for i in range(130)]
  outs = jax.jit(lambda *xs: call(_like(*xs), *xs))(*xs)
  assert all(np.array_equal(o, x) for o, x in zip(outs, xs))
  twice = jax.jit(lambda x: call(_like(x), x)[0] * 2)
  thrice = jax.jit(lambda x: call(_like(x), x)[0] * 3)
  assert float(twice(jnp.ones(()))) == 2.0 and float(thrice(jnp.ones(()))) == 3.0
  scan = jax.jit(lambda x: jax.lax.scan(lambda c, _: (call(_like(c), c)[0] + 1, None), x,
                                        None, length=5)[0])
  np.testing.assert_array_equal(scan(jnp.zeros(3)), np.full(3, 5.0))
  cond = jax.jit(lambda x, p: jax.lax.cond(p, lambda x: call(_like(x), x)[0] * 2,
                                           lambda x: x - 1, x))
  assert float(cond(jnp.ones(()), True)) == 2.0 and float(cond(jnp.ones(()), False)) == 0.0


def test_host_call_refuses_vmap_and_differentiation_and_drops_an_unused_call():
  calls = []

  def counted(operands, results):
    calls.append(1)
    _identity(operands, results)

  call = host_call(counted, "review_counted")
  with pytest.raises(NotImplementedError, match="vmap_method"):
    jax.vmap(lambda x: call(_like(x), x)[0])(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="cannot be differentiated"):
    jax.grad(lambda x: call(_like(x), x)[0].sum())(jnp.ones(3))
  # Not side-effecting: a call whose results nothing reads is not run, and
  # two calls on the same operands are one (meshnet's step reads its one
  # exchange's every result).
  jax.block_until_ready(jax.jit(lambda x: (call(_like(x), x), x + 1)[1])(jnp.ones(2)))
  assert calls == []
  jax.block_until_ready(jax.jit(lambda x: call(_like(x), x)[0] + call(_like(x), x)[0])(
      jnp.ones(2)))
  assert calls == [1]


def test_host_call_error_fails_one_call_and_the_next_call_works():
  state = {"calls": 0}

  def flaky(operands, results):
    state["calls"] += 1
    if state["calls"] == 1:
      raise RuntimeError("peer 2 left: ünïcode too")
    _identity(operands, results)

  call = jax.jit(lambda x: host_call(flaky, "review_flaky")(_like(x), x)[0] + 1)
  with pytest.raises(Exception, match="RuntimeError: peer 2 left: ünïcode too"):
    jax.block_until_ready(call(jnp.ones(2)))
  np.testing.assert_array_equal(call(jnp.ones(2)), [2.0, 2.0])
  broadcast = host_call(lambda operands, results: results[0].__setitem__(..., np.ones(7)),
                        "review_shape")
  with pytest.raises(Exception, match="could not broadcast"):
    jax.block_until_ready(jax.jit(lambda x: broadcast(_like(x), x)[0])(jnp.ones(3)))
