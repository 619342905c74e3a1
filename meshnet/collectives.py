"""Collectives over named mesh axes, for use inside ``shard_map``.

A gradient pytree has many small leaves; reducing each on its own costs one
collective launch (and, across hosts, one network round trip) per leaf. The
bucketed reductions here pack the leaves into a few flat buffers of at most
``bucket_bytes`` each (per dtype), reduce each buffer once, and unpack; the
result is exactly what per-leaf reductions give.

``flatten=False`` instead emits one reduction per leaf and leaves the
grouping to XLA's all-reduce combiner, which merges them into one collective
op with many operands (checked: one all-reduce in the compiled program).
Measured here (jax 0.10.2, CPU, the 784-512-256-128-10 MLP with Adam;
``benchmarks/RESULTS.md``):

* the exchange alone across 2 processes over gloo: the flat buffer reduces
  in 12.9 ms against 15.4 ms for the combined many-operand op;
* but whole train steps across 2 processes: combined 10-14k samples/s at
  global batch 256 against about 6k packed (the packing copy waits for the
  whole backward and, on XLA:CPU, is a slow elementwise concatenate);
* whole train steps on 8 simulated devices in one process: combined 13.3k
  against 0.4k packed at batch 256.

So :func:`meshnet.step.make_grad_fn` leaves the grouping to XLA by default
(``flatten_buckets=False``); packing stays available for backends where a
flat buffer pays.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BUCKET_BYTES = 32 * 2**20

AxisName = str | Sequence[str]


def plan_buckets(
    shapes_dtypes: Sequence[tuple[tuple[int, ...], Any]], bucket_bytes: int
) -> list[list[int]]:
  """Groups leaf indices into buckets of one dtype and at most ``bucket_bytes``.

  Leaves keep their order within a dtype; a leaf larger than ``bucket_bytes``
  gets a bucket of its own.

  Args:
    shapes_dtypes: ``(shape, dtype)`` of each leaf.
    bucket_bytes: the most bytes one bucket holds (> 0).

  Returns:
    Lists of leaf indices, one list per bucket.
  """
  if bucket_bytes <= 0:
    raise ValueError(f"bucket_bytes={bucket_bytes} must be > 0")
  buckets: list[list[int]] = []
  open_bucket: dict[Any, tuple[list[int], int]] = {}
  for i, (shape, dtype) in enumerate(shapes_dtypes):
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    current = open_bucket.get(dtype)
    if current is not None and current[1] + nbytes <= bucket_bytes:
      current[0].append(i)
      open_bucket[dtype] = (current[0], current[1] + nbytes)
      continue
    bucket = [i]
    buckets.append(bucket)
    open_bucket[dtype] = (bucket, nbytes)
  return buckets


def _bucketed(
    reduce: Callable[[jax.Array], jax.Array], tree: Any, bucket_bytes: int
) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  plan = plan_buckets([(leaf.shape, leaf.dtype) for leaf in leaves], bucket_bytes)
  # The barrier materialises the leaves before they are packed: without it
  # XLA fuses the computation of each leaf (e.g. a gradient's reduction over
  # the batch) into the packing concatenate, which on XLA:CPU made a whole
  # train step 10x slower.
  leaves = jax.lax.optimization_barrier(leaves)
  out: list[jax.Array | None] = [None] * len(leaves)
  for bucket in plan:
    if len(bucket) == 1:
      (i,) = bucket
      out[i] = reduce(leaves[i])
      continue
    flat = jnp.concatenate([leaves[i].reshape(-1) for i in bucket])
    reduced = reduce(flat)
    offset = 0
    for i in bucket:
      size = leaves[i].size
      out[i] = reduced[offset:offset + size].reshape(leaves[i].shape)
      offset += size
  return jax.tree.unflatten(treedef, out)


def ordered_pmean(x: jax.Array, axis_name: str, axis_size: int) -> jax.Array:
  """Mean over ``axis_name`` summed in axis order, the same on every layout.

  An all-reduce's summation order depends on how the devices are spread
  over processes (in-process XLA:CPU and a gloo ring add in different
  orders), so its last bits can differ between a 1-process and a 2-process
  run. Gathering every device's value and adding them as
  ``((x0 + x1) + x2) + ...`` gives bit-identical results on any layout, for
  ``axis_size`` times the traffic of an all-reduce.
  """
  # An exact gather that is invariant over the axis: each device puts its
  # value in its own row of zeros and the rows are summed (x + 0 is exact).
  rows = jnp.zeros((axis_size, *x.shape), x.dtype)
  rows = rows.at[jax.lax.axis_index(axis_name)].set(x)
  gathered = jax.lax.psum(rows, axis_name)  # [axis_size, ...] in axis order
  total = gathered[0]
  for i in range(1, axis_size):
    total = total + gathered[i]
  return total / axis_size


def pmean_bucketed(
    tree: Any, axis_name: AxisName, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    flatten: bool = True, ordered_size: int | None = None,
) -> Any:
  """``lax.pmean`` of every leaf over ``axis_name``, in few large reductions.

  Call inside ``shard_map``. Leaves may have any shapes and dtypes; the
  output has the same structure, shapes and dtypes and is invariant over
  ``axis_name``.

  Args:
    tree: pytree of arrays, varying over ``axis_name``.
    axis_name: mesh axis name (or tuple of names) to average over.
    bucket_bytes: the most bytes one packed reduction carries.
    flatten: pack leaves into flat buckets (one collective per bucket); if
      false, one reduction per leaf, grouped by XLA's combiner.
    ordered_size: if given (the size of ``axis_name``), reduce with
      :func:`ordered_pmean`: bit-identical on any process layout.
  """
  with jax.named_scope(f"pmean_bucketed[{axis_name}]"):
    if ordered_size is not None:
      reduce = lambda x: ordered_pmean(x, axis_name, ordered_size)
    else:
      reduce = lambda x: jax.lax.pmean(x, axis_name)
    if not flatten:
      return jax.tree.map(reduce, tree)
    return _bucketed(reduce, tree, bucket_bytes)


def psum_bucketed(
    tree: Any, axis_name: AxisName, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    flatten: bool = True,
) -> Any:
  """``lax.psum`` of every leaf over ``axis_name``, in few large reductions.

  Same contract as :func:`pmean_bucketed`, summing instead of averaging.
  """
  with jax.named_scope(f"psum_bucketed[{axis_name}]"):
    reduce = lambda x: jax.lax.psum(x, axis_name)
    if not flatten:
      return jax.tree.map(reduce, tree)
    return _bucketed(reduce, tree, bucket_bytes)
