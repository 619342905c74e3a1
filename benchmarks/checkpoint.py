"""Checkpoint save speed: meshnet (Orbax, async) against numpy on the same disk.

A train state (MLP 784-2048-2048-1024-10 with Adam: parameters and two
moments, about 100 MB) replicated over 8 simulated CPU devices is saved
several times into a temporary directory next to where this runs. Reported,
side by side in one run (best of the repeats):

  blocked ms   how long ``Checkpointer.save`` holds the step loop (copying
               the arrays off the devices and starting the write)
  full ms      until the checkpoint is complete on disk
  MB/s         state bytes / full time
  numpy MB/s   the same arrays (already on the host) written with np.save
  ratio        meshnet MB/s / numpy MB/s

Run: python benchmarks/checkpoint.py [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshnet  # noqa: E402
from meshnet.checkpoint import Checkpointer, to_logical  # noqa: E402
from meshnet.metrics import Bar  # noqa: E402

WIDTHS = [784, 2048, 2048, 1024, 10]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default=".", help="where to make the temporary directory")
  args = parser.parse_args(argv)
  mesh = meshnet.make_mesh(data=-1)
  model = meshnet.models.mlp(WIDTHS)
  state = meshnet.init_train_state(model, optax.adam(1e-3), mesh, jax.random.key(0))
  tree = to_logical(state)
  nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
  root = tempfile.mkdtemp(prefix="meshnet-bench-", dir=args.dir)
  bar = Bar(2 * args.repeats + 1, label="checkpoint: writes", interval=0)  # on stderr
  try:
    checkpointer = Checkpointer(os.path.join(root, "ckpt"), keep=2, log=lambda _: None)
    blocked, full = [], []
    for i in range(args.repeats + 1):  # the first save warms Orbax up; not counted
      start = time.perf_counter()
      checkpointer.save(i + 1, tree, {"sampler": {"position": 0, "seed": 0}})
      t_blocked = time.perf_counter() - start
      checkpointer.wait()
      t_full = time.perf_counter() - start
      if i:
        blocked.append(t_blocked)
        full.append(t_full)
      bar.advance(note="meshnet save" + (" (warm-up)" if not i else ""))
    checkpointer.close()

    host = [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]
    numpy_times = []
    for i in range(args.repeats):
      folder = os.path.join(root, f"numpy{i}")
      os.makedirs(folder)
      start = time.perf_counter()
      for j, array in enumerate(host):
        np.save(os.path.join(folder, f"{j}.npy"), array)
      numpy_times.append(time.perf_counter() - start)
      bar.advance(note="np.save")
  finally:
    bar.close()
    shutil.rmtree(root, ignore_errors=True)

  mb = nbytes / 1e6
  ours = mb / min(full)
  theirs = mb / min(numpy_times)
  print(f"jax {jax.__version__}, state {mb:.1f} MB over 8 simulated CPU devices, "
        f"best of {args.repeats}")
  print("| blocked ms | full ms | MB/s | numpy MB/s | ratio |")
  print("| --- | --- | --- | --- | --- |")
  print(f"| {1e3 * min(blocked):.0f} | {1e3 * min(full):.0f} | {ours:.0f} | {theirs:.0f} | "
        f"{ours / theirs:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
