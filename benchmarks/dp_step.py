"""Data-parallel train step throughput in one process: packed vs combined pmean.

The 784-512-256-128-10 MLP with Adam on 8 simulated CPU devices in one
process, at global batch 256 and 1024. Variants, measured side by side in
the same run (rounds interleaved, best round kept, since this machine is
noisy):

  combined   one pmean per leaf, grouped by XLA's all-reduce combiner
             (meshnet's default within one process)
  packed     leaves packed into flat 32 MiB buckets, one pmean each
             (meshnet's default across processes)
  1 device   the same step on a one-device mesh (no exchange at all)

Run: python benchmarks/dp_step.py [--steps 40] [--rounds 3] [--out FILE]
Simulated devices share this host's cores, so the ratios say what the
program structure costs, not what a network would; the multi-process gloo
benchmark against PyTorch DDP belongs with the multi-host work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshnet  # noqa: E402
from meshnet.metrics import Bar  # noqa: E402
from meshnet.sharding import batch_sharding  # noqa: E402
from meshnet.train import max_steps_in_flight  # noqa: E402

WIDTHS = [784, 512, 256, 128, 10]


def _variant(name, batch_size):
  model = meshnet.models.mlp(WIDTHS)
  optimizer = optax.adam(1e-3)
  devices = jax.devices()[:1] if name == "1 device" else jax.devices()
  mesh = meshnet.make_mesh(data=-1, devices=devices)
  step = meshnet.make_train_step(model, optimizer, mesh,
                                 flatten_buckets=name == "packed")
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.random((batch_size, WIDTHS[0]), np.float32)
  y = rng.integers(0, 10, batch_size).astype(np.int32)
  batch = tuple(jax.device_put(a, batch_sharding(mesh)) for a in (x, y))
  return step, state, batch, max_steps_in_flight(mesh)


def _time(step, state, batch, steps, max_in_flight):
  """Seconds for ``steps`` steps, dispatched as meshnet.train.run does."""
  state, metrics = step(state, batch)  # compile / warm up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  in_flight = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    in_flight.append(metrics["loss"])
    if len(in_flight) >= max_in_flight:
      jax.block_until_ready(in_flight.pop(0))
  jax.block_until_ready((state, metrics))
  return time.perf_counter() - start, state


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None, help="append the markdown table here")
  args = parser.parse_args(argv)
  names = ["combined", "packed", "1 device"]
  rows = []
  batch_sizes = (256, 1024)
  bar = Bar(len(batch_sizes) * args.rounds * len(names), label="dp_step: cases",
            interval=0)  # on stderr; stdout keeps the table only
  for batch_size in batch_sizes:
    setups = {name: list(_variant(name, batch_size)) for name in names}
    best = {name: float("inf") for name in names}
    for r in range(args.rounds):
      for name in names:
        step, state, batch, max_in_flight = setups[name]
        seconds, setups[name][1] = _time(step, state, batch, args.steps, max_in_flight)
        best[name] = min(best[name], seconds)
        bar.advance(note=f"batch {batch_size}, {name}, round {r + 1}")
    rate = {name: batch_size * args.steps / best[name] for name in names}
    rows.append((batch_size, rate))
  bar.close()
  header = ("| global batch | combined samples/s | packed samples/s | 1 device samples/s "
            "| combined / packed | combined / 1 device |")
  lines = [header, "| --- | --- | --- | --- | --- | --- |"]
  for batch_size, rate in rows:
    lines.append(
        f"| {batch_size} | {rate['combined']:,.0f} | {rate['packed']:,.0f} | "
        f"{rate['1 device']:,.0f} | {rate['combined'] / rate['packed']:.2f} | "
        f"{rate['combined'] / rate['1 device']:.2f} |")
  table = "\n".join(lines)
  print(f"jax {jax.__version__}, {len(jax.devices())} simulated CPU devices, "
        f"{os.cpu_count()} cores, {args.steps} steps x best of {args.rounds} rounds")
  print(table)
  if args.out:
    with open(args.out, "a") as f:
      f.write(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
