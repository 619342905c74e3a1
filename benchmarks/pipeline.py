"""Pipeline schedules at S=4: FLOPs, peak temporary memory, wall time, bubble.

An 8-layer MLP 784-512-384-256-192-128-96-64-10 (two layers per stage;
one per virtual stage for interleaved with v=2) on a mesh ``stage=4`` of
simulated CPU devices, microbatches of 32 examples, M in {4, 8, 16} (so the
batch grows with M). For each schedule, from the compiled gradient program:

  flops/ref   FLOPs of all the ops the table runs (each op kind of each
              stage on one microbatch measured by XLA cost analysis, times
              how often the table runs it), over the unpipelined gradient's
              FLOPs on one device for the same batch. XLA's cost analysis of
              the whole pipelined program is not used: it counts a scan
              body once and every branch of a switch.
  temp MiB    compiled memory analysis: temporary bytes per device
  ms          wall time of one gradient computation (best of rounds)
  bubble      the schedule's theoretical bubble (idle fraction of the time)
  ticks       the table's length

Run: python benchmarks/pipeline.py [--rounds 3] [--iters 3]
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

import meshnet  # noqa: E402
from meshnet.metrics import Bar  # noqa: E402
from meshnet.sharding import batch_sharding  # noqa: E402

WIDTHS = [784, 512, 384, 256, 192, 128, 96, 64, 10]
STAGES = 4
MICRO = 32
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zb", 1), ("interleaved", 2)]


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def _op_flops(pipe, params, x_mb, y_mb, key) -> dict[tuple[str, int], float]:
  """FLOPs of F, B (full or input half) and W for each virtual stage, on one
  microbatch, as the executor's branches compute them (backwards recompute
  the stage's forward under vjp)."""
  import jax.numpy as jnp
  from jax.flatten_util import ravel_pytree
  from meshnet import losses

  K = pipe.num_virtual_stages
  N, D = pipe.param_width, pipe.activation_width
  split = pipe.schedule.split_backward
  costs = {}
  x_pad = jnp.zeros((x_mb.shape[0], D), jnp.float32)
  for k in range(K):
    flat, _ = ravel_pytree(pipe.stage_params(params, k))
    flat = jnp.pad(flat, (0, N - flat.shape[0]))
    xin = jnp.pad(x_mb, ((0, 0), (0, D - x_mb.shape[1]))) if k == 0 else x_pad
    if k == K - 1:
      fn = lambda f, x, k=k: jnp.mean(losses.cross_entropy(
          pipe._stage_forward(k, f, x, key, True), y_mb))
      seed = jnp.ones(())
    else:
      fn = lambda f, x, k=k: pipe._stage_forward(k, f, x, key, True)
      seed = x_pad
    fwd = lambda f, x: fn(f, x)
    full = lambda f, x, c: jax.vjp(fn, f, x)[1](c)
    inp = lambda f, x, c: jax.vjp(lambda x: fn(f, x), x)[1](c)
    wgt = lambda f, x, c: jax.vjp(lambda f: fn(f, x), f)[1](c)
    costs[("F", k)] = _flops(jax.jit(fwd).lower(flat, xin).compile())
    costs[("B", k)] = _flops(jax.jit(inp if split else full).lower(flat, xin, seed).compile())
    costs[("W", k)] = _flops(jax.jit(wgt).lower(flat, xin, seed).compile())
  return costs


def _table_flops(pipe, costs) -> float:
  S = pipe.schedule.num_stages
  return sum(costs[(op.kind, op.chunk * S + d)] for row in pipe.schedule.table
             for d, op in enumerate(row) if op is not None)


def _time(fn, args, iters, rounds):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(iters):
      jax.block_until_ready(fn(*args))
    best = min(best, (time.perf_counter() - start) / iters)
  return best


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args(argv)
  model = meshnet.models.mlp(WIDTHS)
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  one = meshnet.make_mesh(devices=jax.devices()[:1])
  mesh = meshnet.make_mesh(stage=STAGES, devices=jax.devices()[:STAGES])
  key = jax.random.key(1)
  rows = []
  microbatches = (4, 8, 16)
  bar = Bar(len(microbatches) * (1 + len(SCHEDULES)), label="pipeline: cases",
            interval=0)  # on stderr; stdout keeps the table only
  for M in microbatches:
    B = MICRO * M
    x = rng.random((B, WIDTHS[0]), np.float32)
    y = rng.integers(0, 10, B).astype(np.int32)
    ref_fn = jax.jit(meshnet.make_grad_fn(model, one))
    ref_batch = tuple(jax.device_put(a, batch_sharding(one)) for a in (x, y))
    ref_params = jax.device_put(params, jax.devices()[0])
    ref_compiled = ref_fn.lower(ref_params, ref_batch, key).compile()
    ref_flops = _flops(ref_compiled)
    ref_ms = 1e3 * _time(ref_compiled, (ref_params, ref_batch, key), args.iters, args.rounds)
    rows.append(("unpipelined, 1 device", M, 1.0,
                 ref_compiled.memory_analysis().temp_size_in_bytes / 2**20, ref_ms,
                 float("nan"), 0))
    bar.advance(note=f"M={M} unpipelined")
    for name, v in SCHEDULES:
      pipe = meshnet.make_pipeline(model, mesh, (WIDTHS[0],), schedule=name,
                                   microbatches=M, virtual_stages=v)
      stacked = pipe.stack(params)
      batch = tuple(jax.device_put(a, batch_sharding(mesh)) for a in (x, y))
      compiled = jax.jit(pipe.make_grad_fn()).lower(stacked, batch, key).compile()
      flops = _table_flops(pipe, _op_flops(pipe, params, x[:MICRO], y[:MICRO], key))
      temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
      ms = 1e3 * _time(compiled, (stacked, batch, key), args.iters, args.rounds)
      label = f"{name} (v={v})" if v > 1 else name
      rows.append((label, M, flops / ref_flops, temp, ms, pipe.schedule.bubble,
                   pipe.schedule.num_ticks))
      bar.advance(note=f"M={M} {label}")
  bar.close()
  print(f"jax {jax.__version__}, MLP {WIDTHS}, S={STAGES} simulated CPU devices, "
        f"microbatch {MICRO}, best of {args.rounds} rounds x {args.iters}")
  print("| schedule | M | flops / unpipelined | temp MiB per device | ms per gradient "
        "| bubble | ticks |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name, M, flops, temp, ms, bubble, ticks in rows:
    bubble_text = "-" if np.isnan(bubble) else f"{bubble:.3f}"
    print(f"| {name} | {M} | {flops:.2f} | {temp:.2f} | {ms:.1f} | {bubble_text} | "
          f"{ticks or '-'} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
