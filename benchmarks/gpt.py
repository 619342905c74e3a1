"""A GPT's train step: meshnet's against plain ``jax.jit``, and sharded layouts.

Two tables, 8 simulated CPU devices in one process:

1. One device: meshnet's train step (``meshnet.init_train_state`` +
   ``meshnet.make_train_step`` on a one-device mesh, Adam) against a
   hand-written ``jax.jit`` step of the same model (the gpt's own ``apply``,
   ``optax.adam``, token cross-entropy written here; no meshnet step code),
   same parameters and batches. The ratio is meshnet's overhead (the
   ``shard_map``, the loss riding in the gradient's bucket, ``grad_norm``
   and the finiteness check in the metrics); the goal is <= 1.05.
2. Eight devices, four meshes of the same global batch:

     data=8                  parameters and Adam state replicated
     fsdp=8                  ZeRO-3: parameters and optimizer state split
     data=2,fsdp=2,tensor=2  FSDP and Megatron column/row pairs together
     fsdp=2,stage=4          a 4-stage 1F1B pipeline (M=4) over fsdp=2

   tokens/s and, per device, the bytes of parameters and optimizer state
   (from the arrays' own shards) and XLA's compiled temporary bytes
   (``memory_analysis().temp_size_in_bytes``).

Times are the best of ``--rounds`` rounds of ``--steps`` steps, the steps
under comparison alternating round by round. Simulated devices share this
host's cores, so table 2's tokens/s say what the program structure costs,
not what a network would.

Run: python benchmarks/gpt.py [--steps 5] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshnet  # noqa: E402
from gpt_steps import plain_step, timed  # noqa: E402  (same directory)
from meshnet.sharding import batch_sharding  # noqa: E402

# The one-device comparison: gpt "tiny" made 4 blocks deep (0.86M parameters).
SHAPE = dict(layers=4, heads=4, width=128, context=64)
QUICK_SHAPE = dict(layers=2, heads=4, width=32, context=16)
MESHES = {"data=8": dict(data=8), "fsdp=8": dict(fsdp=8),
          "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2),
          "fsdp=2,stage=4": dict(fsdp=2, stage=4)}
MICROBATCHES = 4  # with stage > 1
LR = 1e-3


def _device_bytes(tree) -> int:
  """Bytes of ``tree`` on the first device (its shard of every leaf)."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def _tokens(batch_size: int, context: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A next-token batch ``(x [B, T], y [B, T])`` of random bytes, int32."""
  seq = np.random.default_rng(seed).integers(0, 256, (batch_size, context + 1))
  seq = seq.astype(np.int32)
  return seq[:, :-1], seq[:, 1:]


def one_device(shape: dict, batch_size: int, steps: int, rounds: int) -> dict:
  """meshnet's step and the plain ``jax.jit`` step on one device: best seconds
  per step of each and the two losses after the warm-up step (the same
  program, so they agree)."""
  model = meshnet.models.gpt(None, **shape)
  optimizer = optax.adam(LR)
  device = jax.devices()[0]
  mesh = meshnet.make_mesh(data=1, devices=[device])
  x, y = _tokens(batch_size, shape["context"])
  batch = tuple(jax.device_put(a, batch_sharding(mesh)) for a in (x, y))

  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  params = jax.device_put(model.init(jax.random.split(jax.random.key(0))[0]), device)
  meshnet_step = meshnet.make_train_step(model, optimizer, mesh, donate=True)
  plain = plain_step(model, optimizer)

  plain_batch = tuple(jax.device_put(a, device) for a in (x, y))  # no mesh axes
  runs = {
      "meshnet": (lambda c: meshnet_step(c[0], batch), (state, None)),
      "jax.jit": (lambda c: plain(c[0], c[1], *plain_batch),
                  (params, jax.device_put(optimizer.init(params), device), None)),
  }
  carries, best, losses = {}, {}, {}
  for name, (step, carry) in runs.items():  # compile and warm up
    carries[name], _ = timed(step, carry, 1)
    best[name] = float("inf")
  losses["meshnet"] = float(carries["meshnet"][1]["loss"])
  losses["jax.jit"] = float(carries["jax.jit"][2])
  for _ in range(rounds):
    for name, (step, _) in runs.items():
      carries[name], seconds = timed(step, carries[name], steps)
      best[name] = min(best[name], seconds)
  return {"seconds": best, "losses": losses,
          "params": sum(a.size for a in jax.tree.leaves(params))}


def _layout(name: str, shape: dict, batch_size: int) -> dict:
  model = meshnet.models.gpt(None, **shape)
  optimizer = optax.adam(LR)
  mesh = meshnet.make_mesh(**MESHES[name])
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  staged = MESHES[name].get("stage", 1) > 1
  pipe = (meshnet.make_pipeline(model, mesh, (shape["context"],), microbatches=MICROBATCHES,
                                input_dtype=jnp.int32) if staged else None)
  step = meshnet.make_train_step(model, optimizer, mesh, donate=True, pipeline=pipe)
  batch = tuple(jax.device_put(a, batch_sharding(mesh))
                for a in _tokens(batch_size, shape["context"]))
  compiled = step.lower(state, batch).compile()
  memory = {"params": _device_bytes(state.params), "opt_state": _device_bytes(state.opt_state),
            "temp": compiled.memory_analysis().temp_size_in_bytes}
  return {"step": lambda c: compiled(c[0], batch), "carry": (state, None), "memory": memory}


def sharded(shape: dict, batch_size: int, steps: int, rounds: int) -> dict:
  """Every mesh of :data:`MESHES`: ``{name: {"seconds", "memory"}}``."""
  layouts = {name: _layout(name, shape, batch_size) for name in MESHES}
  for layout in layouts.values():  # warm up
    layout["carry"], _ = timed(layout["step"], layout["carry"], 1)
    layout["seconds"] = float("inf")
  for _ in range(rounds):
    for layout in layouts.values():
      layout["carry"], seconds = timed(layout["step"], layout["carry"], steps)
      layout["seconds"] = min(layout["seconds"], seconds)
  return {name: {"seconds": layout["seconds"], "memory": layout["memory"]}
          for name, layout in layouts.items()}


def _mib(n: float) -> str:
  return f"{n / 2**20:,.2f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=16,
                      help="one-device batch (sequences)")
  parser.add_argument("--sharded-batch-size", type=int, default=32,
                      help="global batch on the 8-device meshes (sequences)")
  parser.add_argument("--quick", action="store_true",
                      help="a 2-block width-32 GPT, 1 round of 2 steps: seconds, for tests")
  args = parser.parse_args(argv)
  shape = QUICK_SHAPE if args.quick else SHAPE
  steps, rounds = (2, 1) if args.quick else (args.steps, args.rounds)
  describe = ", ".join(f"{k} {v}" for k, v in shape.items())

  one = one_device(shape, args.batch_size, steps, rounds)
  s = one["seconds"]
  tokens = args.batch_size * shape["context"]
  print(f"GPT ({describe}; {one['params'] / 1e6:.2f}M parameters), adam, batch "
        f"{args.batch_size} x {shape['context']} tokens, one CPU device; best of {rounds} "
        f"rounds of {steps} steps")
  print()
  print("| step | ms/step | tokens/s | vs jax.jit | loss after 1 step |")
  print("| --- | --- | --- | --- | --- |")
  for name in ("jax.jit", "meshnet"):
    print(f"| {name} | {s[name] * 1e3:,.1f} | {tokens / s[name]:,.0f} | "
          f"{s[name] / s['jax.jit']:.3f} | {one['losses'][name]:.4f} |")
  print()

  layouts = sharded(shape, args.sharded_batch_size, steps, rounds)
  tokens = args.sharded_batch_size * shape["context"]
  print(f"The same GPT, adam, global batch {args.sharded_batch_size} x {shape['context']} "
        f"tokens, 8 simulated CPU devices; per device, MiB; best of {rounds} rounds of "
        f"{steps} steps")
  print()
  print("| mesh | tokens/s | ms/step | params | optimizer state | params + opt vs data=8 | "
        "XLA temp |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  base = layouts["data=8"]["memory"]
  for name, layout in layouts.items():
    m, seconds = layout["memory"], layout["seconds"]
    total = m["params"] + m["opt_state"]
    print(f"| {name}{' (1f1b, M=4)' if 'stage' in name else ''} | {tokens / seconds:,.0f} | "
          f"{seconds * 1e3:,.1f} | {_mib(m['params'])} | {_mib(m['opt_state'])} | "
          f"{total / (base['params'] + base['opt_state']):.3f} | {_mib(m['temp'])} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
