"""The weight gradient's matmul on XLA:CPU: ``x @ w`` against meshnet.nn.matmul.

Under autodiff, ``x @ w``'s weight gradient is ``x^T @ dy`` contracted over
the batch; XLA:CPU hands it to its slower fallback kernel because ``x^T``
read in place is column-major. :func:`meshnet.nn.matmul` transposes ``x``
once. This script times, side by side on one pinned core: the weight
gradient alone for a few shapes, then a whole forward and backward of the
MLPs the scaling benchmark trains (784-1024x8-10 and the MNIST
784-512-256-128-10), written with each. Best of 5 spells, alternating.

Run: python benchmarks/matmul_grad.py [--all-cores]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _pin() -> None:
  """Pins this process to one core and sets the math libraries' thread
  counts as ``meshnet launch --cpus-per-process 1`` does, before jax starts
  (glibc's allocator settings only take effect from a process's start: run
  the script under ``meshnet launch -n 1 --cpus-per-process 1`` for those)."""
  from meshnet.launch import THREAD_VARIABLES
  cpu = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cpu})
  os.environ.update({name: "1" for name in THREAD_VARIABLES})
  os.environ["XLA_FLAGS"] = " ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if "host_platform_device_count" not in f)


def _time(fns: dict, args: tuple, spells: int = 5, budget_s: float = 0.4) -> dict[str, float]:
  """ms a call of each jitted ``fn(*args)``, best of ``spells``, alternating."""
  import jax
  compiled = {name: jax.jit(fn) for name, fn in fns.items()}
  calls = {}
  for name, fn in compiled.items():
    jax.block_until_ready(fn(*args))
    began = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls[name] = max(1, int(budget_s / max(time.perf_counter() - began, 1e-6)))
  best = {name: float("inf") for name in compiled}
  for _ in range(spells):
    for name, fn in compiled.items():
      began = time.perf_counter()
      for _ in range(calls[name]):
        out = fn(*args)
      jax.block_until_ready(out)
      best[name] = min(best[name], (time.perf_counter() - began) / calls[name] * 1e3)
  return best


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--all-cores", action="store_true", help="do not pin to one core")
  args = parser.parse_args(argv)
  if not args.all_cores:
    _pin()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from meshnet import nn

  plain = lambda x, w: x @ w
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{'all cores' if args.all_cores else 'one pinned core'}\n")
  print("| weight gradient `x^T @ dy` | x @ w ms | meshnet.nn.matmul ms | speedup |")
  print("| --- | --- | --- | --- |")
  for b, i, o in [(256, 1024, 1024), (2048, 1024, 1024), (512, 784, 512), (1024, 784, 512),
                  (512, 512, 256), (128, 1024, 1024)]:
    x = jnp.asarray(rng.standard_normal((b, i)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((i, o)) / np.sqrt(i), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((b, o)), jnp.float32)
    grad_w = lambda mm: (lambda x, w, dy: jax.vjp(lambda v: mm(x, v), w)[1](dy)[0])
    ms = _time({"plain": grad_w(plain), "meshnet": grad_w(nn.matmul)}, (x, w, dy))
    print(f"| [{b}, {i}] x [{b}, {o}] | {ms['plain']:.2f} | {ms['meshnet']:.2f} | "
          f"{ms['plain'] / ms['meshnet']:.2f}x |", flush=True)

  print("\n| MLP forward + backward (cross-entropy) | batch | x @ w ms | meshnet.nn.matmul ms "
        "| speedup |")
  print("| --- | --- | --- | --- | --- |")
  for widths, batches in [((784,) + (1024,) * 8 + (10,), (256, 2048)),
                          ((784, 512, 256, 128, 10), (512, 1024))]:
    params = [(jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
               jnp.zeros((b,), jnp.float32)) for a, b in zip(widths[:-1], widths[1:])]
    for batch in batches:
      x = jnp.asarray(rng.random((batch, widths[0])), jnp.float32)
      y = jnp.asarray(rng.integers(0, widths[-1], batch))

      def step(mm):
        def loss(ps, x, y):
          h = x
          for k, (w, b) in enumerate(ps):
            h = mm(h, w) + b[None, :]
            h = jax.nn.relu(h) if k < len(ps) - 1 else h
          return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], 1))
        return jax.value_and_grad(loss)
      ms = _time({"plain": step(plain), "meshnet": step(nn.matmul)}, (params, x, y))
      name = "-".join(map(str, widths))
      print(f"| {name} | {batch} | {ms['plain']:.1f} | {ms['meshnet']:.1f} | "
            f"{ms['plain'] / ms['meshnet']:.2f}x |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
