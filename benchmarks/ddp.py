"""Data-parallel throughput over 2 processes: meshnet against PyTorch DDP (gloo).

Both train the 784-512-256-128-10 MLP (ReLU) with Adam (lr 1e-3) and
softmax cross-entropy on the same synthetic MNIST-shaped data, at global
batch 256 and 1024, with 2 processes on this host, one CPU device each,
gradients averaged over gloo. meshnet runs ``meshnet.make_train_step`` as
``meshnet train`` does (jitted step, packed gradient bucket across
processes); torch runs ``DistributedDataParallel`` with 1 thread per
process, as torchrun sets it. The two are run one after the other in this
script, alternating (meshnet, torch, meshnet, torch, ...); each reports its
best.

Run: python benchmarks/ddp.py [--steps 50] [--rounds 3] [--pairs 2]   (needs torch:
pip install torch==2.13.0)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

WIDTHS = [784, 512, 256, 128, 10]
BATCHES = (256, 1024)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _data(batch: int, rank: int, world: int, step: int):
  import numpy as np
  rng = np.random.default_rng([step, 7])
  x = rng.random((batch, WIDTHS[0]), np.float32)
  y = rng.integers(0, 10, batch).astype(np.int64)
  share = batch // world
  return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def torch_worker(rank: int, world: int, port: int, steps: int, rounds: int) -> dict:
  import torch
  import torch.distributed as dist
  from torch.nn.parallel import DistributedDataParallel

  torch.set_num_threads(1)
  dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                          world_size=world)
  torch.manual_seed(0)
  layers = []
  for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
    layers.append(torch.nn.Linear(a, b))
    if i < len(WIDTHS) - 2:
      layers.append(torch.nn.ReLU())
  model = DistributedDataParallel(torch.nn.Sequential(*layers))
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  loss_fn = torch.nn.CrossEntropyLoss()
  result = {}
  for batch in BATCHES:
    x, y = (torch.from_numpy(a) for a in _data(batch, rank, world, 0))

    def step():
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(model(x), y)
      loss.backward()
      optimizer.step()
      return loss

    for _ in range(5):
      step()
    best = float("inf")
    for _ in range(rounds):
      dist.barrier()
      start = time.perf_counter()
      for _ in range(steps):
        step()
      dist.barrier()
      best = min(best, time.perf_counter() - start)
    result[batch] = batch * steps / best
  dist.destroy_process_group()
  return result


def meshnet_worker(rank: int, world: int, port: int, steps: int, rounds: int) -> dict:
  import jax
  import numpy as np
  import optax

  import meshnet
  from meshnet.sharding import batch_sharding
  from meshnet.train import max_steps_in_flight

  meshnet.distributed.initialize(f"127.0.0.1:{port}", world, rank)
  mesh = meshnet.make_mesh(data=-1)
  model = meshnet.models.mlp(WIDTHS)
  optimizer = optax.adam(1e-3)
  step_fn = meshnet.make_train_step(model, optimizer, mesh)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  sharding = batch_sharding(mesh)
  limit = max_steps_in_flight(mesh)
  result = {}
  for batch in BATCHES:
    x, y = _data(batch, rank, world, 0)
    xb = jax.make_array_from_process_local_data(sharding, x)
    yb = jax.make_array_from_process_local_data(sharding, y.astype(np.int32))
    for _ in range(5):
      state, metrics = step_fn(state, (xb, yb))
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(rounds):
      start = time.perf_counter()
      in_flight = []
      for _ in range(steps):
        state, metrics = step_fn(state, (xb, yb))
        in_flight.append(metrics["loss"])
        if len(in_flight) >= limit:
          jax.block_until_ready(in_flight.pop(0))
      jax.block_until_ready(state)
      best = min(best, time.perf_counter() - start)
    result[batch] = batch * steps / best
  return result


def _run_pair(kind: str, steps: int, rounds: int) -> dict:
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", kind, "--rank", str(r),
                             "--port", str(port), "--steps", str(steps), "--rounds",
                             str(rounds)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env) for r in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  if any(p.returncode for p in procs):
    raise SystemExit(f"{kind} workers failed: {[p.returncode for p in procs]}")
  line = [l for l in outs[0].splitlines() if l.startswith("{")][-1]
  return {int(k): v for k, v in json.loads(line).items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--pairs", type=int, default=2,
                      help="runs of each framework, alternating")
  parser.add_argument("--worker", choices=["torch", "meshnet"], help=argparse.SUPPRESS)
  parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    fn = torch_worker if args.worker == "torch" else meshnet_worker
    print(json.dumps(fn(args.rank, 2, args.port, args.steps, args.rounds)), flush=True)
    return 0
  try:
    import torch
  except ImportError:
    raise SystemExit("this benchmark compares with PyTorch: pip install torch==2.13.0")
  from meshnet.metrics import Bar

  ours, theirs = {}, {}
  bar = Bar(2 * args.pairs, label="ddp: runs of 2 processes", interval=0)  # on stderr
  for i in range(args.pairs):  # alternate, keep each one's best: the machine is noisy
    for kind, best in (("meshnet", ours), ("torch", theirs)):
      for batch, rate in _run_pair(kind, args.steps, args.rounds).items():
        best[batch] = max(best.get(batch, 0.0), rate)
      bar.advance(note=f"{kind} run {i + 1}/{args.pairs}")
  bar.close()
  import jax
  print(f"jax {jax.__version__}, torch {torch.__version__}; 2 processes x 1 CPU device, "
        f"gloo; MLP {WIDTHS}, Adam; {args.steps} steps, best of {args.rounds} rounds "
        f"x {args.pairs} alternating runs")
  print("| global batch | meshnet samples/s | torch DDP samples/s | meshnet / DDP |")
  print("| --- | --- | --- | --- |")
  for batch in BATCHES:
    print(f"| {batch} | {ours[batch]:,.0f} | {theirs[batch]:,.0f} | "
          f"{ours[batch] / theirs[batch]:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
