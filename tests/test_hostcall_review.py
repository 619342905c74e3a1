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
from multiprocessing import shared_memory

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshnet
from meshnet import checkpoint, shm
from meshnet.hostcall import host_call, run_id

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


# --- the exchange: one process ----------------------------------------------


def test_a_second_exchange_while_one_runs_is_refused_at_once(tmp_path):
  """XLA runs independent host calls of one program on several threads at
  once: the second must fail with its cause, not hang or mix the slots."""
  name = shm.segment_name(f"{tmp_path}-busy")
  group = shm.SharedMemoryMean.create(name, 0, 2, 256, timeout=5)
  try:
    first = {}

    def waits_for_a_peer():
      try:
        group.sum_into([np.ones(8, np.float32)], [np.empty(8, np.float32)])
      except meshnet.MeshnetError as e:
        first["error"] = str(e)

    thread = threading.Thread(target=waits_for_a_peer)
    thread.start()
    deadline = time.monotonic() + 4
    while not group._busy.locked():  # the first exchange has begun
      assert time.monotonic() < deadline, "the first exchange never began"
      time.sleep(0.001)
    start = time.monotonic()
    with pytest.raises(meshnet.MeshnetError, match="two exchanges of one group ran at once"):
      group.sum_into([np.ones(8, np.float32)], [np.empty(8, np.float32)])
    assert time.monotonic() - start < 0.5
    thread.join()
    assert "process(es) [1] did not arrive within 5 s" in first["error"]
  finally:
    group.unlink()


def test_a_second_exchange_of_one_program_run_is_refused(tmp_path):
  name = shm.segment_name(f"{tmp_path}-run")
  group = shm.SharedMemoryMean.create(name, 0, 1, 256, timeout=1)
  try:
    x, out = np.ones(3, np.float32), np.empty(3, np.float32)
    group.sum_into([x], [out], run=7)
    with pytest.raises(meshnet.MeshnetError, match="two exchanges of one group ran in one "
                       "program run"):
      group.sum_into([x], [out], run=7)
    group.sum_into([x], [out], run=8)  # the next run
    group.sum_into([x], [out])  # no run id (called from Python): no check
    group.sum_into([x], [out])
    np.testing.assert_array_equal(out, x)
  finally:
    group.unlink()


def test_host_call_tells_its_function_the_program_run():
  runs = []

  def record(operands, results):
    runs.append(run_id())
    _identity(operands, results)

  call = host_call(record, "review_run")
  two = jax.jit(lambda x: call(_like(x), x)[0] + call(_like(x), x * 2)[0])
  for _ in range(3):
    jax.block_until_ready(two(jnp.ones(2)))
  assert all(isinstance(r, int) for r in runs) and len(runs) == 6
  assert runs[0] == runs[1] and runs[2] == runs[3] and runs[4] == runs[5]
  assert len({runs[0], runs[2], runs[4]}) == 3
  assert run_id() is None  # outside a call


def test_sum_into_refuses_outputs_it_cannot_fill(tmp_path):
  name = shm.segment_name(f"{tmp_path}-out")
  group = shm.SharedMemoryMean.create(name, 0, 1, 1024, timeout=1)
  try:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.empty((4, 3), np.float32).T  # the shape, not contiguous: a reshape copies
    with pytest.raises(meshnet.MeshnetError, match=r"output 0 is float32\[3, 4\] \(not "
                       r"contiguous\)"):
      group.sum_into([x], [out])
    with pytest.raises(meshnet.MeshnetError, match="got 2 arrays and 1 outputs"):
      group.sum_into([x, x], [np.empty_like(x)])
    with pytest.raises(meshnet.MeshnetError, match=r"output 0 is float16\[3, 4\]"):
      group.sum_into([x], [np.empty(x.shape, np.float16)])
    out = np.empty_like(x)
    group.sum_into([x], [out])  # one process: the sum is the array
    np.testing.assert_array_equal(out, x)
  finally:
    group.unlink()


# --- the exchange: real processes --------------------------------------------

_STRESS_DTYPES = (np.float32, np.float32, jnp.bfloat16, np.float16, np.int32, np.float64,
                  jnp.float8_e4m3fn, jnp.float8_e4m3fnuz)


def _layout(call):
  """The arrays of exchange ``call``: 1-5 of random shapes and dtypes (every
  process draws the same)."""
  rng = np.random.default_rng(1000 + call)
  layout = []
  for _ in range(int(rng.integers(1, 6))):
    dtype = _STRESS_DTYPES[int(rng.integers(len(_STRESS_DTYPES)))]
    shape = tuple(int(s) for s in rng.integers(0, 24, int(rng.integers(0, 3))))
    if rng.random() < 0.15:
      shape = (int(rng.integers(0, 30000)),)
    layout.append((shape, dtype))
  return layout


def _values(call, rank, layout):
  rng = np.random.default_rng((call, rank))
  # Small values, down to the 8-bit floats' subnormals.
  return [rng.integers(-9, 9, shape).astype(dtype) if dtype == np.int32 else
          (rng.standard_normal(shape) * 2.0 ** rng.integers(-9, 3, shape)).astype(dtype)
          for shape, dtype in layout]


def _attach(name, rank, size, nbytes, timeout):
  while True:
    try:
      return shm.SharedMemoryMean.attach(name, rank, size, nbytes, timeout=timeout)
    except meshnet.MeshnetError:
      time.sleep(0.01)


def _stress_worker(name, rank, size, calls, queue):
  nbytes = max(shm.slot_bytes(_layout(c)) for c in range(calls))
  if rank == 0:
    group = shm.SharedMemoryMean.create(name, rank, size, nbytes, timeout=30)
    queue.put("created")
  else:
    group = _attach(name, rank, size, nbytes, timeout=30)
  rng = np.random.default_rng(rank)
  wrong = []
  for c in range(calls):
    layout = _layout(c)
    mine = _values(c, rank, layout)
    out = [np.full_like(x, 7) for x in mine]
    if rng.random() < 0.1:  # one process late, then the others: every skew
      time.sleep(float(rng.random()) * 2e-3)
    group.sum_into(mine, out)
    terms = [_values(c, q, layout) for q in range(size)]
    for i, (_, dtype) in enumerate(layout):
      want = terms[0][i] + terms[1][i]
      for t in terms[2:]:
        want = want + t[i]
      if np.asarray(want, dtype).tobytes() != out[i].tobytes():
        wrong.append((c, i))
  queue.put((rank, wrong))


def _spawn(target, size, *args, timeout=120):
  """Runs ``target(name, rank, size, *args, queue)`` in ``size`` spawned
  processes; returns what each put last, by rank (and the segment is gone)."""
  name = shm.segment_name(f"review-{os.getpid()}-{time.monotonic_ns()}")
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  procs = [ctx.Process(target=target, args=(name, r, size, *args, queue))
           for r in range(size)]
  for p in procs:
    p.start()
  got = {}
  try:
    while len(got) < size:
      item = queue.get(timeout=timeout)
      if item != "created":
        got[item[0]] = item[1:]
  finally:
    for p in procs:
      p.join(timeout=30)
      if p.is_alive():
        p.kill()
    _unlink(name)
  assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
  return got


@pytest.mark.parametrize("size,calls", [(2, 600), (3, 300)])
def test_back_to_back_exchanges_of_changing_layouts_give_every_process_the_same_bits(
    size, calls):
  """Hundreds of exchanges, each of other shapes and dtypes than the last
  (so shares land in other places of the slots and the result region), one
  process now and then behind: every process gets, every call, the bits of
  the sum in process order. 8-bit float formats that share a NumPy type
  string (float8_e4m3fn / _e4m3fnuz) must not share a cached plan."""
  got = _spawn(_stress_worker, size, calls)
  assert {rank: wrong for rank, (wrong,) in got.items()} == {r: [] for r in range(size)}


def _float8_worker(name, rank, size, queue):
  shape = (4,)
  nbytes = shm.slot_bytes([(shape, jnp.float8_e4m3fn)])
  if rank == 0:
    group = shm.SharedMemoryMean.create(name, rank, size, nbytes, timeout=30)
    queue.put("created")
  else:
    group = _attach(name, rank, size, nbytes, timeout=30)
  results = []
  for dtype in (jnp.float8_e4m3fn, jnp.float8_e4m3fnuz):
    x = np.full(shape, 2.0 ** -10, np.float32).astype(dtype)  # fnuz's least subnormal
    out = np.empty_like(x)
    group.sum_into([x], [out])
    results.append(out.astype(np.float32).tolist())
  queue.put((rank, results))


def test_float8_formats_of_one_shape_do_not_share_a_plan():
  """float8_e4m3fn and float8_e4m3fnuz have one NumPy type string: keyed on
  it, the second exchange reused the first's views and converted the
  peer's 2**-10 (a float8_e4m3fnuz subnormal, not a float8_e4m3fn one)."""
  got = _spawn(_float8_worker, 2)
  for rank in range(2):
    fn, fnuz = got[rank][0]
    assert fn == [0.0] * 4  # 2**-10 is half float8_e4m3fn's least subnormal: 0
    assert fnuz == [2.0 ** -9] * 4  # 2**-10 + 2**-10


def _two_means_worker(name, rank, size, queue):
  os.environ["XLA_FLAGS"] = ""  # one device
  nbytes = shm.slot_bytes([((256, 256), np.float32)])
  if rank == 0:
    # long enough for a peer that compiles slowly on a loaded machine
    group = shm.SharedMemoryMean.create(name, rank, size, nbytes, timeout=60)
    queue.put("created")
  else:
    group = _attach(name, rank, size, nbytes, timeout=60)
  mean = shm.host_mean(group)

  def body(w, it):
    return jnp.tanh(w @ w) @ w + it

  step = jax.jit(lambda a, b, it: (mean(body(a, it)), mean(body(b, it))))
  wrong, error = 0, None
  for it in range(10):
    ws = [[jnp.full((256, 256), (q + k + 1) / 1e3, jnp.float32) for k in (0, 7)]
          for q in range(size)]
    try:
      got = jax.block_until_ready(step(*ws[rank], it))
    except Exception as e:  # noqa: BLE001 - the XLA error carrying the exchange's
      error = str(e)
      break
    for k in range(2):
      want = sum(np.asarray(body(ws[q][k], it)) for q in range(size)) / size
      wrong += not np.allclose(np.asarray(got[k]), want, rtol=1e-5)
  queue.put((rank, wrong, error))


def test_two_exchanges_in_one_program_fail_clearly_instead_of_mixing():
  """A program with two independent means of one shape: XLA ran them on two
  threads at once (both wrote one slot: wrong sums, or a hang until the
  timeout), or one after the other in another order in each process (the
  processes swapped the two: wrong sums, silently). Now every process's
  first run fails, with the cause, and none gets a wrong mean."""
  got = _spawn(_two_means_worker, 2)
  assert [got[r][0] for r in range(2)] == [0, 0], got
  for rank in range(2):
    assert "MeshnetError: shared-memory gradient mean: two exchanges of one group" in (
        got[rank][1] or ""), got
    assert "one mean(tree) call per program" in got[rank][1]


# --- real training -------------------------------------------------------------


def _run(args, timeout=300):
  proc = subprocess.run(MESHNET + args, capture_output=True, text=True, env=ENV,
                        timeout=timeout)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  return proc.stdout + proc.stderr


def test_three_processes_train_what_one_process_trains(tmp_path):
  """data=3 over three processes through shared memory: SGD with momentum,
  bf16 compute, dropout, three accumulation steps, odd layer widths; the
  parameters of one process with three devices (to float32 rounding)."""
  before = _segments()
  args = TRAIN + ["--mesh", "data=3", "--steps", "6", "--optimizer", "sgd", "--momentum",
                  "0.9", "--precision", "bf16", "--dropout", "0.1", "--grad-accum", "3",
                  "--batch-size", "45", "--hidden", "33,7"]
  out = _run(["launch", "-n", "3", "--", *MESHNET, *args, "--grad-transport", "shm",
              "--checkpoint-dir", str(tmp_path / "shm")])
  assert "3 cpu devices, 3 processes" in out
  _run(args + ["--devices", "3", "--deterministic", "--checkpoint-dir", str(tmp_path / "one")])
  shm_params = checkpoint.load_params(str(tmp_path / "shm"), 6)
  one_params = checkpoint.load_params(str(tmp_path / "one"), 6)
  for got, want in zip(jax.tree.leaves(shm_params), jax.tree.leaves(one_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert _segments() <= before


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_killed_peer_ends_the_survivor_with_a_clear_error(tmp_path):
  """Two processes started by hand (no launcher to stop the other): SIGKILL
  one mid-run; the survivor must end with one line naming the peer, well
  before the exchange's own 300 s timeout, and leave no segment."""
  before = _segments()
  port = _free_port()
  procs = []
  for rank in range(2):
    env = dict(ENV, MESHNET_COORDINATOR=f"127.0.0.1:{port}", MESHNET_NUM_PROCESSES="2",
               MESHNET_PROCESS_ID=str(rank), MESHNET_DEVICES_PER_PROCESS="1")
    procs.append(subprocess.Popen(
        MESHNET + TRAIN + ["--mesh", "data=2", "--steps", "1000000", "--grad-transport",
                           "shm"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    seen = []
    for line in procs[0].stdout:
      seen.append(line)
      if line.startswith("compiled the train step"):
        break
    assert seen and seen[-1].startswith("compiled"), "".join(seen)[-2000:]
    time.sleep(2.0)  # training: hundreds of exchanges
    killed = time.monotonic()
    procs[1].send_signal(signal.SIGKILL)
    rest, _ = procs[0].communicate(timeout=150)
    elapsed = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert procs[0].returncode not in (0, None)
  assert "process 1 of 2 stopped responding" in rest, rest[-2000:]
  assert "Traceback" not in rest
  assert elapsed < 120
  assert _segments() <= before


# Runs the command with SIGINT's default action: a test runner started in the
# background ignores SIGINT, and its children would inherit that.
_SIGINT_DEFAULT = [sys.executable, "-c", "import os, signal, sys; "
                   "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.argv[1], sys.argv[1:])"]


def test_ctrl_c_ends_a_shared_memory_run_without_an_abort():
  """Ctrl-C (SIGINT to the launch's process group) while steps are in
  flight: an exchange may be waiting for its peers on an XLA thread, which
  aborted an ordinary interpreter shutdown about one time in three (exit
  134, "terminate called without an active exception")."""
  for _ in range(2):
    launcher = subprocess.Popen(
        _SIGINT_DEFAULT + MESHNET + ["launch", "-n", "2", "--", *MESHNET, *TRAIN, "--mesh",
                                     "data=2", "--steps", "1000000", "--grad-transport", "shm"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        start_new_session=True)
    try:
      for line in launcher.stdout:
        if line.startswith("[0] compiled the train step"):
          break
      time.sleep(1.5)
      os.killpg(launcher.pid, signal.SIGINT)
      rest, _ = launcher.communicate(timeout=60)
    finally:
      if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    assert launcher.returncode == 130, rest[-2000:]
    assert "[0] meshnet: interrupted" in rest and "[1] meshnet: interrupted" in rest, rest
    assert "terminate called" not in rest and "SIGABRT" not in rest, rest
