"""Gradient exchange across 2 processes over gloo: packed vs combined pmean.

Starts two processes on this host, joined with ``jax.distributed`` (CPU
collectives over gloo), one device each, mesh ``data=2``. Each reduces the
784-512-256-128-10 MLP's gradient pytree (567,434 float32) with
``meshnet.collectives.pmean_bucketed``:

  packed     flatten=True: one flat bucket, one all-reduce
  combined   flatten=False: one pmean per leaf, grouped by XLA's combiner
             into one all-reduce op with 8 operands

Rounds alternate between the two; the best of each is kept.

Run: python benchmarks/gloo_exchange.py [--iters 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

SHAPES = [(784, 512), (512,), (512, 256), (256,), (256, 128), (128,), (128, 10), (10,)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def worker(process_id: int, port: int, iters: int, rounds: int) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  import meshnet
  from meshnet.collectives import pmean_bucketed

  mesh = meshnet.make_mesh(data=-1)
  sharding = NamedSharding(mesh, P("data"))
  tree = [jax.make_array_from_process_local_data(
      sharding, np.full((1, *shape), process_id + 1, np.float32)) for shape in SHAPES]

  def program(flatten):
    def local(t):
      reduced = pmean_bucketed([a[0] for a in t], "data", flatten=flatten)
      return [a[None] for a in reduced]
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))

  programs = {"packed": program(True), "combined": program(False)}
  best = {}
  for _ in range(rounds):
    for name, f in programs.items():
      out = jax.block_until_ready(f(tree))
      start = time.perf_counter()
      for _ in range(iters):
        out = jax.block_until_ready(f(tree))
      best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / iters)
      value = float(np.asarray(out[0].addressable_shards[0].data).ravel()[0])
      assert value == 1.5, value  # mean of 1 and 2
  if process_id == 0:
    print(f"jax {jax.__version__}, 2 processes x 1 CPU device, gloo, "
          f"{sum(int(np.prod(s)) for s in SHAPES):,} float32, best of {rounds} rounds")
    print("| packed ms | combined ms | combined / packed |")
    print("| --- | --- | --- |")
    print(f"| {1e3 * best['packed']:.2f} | {1e3 * best['combined']:.2f} | "
          f"{best['combined'] / best['packed']:.2f} |", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker is not None:
    worker(args.worker, args.port, args.iters, args.rounds)
    return 0
  port = _free_port()
  command = [sys.executable, __file__, "--iters", str(args.iters), "--rounds",
             str(args.rounds), "--port", str(port), "--worker"]
  # Progress on stderr (the workers' own stderr, gloo's chatter, is dropped).
  print(f"gloo_exchange: 2 worker processes: joining, compiling, then {args.rounds} rounds "
        f"x {args.iters} exchanges of each kind ...", file=sys.stderr, flush=True)
  began = time.perf_counter()
  procs = [subprocess.Popen(command + [str(i)], stderr=subprocess.DEVNULL)
           for i in range(2)]
  codes = [p.wait(timeout=600) for p in procs]
  print(f"gloo_exchange: workers done in {time.perf_counter() - began:.0f} s (exit codes "
        f"{codes})", file=sys.stderr, flush=True)
  return max(codes)


if __name__ == "__main__":
  sys.exit(main())
