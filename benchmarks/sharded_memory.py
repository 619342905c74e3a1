"""Per-device memory and step time of sharded layouts on 8 simulated devices.

An MLP 784-4096x4-10 (53.5M parameters) with Adam, global batch 64, on
four meshes of the same 8 simulated CPU devices in one process:

  data=8                  parameters and optimizer state replicated
  fsdp=8                  ZeRO-3: parameters, gradients, optimizer state split
  data=2,fsdp=2,tensor=2  FSDP and Megatron column/row pairs together
  fsdp=2,stage=2,tensor=2 the same inside a 2-stage 1F1B pipeline (M=4): the
                          state stored split over all 8, each stage's
                          vectors over fsdp x tensor

For each: the bytes of parameters and optimizer state on one device (from
the arrays' own shards), XLA's compiled temporary bytes
(``memory_analysis().temp_size_in_bytes``), ``meshnet plan``'s forecast of
the same numbers, and the step time (best of ``--rounds`` rounds of
``--steps`` steps, the layouts alternating round by round) against
``data=8``. Simulated devices share this host's 2 cores, so the time says
what the program structure costs, not what a network would.

Run: python benchmarks/sharded_memory.py [--steps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshnet  # noqa: E402
from meshnet.config import MeshConfig  # noqa: E402

WIDTHS = (784, 4096, 4096, 4096, 4096, 10)
MESHES = {"data=8": dict(data=8), "fsdp=8": dict(fsdp=8),
          "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2),
          "fsdp=2,stage=2,tensor=2": dict(fsdp=2, stage=2, tensor=2)}
MICROBATCHES = 4  # with stage > 1


def _device_bytes(tree) -> int:
  """Bytes of ``tree`` on the first device (its shard of every leaf)."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def _layout(name: str, batch_size: int):
  model = meshnet.models.mlp(WIDTHS)
  optimizer = optax.adam(1e-3)
  mesh = meshnet.make_mesh(**MESHES[name])
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  staged = MESHES[name].get("stage", 1) > 1
  pipe = (meshnet.make_pipeline(model, mesh, WIDTHS[:1], microbatches=MICROBATCHES)
          if staged else None)
  step = meshnet.make_train_step(model, optimizer, mesh, donate=True, pipeline=pipe)
  rng = np.random.default_rng(0)
  x = rng.random((batch_size, WIDTHS[0]), np.float32)
  y = rng.integers(0, WIDTHS[-1], batch_size).astype(np.int32)
  batch = tuple(jax.device_put(a, meshnet.sharding.batch_sharding(mesh)) for a in (x, y))
  compiled = step.lower(state, batch).compile()
  memory = {
      "params": _device_bytes(state.params), "opt_state": _device_bytes(state.opt_state),
      "temp": compiled.memory_analysis().temp_size_in_bytes,
  }
  forecast = meshnet.plan(meshnet.PlanConfig(
      widths=WIDTHS, batch_size=batch_size, mesh=MeshConfig(**MESHES[name]),
      microbatches=MICROBATCHES if staged else None,
      device=meshnet.hardware.device_spec("cpu", flops=1e11, memory_bandwidth=1e10)))
  return {"step": step, "state": state, "batch": batch, "memory": memory, "plan": forecast}


def _time(layout, steps: int) -> float:
  state, batch = layout["state"], layout["batch"]
  jax.block_until_ready(state)
  begin = time.perf_counter()
  for _ in range(steps):
    state, metrics = layout["step"](state, batch)
  jax.block_until_ready((state, metrics))
  layout["state"] = state
  return (time.perf_counter() - begin) / steps


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args(argv)
  layouts = {name: _layout(name, args.batch_size) for name in MESHES}
  for layout in layouts.values():  # compile and warm up
    _time(layout, 1)
  best = {name: float("inf") for name in MESHES}
  for _ in range(args.rounds):
    for name, layout in layouts.items():
      best[name] = min(best[name], _time(layout, args.steps))
  params = sum(int(np.prod(s)) for s in (
      [(a, b) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])] + [(b,) for b in WIDTHS[1:]]))
  print(f"MLP {'-'.join(map(str, WIDTHS))} ({params / 1e6:.1f}M parameters), adam, "
        f"global batch {args.batch_size}, 8 simulated CPU devices; per device, MiB; "
        f"step time best of {args.rounds} rounds of {args.steps} steps")
  print()
  print("| mesh | params | optimizer state | params + opt vs data=8 | XLA temp | plan params "
        "+ opt | plan temp / XLA | step ms | step vs data=8 |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  base = layouts["data=8"]["memory"]
  for name, layout in layouts.items():
    m, p = layout["memory"], layout["plan"]
    total = m["params"] + m["opt_state"]
    planned = p.memory.params + p.memory.optimizer
    print(f"| {name} | {_mib(m['params'])} | {_mib(m['opt_state'])} | "
          f"{total / (base['params'] + base['opt_state']):.3f} | {_mib(m['temp'])} | "
          f"{_mib(planned)} | {p.memory.temporaries / m['temp']:.2f} | "
          f"{best[name] * 1e3:,.0f} | {best[name] / best['data=8']:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
