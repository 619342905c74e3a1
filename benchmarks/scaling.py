"""Scaling on real processes, one core each: 2 processes against 1.

Two measurements, each against the same work on one process pinned to one
core, the two sides alternating round by round in this one run (the
machine is noisy; each keeps its best round):

* **Pipeline**: MLP 784-1024x8-10 (ReLU), SGD, global batch 2048, on
  ``stage=2`` over 2 processes (gloo), schedules GPipe, 1F1B, ZB-H1 and
  interleaved (v=2), M = 4, 8, 16 microbatches of 2048 / M examples,
  against the unpipelined step on one process. The table puts the measured
  speedup beside the schedule's theory ``S x (1 - bubble)`` (bubble from
  the schedule's own timed simulation, see :func:`_theory`) and the
  microbatch efficiency: the one-process step over the whole batch against
  the same step cut into M accumulated microbatches (``grad_accum=M``), so
  a pipeline is not blamed for what small matmuls cost on their own:
  ``measured / (theory x efficiency)`` is what the executor achieves of
  what its schedule could. That theory takes every stage as equal; the
  table also times the same lockstep rounds with each stage's own op costs
  (:func:`_op_costs`, measured alone on the one-process worker's core after
  the timed rounds): "theory at op costs" is what this layer split allows,
  compute only. The first step's loss of every pipelined program
  must equal the unpipelined one (within 1e-4), so the comparison is of
  the same computation.
* **Data parallel**: MLP 784-512-256-128-10, Adam (lr 1e-3), global batch
  256 and 1024, 2 processes against 1, for meshnet (``data=2``, one device
  per process; gloo, and ``grad_transport="shm"``, also through
  ``jax.pure_callback`` as before :mod:`meshnet.hostcall`) and for PyTorch DDP
  (gloo; one process: the plain model). The ideal speedup is twice what
  one process does on half the batch (each worker's share) over what it
  does on the whole batch: smaller batches run slower per example here, and
  that is not the exchange's fault; ``gloo / ideal`` and ``shm / ideal``
  are what is left for the exchange and the wait for the slower worker.

Every worker is pinned to its own core (``sched_setaffinity``) with its
math libraries at one thread (``OMP_NUM_THREADS=1``, torch
``set_num_threads(1)``); the one-process baseline runs on the first core.
Workers compile and warm up first, then serve timing requests, so every
program is compiled once and the sides alternate without restarts. A time
is N steps until ``block_until_ready``, after a barrier; best of R rounds.
Data is synthetic and MNIST-shaped (``benchmarks/ddp.py``'s ``_data``).

Run: python benchmarks/scaling.py [--quick] [--steps N] [--rounds R]
       [--schedules gpipe,1f1b,zb,interleaved] [--microbatches 4,8,16]
       [--only pipeline|dp] [--no-torch]
(torch is optional: without it, or with --no-torch, its columns read "-".)
On this 2-core machine the full run takes about 12 minutes (200 s to compile
the 12 pipelined programs, 150 s per round); --rounds 2 about 9.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]

import ddp  # noqa: E402  (same directory: WIDTHS, BATCHES, _data)

STAGES = 2
VIRTUAL = {"interleaved": 2}  # chunks per device; other schedules have one
LOSS_TOLERANCE = 1e-4
REPLY = "@scaling "  # prefix of a worker's reply lines (libraries print too)
READY_TIMEOUT = 1200  # seconds: compiling every program of a worker
TIME_TIMEOUT = 600


@dataclasses.dataclass(frozen=True)
class PipelineWork:
  """The pipelined workload: model widths, SGD, global batch, what to vary."""

  widths: tuple[int, ...]
  batch: int
  schedules: tuple[str, ...]
  microbatches: tuple[int, ...]
  steps: int
  lr: float = 0.01


@dataclasses.dataclass(frozen=True)
class DataParallelWork:
  """The data-parallel workload (benchmarks/ddp.py's model), Adam."""

  widths: tuple[int, ...]
  batches: tuple[int, ...]
  steps: int
  lr: float = 1e-3


FULL = (PipelineWork((784,) + (1024,) * 8 + (10,), 2048,
                     ("gpipe", "1f1b", "zb", "interleaved"), (4, 8, 16), steps=5),
        DataParallelWork(tuple(ddp.WIDTHS), tuple(ddp.BATCHES), steps=50))
QUICK = (PipelineWork((784, 128, 128, 128, 10), 256, ("1f1b", "interleaved"), (4,), steps=3),
         DataParallelWork(tuple(ddp.WIDTHS), (256,), steps=5))


def _theory(schedule: str, microbatches: int) -> float:
  """The schedule's ideal speedup on ``STAGES`` devices: ``S x (1 - bubble)``.

  The bubble is the timed simulation of the lockstep rounds the executor
  runs (forward 1, backward 2 or input/weight halves 1 + 1, see
  :mod:`meshnet.pipeline.rounds`); for GPipe, 1F1B and interleaved it equals
  the schedule's asynchronous timed bubble (:attr:`Schedule.bubble`).
  """
  from meshnet.pipeline import make_schedule
  from meshnet.pipeline.rounds import pack
  return pack(make_schedule(schedule, STAGES, microbatches,
                            VIRTUAL.get(schedule, 1))).speedup


def _op_costs(work: PipelineWork, virtual: int, microbatches: int,
              reps: int = 5) -> dict[str, float]:
  """Seconds each op of each virtual stage takes on one microbatch, on this
  process's core, timed alone (plain ``jax.jit`` of the stage's layers with
  meshnet's default cut, best of ``reps``): ``"F/k"`` the forward (the
  last stage's with its loss), ``"BW/k"`` the backward from the forward's
  residuals (input and weight gradients; the first stage's has no input
  gradient, as the executor's), ``"B/k"`` the input gradient alone (0 on
  the first stage). A split backward's weight half is ``BW - B``."""
  import jax
  import jax.numpy as jnp

  import meshnet
  from meshnet import losses
  from meshnet.model import layer_params

  model = meshnet.models.mlp(list(work.widths))
  K = STAGES * virtual
  bounds = meshnet.pipeline.default_bounds(model.layers, K)
  params = layer_params(model, model.init(jax.random.key(0)))
  mb = work.batch // microbatches
  x, y = ddp._data(work.batch, 0, 1, 0)
  h, y = jnp.asarray(x[:mb]), jnp.asarray(y[:mb], jnp.int32)
  loss = losses.objective("cross_entropy").loss

  def best(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return min(times)

  costs = {}
  for k in range(K):
    layers = model.layers[bounds[k]:bounds[k + 1]]
    ps = params[bounds[k]:bounds[k + 1]]

    def stage(ps, h, layers=layers, last=k == K - 1):
      for layer, p in zip(layers, ps):
        h = layer.apply(p, h, train=True, key=None)
      return jnp.mean(loss(h, y)) / microbatches if last else h

    out, pullback = jax.vjp(stage, ps, h)
    seed = jnp.ones_like(out)
    costs[f"F/{k}"] = best(jax.jit(stage), ps, h)
    if k == 0:  # no input gradient: the executor's first stage computes none
      costs[f"BW/{k}"] = best(jax.jit(lambda pb, s: pb(s)[0]), pullback, seed)
      costs[f"B/{k}"] = 0.0
    else:
      costs[f"BW/{k}"] = best(jax.jit(lambda pb, s: pb(s)), pullback, seed)
      costs[f"B/{k}"] = best(jax.jit(lambda pb, s: pb(s)[1]), pullback, seed)
    h = out
  return costs


def _op_seconds(costs: dict[str, float], split: bool) -> dict[tuple[str, int], float]:
  """:meth:`~meshnet.pipeline.rounds.Rounds.timed`'s op costs from
  :func:`_op_costs`'s: ``B`` the whole backward, or with ``split`` (ZB) the
  input gradient, and ``W`` the rest."""
  seconds = {}
  for key, value in costs.items():
    kind, k = key.split("/")
    k = int(k)
    if kind == "F":
      seconds[("F", k)] = value
    elif kind == "BW":
      seconds[("B", k)] = costs[f"B/{k}"] if split else value
      if split:
        seconds[("W", k)] = max(0.0, value - costs[f"B/{k}"])  # noise can invert them
  return seconds


# --- workers: build programs, then time them on request -----------------------------


Program = Callable[[int], None]  # runs that many steps and blocks until done


def _meshnet_program(model, optimizer, mesh, x, y, **step_options) -> tuple[Program, float]:
  """A compiled, warmed-up train step on this process's share ``x, y`` of
  the global batch; returns ``(run, first-step loss)``."""
  import jax
  import numpy as np

  import meshnet
  from meshnet.sharding import batch_sharding
  from meshnet.train import max_steps_in_flight

  step = meshnet.make_train_step(model, optimizer, mesh, **step_options)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  sharding = batch_sharding(mesh)
  batch = (jax.make_array_from_process_local_data(sharding, x),
           jax.make_array_from_process_local_data(sharding, y.astype(np.int32)))
  state, metrics = step(state, batch)
  first_loss = float(metrics["loss"])
  state, metrics = step(state, batch)
  jax.block_until_ready(state)
  limit = max_steps_in_flight(mesh)
  current = [state]

  def run(steps: int) -> None:
    state, in_flight = current[0], []
    for _ in range(steps):
      state, metrics = step(state, batch)
      in_flight.append(metrics["loss"])
      if len(in_flight) >= limit:
        jax.block_until_ready(in_flight.pop(0))
    current[0] = jax.block_until_ready(state)

  return run, first_loss


def _unpipelined_programs(work: PipelineWork, rank: int, world: int) -> dict:
  """One process: ``{"full": ..., "accum/M": ...}``, the unpipelined step on
  the whole batch and with ``grad_accum=M``."""
  import optax

  import meshnet

  model, optimizer = meshnet.models.mlp(list(work.widths)), optax.sgd(work.lr)
  mesh = meshnet.make_mesh(data=1)
  x, y = ddp._data(work.batch, 0, 1, 0)
  programs = {"full": _meshnet_program(model, optimizer, mesh, x, y)}
  for m in work.microbatches:
    programs[f"accum/{m}"] = _meshnet_program(model, optimizer, mesh, x, y, grad_accum=m)
  return programs


def _pipelined_programs(work: PipelineWork, rank: int, world: int) -> dict:
  """``{"schedule/M": ...}``: the step pipelined on ``stage=world``; every
  process passes the whole batch (``data=1``: it is replicated)."""
  import optax

  import meshnet

  model, optimizer = meshnet.models.mlp(list(work.widths)), optax.sgd(work.lr)
  mesh = meshnet.make_mesh(stage=world)
  x, y = ddp._data(work.batch, 0, 1, 0)
  programs = {}
  for m in work.microbatches:
    for name in work.schedules:
      pipe = meshnet.pipeline.make_pipeline(model, mesh, (work.widths[0],), schedule=name,
                                            microbatches=m,
                                            virtual_stages=VIRTUAL.get(name, 1))
      programs[f"{name}/{m}"] = _meshnet_program(model, optimizer, mesh, x, y, pipeline=pipe)
  return programs


def _meshnet_dp_programs(work: DataParallelWork, rank: int, world: int) -> dict:
  """``{"batch": program}``: the train step on ``data=world``; with several
  processes also ``{"shm/batch": program}`` (``grad_transport="shm"``)."""
  import optax

  import meshnet

  model = meshnet.models.mlp(list(work.widths))
  optimizer = optax.adam(work.lr)
  mesh = meshnet.make_mesh(data=world)
  programs = {}
  for b in work.batches:
    data = ddp._data(b, rank, world, 0)
    programs[str(b)] = _meshnet_program(model, optimizer, mesh, *data)
    if world == 1:  # one worker's share of the batch, alone: the ideal for two
      programs[f"half/{b}"] = _meshnet_program(model, optimizer, mesh,
                                               *ddp._data(b // 2, rank, world, 0))
    if world > 1:
      programs[f"shm/{b}"] = _meshnet_program(model, optimizer, mesh, *data,
                                              grad_transport="shm")
      with _pure_callback_mean():
        programs[f"shm-cb/{b}"] = _meshnet_program(model, optimizer, mesh, *data,
                                                   grad_transport="shm")
  return programs


@contextlib.contextmanager
def _pure_callback_mean():
  """``grad_transport="shm"`` as it ran before :mod:`meshnet.hostcall`, for
  the comparison: the loss and gradient packed into one float32 vector,
  averaged by ``jax.pure_callback`` of the same shared-memory exchange."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from meshnet import shm, step

  def host_mean(model, mesh):
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    count = 1 + sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    group = shm.make_group(mesh, "data", shm.slot_bytes([((count,), np.float32)]))

    def mean(tree, axis_name=None):
      leaves, treedef = jax.tree.flatten(tree)
      flat = jnp.concatenate([a.reshape(-1).astype(jnp.float32) for a in leaves])
      flat = jax.pure_callback(group, jax.ShapeDtypeStruct(flat.shape, flat.dtype), flat)
      out, offset = [], 0
      for a in leaves:
        out.append(flat[offset:offset + a.size].reshape(a.shape).astype(a.dtype))
        offset += a.size
      return jax.tree.unflatten(treedef, out)
    return mean

  saved = step._host_mean
  step._host_mean = host_mean
  try:
    yield
  finally:
    step._host_mean = saved


def _torch_dp_programs(work: DataParallelWork, rank: int, world: int) -> dict:
  """``{"batch": program}``: DistributedDataParallel over ``world`` processes,
  or the plain model on one."""
  import torch

  torch.manual_seed(0)
  layers = []
  for a, b in zip(work.widths[:-1], work.widths[1:]):
    layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
  model = torch.nn.Sequential(*layers[:-1])
  if world > 1:
    model = torch.nn.parallel.DistributedDataParallel(model)
  optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
  loss_fn = torch.nn.CrossEntropyLoss()
  programs = {}
  for batch in work.batches:
    x, y = (torch.from_numpy(a) for a in ddp._data(batch, rank, world, 0))

    def step(x=x, y=y):
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(model(x), y)
      loss.backward()
      optimizer.step()
      return float(loss)

    def run(steps: int, step=step) -> None:
      for _ in range(steps):
        step()

    first_loss = step()
    step()
    programs[str(batch)] = (run, first_loss)
  return programs


_BUILDERS = {"unpipelined": _unpipelined_programs, "pipelined": _pipelined_programs,
             "meshnet": _meshnet_dp_programs, "torch": _torch_dp_programs}


def _serve(kind: str, work, rank: int, world: int, port: int) -> None:
  """A worker: joins its peers, builds every program, replies with their
  first-step losses, then answers ``KEY STEPS`` lines with the seconds those
  steps took (after a barrier, so all ranks start together)."""
  if kind == "torch":
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    if world > 1:
      dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                              world_size=world)
    barrier = dist.barrier if world > 1 else (lambda: None)
  else:
    import meshnet
    from jax.experimental import multihost_utils
    meshnet.distributed.initialize(f"127.0.0.1:{port}", world, rank)
    barrier = lambda: multihost_utils.sync_global_devices("scaling")  # noqa: E731
  programs = _BUILDERS[kind](work, rank, world)
  print(REPLY + json.dumps({k: loss for k, (_, loss) in programs.items()}), flush=True)
  for line in iter(sys.stdin.readline, ""):
    if line.strip() == "quit":
      break
    if line.startswith("costs "):  # op costs: "costs V M" (one process)
      _, v, m = line.split()
      print(REPLY + json.dumps(_op_costs(work, int(v), int(m))), flush=True)
      continue
    key, steps = line.split()
    barrier()
    start = time.perf_counter()
    programs[key][0](int(steps))
    print(REPLY + json.dumps(time.perf_counter() - start), flush=True)
  if kind == "torch" and world > 1:
    dist.destroy_process_group()


# --- the driver: pinned worker groups, alternating requests -------------------------


class _Group:
  """``world`` worker processes of one kind, process ``i`` pinned to core
  ``i``, answering timing requests together."""

  def __init__(self, kind: str, world: int, work):
    from meshnet.launch import cpu_sets, placement_environment, free_port
    self.name = f"{kind} x{world}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env.update(placement_environment(1, env))
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])))
    payload = json.dumps({"type": type(work).__name__, **dataclasses.asdict(work)})
    port = free_port()
    self.procs, self.logs, self.replies = [], [], []
    for rank, cores in enumerate(cpu_sets(world, 1)):
      log = tempfile.TemporaryFile(mode="w+")
      proc = subprocess.Popen(
          [sys.executable, __file__, "--worker", kind, "--rank", str(rank), "--world",
           str(world), "--port", str(port), "--work", payload],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
          preexec_fn=lambda cores=cores: os.sched_setaffinity(0, cores))
      replies: queue.Queue = queue.Queue()
      threading.Thread(target=self._read, args=(proc.stdout, replies), daemon=True).start()
      self.procs.append(proc)
      self.logs.append(log)
      self.replies.append(replies)

  @staticmethod
  def _read(stream, replies: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
      if line.startswith(REPLY):
        replies.put(json.loads(line[len(REPLY):]))
    replies.put(None)  # end of output: the process is gone

  def _answers(self, timeout: float) -> list:
    answers = []
    for rank, replies in enumerate(self.replies):
      try:
        answer = replies.get(timeout=timeout)
      except queue.Empty:
        answer = None
      if answer is None:
        self._fail(rank)
      answers.append(answer)
    return answers

  def _fail(self, rank: int) -> None:
    self.close()
    log = self.logs[rank]
    log.seek(0)
    tail = log.read()[-3000:]
    raise SystemExit(f"{self.name}: worker {rank} failed or hung "
                     f"(exit {self.procs[rank].returncode}); its stderr ends:\n{tail}")

  def ready(self) -> dict[str, float]:
    """Waits until every worker has compiled; rank 0's first-step losses."""
    return self._answers(READY_TIMEOUT)[0]

  def time(self, key: str, steps: int) -> float:
    """Seconds for ``steps`` steps of program ``key`` (the slowest rank)."""
    return max(self.ask(f"{key} {steps}"))

  def ask(self, line: str) -> list:
    """Every rank's answer to request ``line``."""
    for rank, proc in enumerate(self.procs):
      try:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
      except BrokenPipeError:
        self._fail(rank)
    return self._answers(TIME_TIMEOUT)

  def close(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          proc.stdin.write("quit\n")
          proc.stdin.flush()
        except BrokenPipeError:
          pass
    for proc in self.procs:
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _best_times(groups: dict[str, _Group], plan: list[tuple[str, str]], steps: int,
                rounds: int) -> dict[tuple[str, str], float]:
  """Runs ``plan`` (``(group, key)`` in order) ``rounds`` times; the best
  seconds per step of each entry."""
  from meshnet.metrics import Bar

  best: dict[tuple[str, str], float] = {}
  # On a terminal a bar over every timed case; elsewhere a line every 10 s.
  with Bar(rounds * len(plan), label="scaling: timed cases") as bar:
    for r in range(rounds):
      began = time.perf_counter()
      for entry in plan:
        seconds = groups[entry[0]].time(entry[1], steps) / steps
        best[entry] = min(best.get(entry, math.inf), seconds)
        bar.advance(note=f"round {r + 1}: {entry[0]} {entry[1]}")
      bar.message(f"scaling: round {r + 1}/{rounds} took {time.perf_counter() - began:.0f} s")
  return best


def _progress(message: str) -> None:
  print(f"scaling: {message}", file=sys.stderr, flush=True)


def _measure(specs: dict[str, tuple[str, int, object]], plan: list[tuple[str, str]],
             steps: int, rounds: int, queries: tuple[tuple[str, str], ...] = ()
             ) -> tuple[dict[tuple[str, str], float], dict, dict]:
  """Starts every group of ``specs`` (``name: (kind, world, work)``) at once
  (they compile in parallel), then times ``plan`` with them
  (:func:`_best_times`), then asks ``queries`` (``(group, line)``: rank 0's
  answer); returns the best seconds per step, each group's first-step
  losses and the answers by line."""
  groups: dict[str, _Group] = {}
  try:
    for name, (kind, world, work) in specs.items():
      groups[name] = _Group(kind, world, work)
    _progress(f"{', '.join(g.name for g in groups.values())}: started; compiling and "
              "warming up ...")
    began = time.perf_counter()
    losses = {name: group.ready() for name, group in groups.items()}
    _progress(f"{', '.join(g.name for g in groups.values())}: compiled and warmed up in "
              f"{time.perf_counter() - began:.0f} s")
    best = _best_times(groups, plan, steps, rounds)
    return best, losses, {line: groups[name].ask(line)[0] for name, line in queries}
  finally:
    for group in groups.values():
      group.close()


def _widths(widths: tuple[int, ...]) -> str:
  """``784-1024x8-10`` for 784, eight 1024s, 10."""
  parts: list[list[int]] = []
  for w in widths:
    if parts and parts[-1][0] == w:
      parts[-1][1] += 1
    else:
      parts.append([w, 1])
  return "-".join(f"{w}x{n}" if n > 1 else str(w) for w, n in parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _pipeline_table(work: PipelineWork, rounds: int) -> tuple[str, float, list[str]]:
  """Measures the pipeline against one process; the table, the largest
  first-step loss difference and notes on the op costs."""
  from meshnet.pipeline import make_schedule
  from meshnet.pipeline.rounds import pack

  plan = []
  for m in work.microbatches:  # one process and two take turns
    plan += [("one", "full"), ("one", f"accum/{m}")]
    plan += [("two", f"{name}/{m}") for name in work.schedules]
  virtuals = sorted({VIRTUAL.get(name, 1) for name in work.schedules})
  queries = tuple(("one", f"costs {v} {m}") for v in virtuals for m in work.microbatches)
  best, losses, answers = _measure({"one": ("unpipelined", 1, work),
                                    "two": ("pipelined", STAGES, work)}, plan, work.steps,
                                   rounds, queries)
  full = best[("one", "full")]
  rows, worst, notes = [], 0.0, []
  for m in work.microbatches:
    accum = best[("one", f"accum/{m}")]
    efficiency = full / accum
    for v in virtuals:
      costs = answers[f"costs {v} {m}"]
      ops = m * sum(costs[f"{kind}/{k}"] for kind in ("F", "BW") for k in range(STAGES * v))
      notes.append(f"M={m}, {STAGES * v} stages: op costs (ms) " + ", ".join(
          f"{key} {value * 1e3:.1f}" for key, value in costs.items())
          + f"; all ops of a step {ops * 1e3:.1f} against the 1-process M-microbatch step "
          f"{accum * 1e3:.1f}")
    for name in work.schedules:
      two = best[("two", f"{name}/{m}")]
      measured, theory = full / two, _theory(name, m)
      schedule = make_schedule(name, STAGES, m, VIRTUAL.get(name, 1))
      costs = answers[f"costs {VIRTUAL.get(name, 1)} {m}"]
      lockstep, _ = pack(schedule).timed(_op_seconds(costs, schedule.split_backward))
      diff = max(abs(losses["two"][f"{name}/{m}"] - losses["one"][k])
                 for k in ("full", f"accum/{m}"))
      worst = diff if math.isnan(diff) else max(worst, diff)
      label = f"{name} v={VIRTUAL[name]}" if name in VIRTUAL else name
      rows.append([label, str(m), str(work.batch // m), f"{two * 1e3:.1f}",
                   f"{full * 1e3:.1f}", f"{measured:.2f}", f"{accum * 1e3:.1f}",
                   f"{efficiency:.2f}", f"{theory:.2f}", f"{theory * efficiency:.2f}",
                   f"{measured / (theory * efficiency):.2f}", f"{lockstep * 1e3:.1f}",
                   f"{full / lockstep:.2f}", f"{lockstep / two:.2f}", f"{diff:.1e}"])
  header = ["schedule", "M", "microbatch", "ms/step 2 proc", "ms/step 1 proc",
            "measured speedup", "ms/step 1 proc M mb", "mb-efficiency",
            "theory S(1-bubble)", "theory x eff", "measured / (theory x eff)",
            "rounds at op costs ms", "theory at op costs", "measured / theory at op costs",
            "loss diff"]
  return _table(header, rows), worst, notes


def _dp_table(work: DataParallelWork, rounds: int, with_torch: bool) -> str:
  """Measures data parallel, 2 processes against 1, meshnet and torch."""
  kinds = ["meshnet"] + (["torch"] if with_torch else [])
  specs = {f"{kind} {world}": (kind, world, work) for kind in kinds for world in (1, 2)}
  plan = [(name, str(b)) for b in work.batches for name in specs]
  plan += [("meshnet 2", f"shm/{b}") for b in work.batches]
  plan += [("meshnet 2", f"shm-cb/{b}") for b in work.batches]
  plan += [("meshnet 1", f"half/{b}") for b in work.batches]
  best, _, _ = _measure(specs, plan, work.steps, rounds)
  rows = []
  for b in work.batches:
    rate = {name: b / best.get((name, str(b)), math.nan) for name in
            ("meshnet 1", "meshnet 2", "torch 1", "torch 2")}
    shm = b / best.get(("meshnet 2", f"shm/{b}"), math.nan)
    shm_cb = b / best.get(("meshnet 2", f"shm-cb/{b}"), math.nan)
    # Two workers can at best do twice what one does on its half of the batch.
    ideal = 2 * (b // 2) / best.get(("meshnet 1", f"half/{b}"), math.nan)
    cells = [str(b)]
    for kind in ("meshnet", "torch"):
      one, two = rate[f"{kind} 1"], rate[f"{kind} 2"]
      cells += ["-"] * 3 if math.isnan(two) else [f"{one:,.0f}", f"{two:,.0f}",
                                                  f"{two / one:.2f}"]
      if kind == "meshnet":
        cells += [f"{shm:,.0f}", f"{shm / one:.2f}", f"{shm_cb / one:.2f}",
                  f"{ideal / one:.2f}", f"{two / ideal:.2f}", f"{shm / ideal:.2f}"]
    ratio = rate["meshnet 2"] / rate["torch 2"]
    shm_ratio = shm / rate["torch 2"]
    rows.append(cells + ["-" if math.isnan(ratio) else f"{ratio:.2f}",
                         "-" if math.isnan(shm_ratio) else f"{shm_ratio:.2f}"])
  header = ["global batch", "meshnet 1p samples/s", "meshnet 2p samples/s",
            "meshnet speedup", "meshnet 2p shm samples/s", "shm speedup",
            "shm via pure_callback speedup", "ideal speedup (2 x 1p on B/2)", "gloo / ideal",
            "shm / ideal",
            "torch 1p samples/s", "torch 2p samples/s", "torch speedup",
            "meshnet / torch at 2p", "meshnet shm / torch at 2p"]
  return _table(header, rows)


def _parse(argv) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="a small model, M=4, two schedules, few steps (the test)")
  parser.add_argument("--steps", type=int, help="timed steps per round (default: "
                      f"pipeline {FULL[0].steps}, data parallel {FULL[1].steps})")
  parser.add_argument("--rounds", type=int, help="rounds, keep the best (default 3; "
                      "--quick 1)")
  parser.add_argument("--schedules", help="comma-separated (default gpipe,1f1b,zb,"
                      "interleaved)")
  parser.add_argument("--microbatches", help="comma-separated M (default 4,8,16)")
  parser.add_argument("--only", choices=["pipeline", "dp"])
  parser.add_argument("--no-torch", action="store_true", help="skip PyTorch DDP")
  parser.add_argument("--worker", choices=sorted(_BUILDERS),
                      help=argparse.SUPPRESS)
  parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--work", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _workloads(args) -> tuple[PipelineWork, DataParallelWork]:
  pipeline, dp = QUICK if args.quick else FULL
  changes = {}
  if args.schedules:
    changes["schedules"] = tuple(args.schedules.split(","))
  if args.microbatches:
    changes["microbatches"] = tuple(int(m) for m in args.microbatches.split(","))
  if args.steps:
    changes["steps"] = args.steps
    dp = dataclasses.replace(dp, steps=args.steps)
  return dataclasses.replace(pipeline, **changes), dp


def _decode_work(payload: str):
  fields = json.loads(payload)
  cls = {c.__name__: c for c in (PipelineWork, DataParallelWork)}[fields.pop("type")]
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def main(argv=None) -> int:
  args = _parse(argv)
  if args.worker:
    _serve(args.worker, _decode_work(args.work), args.rank, args.world, args.port)
    return 0
  began = time.perf_counter()
  pipeline, dp = _workloads(args)
  rounds = args.rounds or (1 if args.quick else 3)
  for name in pipeline.schedules:  # bad names and M fail here, not in a worker
    for m in pipeline.microbatches:
      _theory(name, m)
  with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
  import jax
  versions = f"jax {jax.__version__}"
  if with_torch:
    import torch
    versions += f", torch {torch.__version__}"
  print(f"{versions}; every process pinned to its own core, 1 thread, gloo; best of "
        f"{rounds} rounds, one process and two alternating\n")
  status = 0
  if args.only in (None, "pipeline"):
    table, worst, notes = _pipeline_table(pipeline, rounds)
    print(f"Pipeline, stage={STAGES} over 2 processes vs unpipelined on 1: MLP "
          f"{_widths(pipeline.widths)}, SGD, global batch {pipeline.batch}, "
          f"{pipeline.steps} steps per round\n")
    print(table + "\n")
    print("Op costs: each stage's ops on one microbatch, timed alone on one core "
          "(F forward, BW backward, B its input gradient; ZB's W is BW - B); the rounds "
          "at op costs sum each lockstep round's busiest device:")
    print("\n".join(f"- {note}" for note in notes) + "\n")
    if not worst <= LOSS_TOLERANCE:  # NaN too
      print(f"FAILED: pipelined first-step loss differs from unpipelined by {worst:.2e} "
            f"(> {LOSS_TOLERANCE})")
      status = 1
  if args.only in (None, "dp"):
    table = _dp_table(dp, rounds, with_torch)
    print(f"Data parallel, 2 processes vs 1: MLP {_widths(dp.widths)}, Adam, {dp.steps} "
          "steps per round" + ("" if with_torch else "; torch skipped") + "\n")
    print(table + "\n")
  print(f"took {time.perf_counter() - began:.0f} s")
  return status


if __name__ == "__main__":
  sys.exit(main())
