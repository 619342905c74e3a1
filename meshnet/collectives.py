"""Collectives over named mesh axes, for use inside ``shard_map``.

A gradient pytree has many small leaves; reducing each on its own costs one
collective launch (and, across hosts, one network round trip: about 2 ms per
gloo all-reduce here, whatever its size up to ~100k floats) per leaf. The
bucketed reductions here pack the leaves into a few flat buffers of at most
``bucket_bytes`` each (per dtype), reduce each buffer once, and unpack; the
result is exactly what per-leaf reductions give.

Packing writes each leaf into a zero buffer with ``dynamic_update_slice``
(plain copies). Packing with ``concatenate`` instead is an elementwise
fusion on XLA:CPU that made whole train steps 2-30x slower.
``flatten=False`` emits one reduction per leaf and leaves the grouping to
XLA's all-reduce combiner: one all-reduce op with many operands, which gloo
still runs as one call per operand. Measured here (jax 0.10.2, CPU, the
784-512-256-128-10 MLP with Adam; ``benchmarks/RESULTS.md``): across 2
processes over gloo, packed 11.8 ms/step against 22 ms combined; on 8
simulated devices in one process, combined is about 10% faster. Packing is
the default (``meshnet.step.make_grad_fn(flatten_buckets=True)``).
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


def _pack(leaves: Sequence[jax.Array]) -> jax.Array:
  """The leaves raveled into one flat buffer, written slice by slice.

  ``dynamic_update_slice`` into a zero buffer lowers to plain copies; a
  ``concatenate`` of the same leaves is an elementwise fusion on XLA:CPU
  that made whole train steps 2-30x slower (benchmarks/RESULTS.md).
  """
  total = sum(leaf.size for leaf in leaves)
  buffer = jnp.zeros((total,), leaves[0].dtype)
  varying = tuple(sorted(set().union(
      *(jax.typeof(leaf).manual_axis_type.varying for leaf in leaves))))
  if varying:  # the buffer varies over the axes its contents vary over
    buffer = jax.lax.pcast(buffer, varying, to="varying")
  offset = 0
  for leaf in leaves:
    buffer = jax.lax.dynamic_update_slice(buffer, leaf.reshape(-1), (offset,))
    offset += leaf.size
  return buffer


def _bucketed(
    reduce: Callable[[jax.Array], jax.Array], tree: Any, bucket_bytes: int
) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  plan = plan_buckets([(leaf.shape, leaf.dtype) for leaf in leaves], bucket_bytes)
  out: list[jax.Array | None] = [None] * len(leaves)
  for bucket in plan:
    if len(bucket) == 1:
      (i,) = bucket
      out[i] = reduce(leaves[i])
      continue
    reduced = reduce(_pack([leaves[i] for i in bucket]))
    offset = 0
    for i in bucket:
      size = leaves[i].size
      out[i] = jax.lax.dynamic_slice(reduced, (offset,), (size,)).reshape(leaves[i].shape)
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


def _reduce_bucketed(name: str, op: Callable[[jax.Array, AxisName], jax.Array], tree: Any,
                     axis_name: AxisName, bucket_bytes: int, flatten: bool) -> Any:
  with jax.named_scope(f"{name}[{axis_name}]"):
    reduce = lambda x: op(x, axis_name)
    if not flatten:
      return jax.tree.map(reduce, tree)
    return _bucketed(reduce, tree, bucket_bytes)


def pmean_bucketed(
    tree: Any, axis_name: AxisName, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    flatten: bool = True, ordered_size: int | None = None,
    mean: Callable[[jax.Array], jax.Array] | None = None,
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
    mean: average each bucket with this instead of a collective (e.g.
      :func:`meshnet.shm.make_host_mean`'s shared-memory mean, which sums in
      axis order).
  """
  if mean is not None:
    op = lambda x, axis: mean(x)
  elif ordered_size is not None:
    op = lambda x, axis: ordered_pmean(x, axis, ordered_size)
  else:
    op = jax.lax.pmean
  return _reduce_bucketed("pmean_bucketed", op, tree, axis_name, bucket_bytes, flatten)


def psum_bucketed(
    tree: Any, axis_name: AxisName, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    flatten: bool = True,
) -> Any:
  """``lax.psum`` of every leaf over ``axis_name``, in few large reductions.

  Same contract as :func:`pmean_bucketed`, summing instead of averaging.
  """
  return _reduce_bucketed("psum_bucketed", jax.lax.psum, tree, axis_name, bucket_bytes,
                          flatten)
