"""What the exactness fixes of issue 9 cost, measured side by side in one run.

1. Dropout drawn per example (``meshnet.model.apply_train``: the model runs
   under ``vmap`` over single examples with keys ``fold_in(key, i)``) vs the
   same model drawing one mask for the whole batch from one key (layout-
   dependent, what meshnet did before): gradient of the 784-512-256-128-10
   MLP, dropout 0.2, batch 1024, one device.
2. The pipelined train step now keeps the model's own parameter tree: each
   step stacks it per stage and gathers the gradient back (one all-gather over
   ``stage``), and optax updates the tree (replicated). Against it: the
   executor's stacked gradient with the update applied to the stacked
   ``[S, v, N]`` array (what meshnet did before: wrong for per-leaf
   optimizers). MLP 784-512x4-10, Adam, batch 512, ``stage=2`` x ``data=1``
   on 2 simulated devices in one process.

Run: python benchmarks/exactness_costs.py [--steps 30] [--rounds 3]
Prints a markdown table; rounds are interleaved and the best kept.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshnet  # noqa: E402
from meshnet import losses  # noqa: E402
from meshnet.metrics import Bar  # noqa: E402
from meshnet.model import apply_train  # noqa: E402


def _dropout_variants(batch_size: int):
  model = meshnet.models.mlp([784, 512, 256, 128, 10], dropout=0.2)
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((batch_size, 784), np.float32))
  y = jnp.asarray(rng.integers(0, 10, batch_size).astype(np.int32))

  def loss(forward):
    return jax.jit(jax.grad(lambda p, key: jnp.mean(losses.cross_entropy(forward(p, key), y))))

  per_example = loss(lambda p, key: apply_train(model.apply, p, x, key))
  whole_batch = loss(lambda p, key: model.apply(p, x, train=True, key=key))
  return {"dropout per example": lambda: per_example(params, jax.random.key(1)),
          "dropout whole batch": lambda: whole_batch(params, jax.random.key(1))}


def _pipeline_variants(batch_size: int):
  model = meshnet.models.mlp([784, 512, 512, 512, 512, 10])
  optimizer = optax.adam(1e-3)
  mesh = meshnet.make_mesh(data=1, stage=2)
  pipe = meshnet.make_pipeline(model, mesh, (784,), schedule="1f1b", microbatches=4)
  rng = np.random.default_rng(0)
  batch = (rng.random((batch_size, 784), np.float32),
           rng.integers(0, 10, batch_size).astype(np.int32))
  tree_step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe, donate=False)
  tree_state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))

  grad_fn = pipe.make_grad_fn()
  stacked = pipe.stack(model.init(jax.random.key(0)))
  with jax.set_mesh(mesh):
    opt_state = jax.jit(optimizer.init)(stacked)

  @jax.jit
  def stacked_step(params, opt_state, batch):
    _, grads = grad_fn(params, batch, jax.random.key(0))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return {"pipeline step, tree update": lambda: tree_step(tree_state, batch)[1]["loss"],
          "pipeline step, stacked update": lambda: stacked_step(stacked, opt_state, batch)[0]}


def _best_ms(variants, steps: int, rounds: int, bar: Bar) -> dict[str, float]:
  for name, fn in variants.items():
    jax.block_until_ready(fn())  # compile
    bar.advance(note=f"{name}: compiled")
  best = {name: float("inf") for name in variants}
  for r in range(rounds):
    for name, fn in variants.items():
      start = time.perf_counter()
      for _ in range(steps):
        out = fn()
      jax.block_until_ready(out)
      best[name] = min(best[name], 1e3 * (time.perf_counter() - start) / steps)
      bar.advance(note=f"{name}: round {r + 1}")
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  print("| what | new ms | old ms | new / old |")
  print("| --- | --- | --- | --- |")
  # 2 comparisons x 2 variants, each compiled once and timed `rounds` times.
  bar = Bar(2 * 2 * (1 + args.rounds), label="exactness_costs: cases", interval=0)
  for variants in (_dropout_variants(1024), _pipeline_variants(512)):
    ms = _best_ms(variants, args.steps, args.rounds, bar)
    bar.close()
    (new, new_ms), (old, old_ms) = ms.items()
    print(f"| {new} vs {old.split(', ')[-1]} | {new_ms:.2f} | {old_ms:.2f} | "
          f"{new_ms / old_ms:.2f} |")


if __name__ == "__main__":
  main()
