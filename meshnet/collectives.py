"""Collectives over named mesh axes, for use inside ``shard_map``.

Every function here runs inside ``jax.shard_map`` (or any context where the
axes are manual) and takes ``axis``: one mesh axis name or a tuple of names.
Several axes act as one axis of their combined size, device ``i`` being the
row-major index over the axes in the order given (as ``lax.axis_index``
numbers them). Each accepts a pytree and applies per leaf. Shapes in the
docstrings are *local* (what one device holds); ``n`` is
``axis_size(axis)``.

=================  ==========================  =============================
collective         local input                 local output
=================  ==========================  =============================
all_reduce         ``[...]``                   ``[...]`` (sum/mean/max/min)
all_gather         ``[..., d, ...]``           ``[..., n*d, ...]`` or stacked
reduce_scatter     ``[..., n*d, ...]``         ``[..., d, ...]``
broadcast          ``[...]``                   ``[...]`` (device source's)
reduce             ``[...]``                   ``[...]`` at dest, zeros elsewhere
scatter            ``[..., n*d, ...]``         ``[..., d, ...]`` (source's)
gather             ``[..., d, ...]``           ``[..., n*d, ...]`` at dest
all_to_all         ``[..., n*d, ...]``         ``[..., n*d, ...]``
shift              ``[...]``                   ``[...]`` (from i - offset)
=================  ==========================  =============================

``broadcast``, ``reduce``, ``scatter`` and ``gather`` are binomial trees of
``ppermute`` (``ceil(log2 n)`` rounds, as MPI implements them), so each
moves only what the operation needs and ``broadcast``/``scatter``/
``gather`` copy bits exactly for any dtype.

Types: only ``all_reduce``'s result is typed invariant over ``axis``
(``out_specs=P()`` accepts it). The others are typed as varying over
``axis``, as ``lax.all_gather``'s is, even where every device holds the
same value (``broadcast``): return them with ``axis`` in ``out_specs``, or
reduce them with ``all_reduce`` first.

A gradient pytree has many small leaves; reducing each on its own costs one
collective launch (and, across hosts, one network round trip: about 2 ms per
gloo all-reduce here, whatever its size up to ~100k floats) per leaf. The
bucketed reductions (:func:`pmean_bucketed`, :func:`psum_bucketed`) pack
the leaves into a few flat buffers of at most ``bucket_bytes`` each (per
dtype), reduce each buffer once, and unpack; the result is exactly what
per-leaf reductions give.

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

from meshnet.errors import MeshnetError

DEFAULT_BUCKET_BYTES = 32 * 2**20

AxisName = str | Sequence[str]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "scatter",
               "gather", "all_to_all", "shift")
REDUCE_OPS = ("sum", "mean", "max", "min")


def _axes(axis: AxisName) -> str | tuple[str, ...]:
  """``axis`` as ``lax`` takes it: a name, or a tuple of names, each an axis
  of the enclosing ``shard_map``."""
  axes = (axis,) if isinstance(axis, str) else (
      tuple(axis) if isinstance(axis, (tuple, list)) else ())
  if not axes or not all(isinstance(a, str) for a in axes):
    raise MeshnetError(f"axis={axis!r} must be a mesh axis name or a tuple of names")
  for name in axes:
    try:
      jax.lax.axis_size(name)
    except NameError:
      raise MeshnetError(
          f"axis {name!r} is not an axis of the enclosing shard_map; call the collective "
          "inside jax.shard_map over a mesh with that axis (e.g. 'data' or 'stage')"
      ) from None
  return axes[0] if len(axes) == 1 else axes


def axis_size(axis: AxisName) -> int:
  """The number of devices along ``axis`` (the product over several axes)."""
  return int(jax.lax.axis_size(_axes(axis)))


def axis_index(axis: AxisName) -> jax.Array:
  """This device's ``int32`` index along ``axis``, in ``[0, axis_size(axis))``;
  row-major over several axes in the order given."""
  return jax.lax.axis_index(_axes(axis))


def _per_leaf(fn: Callable[[jax.Array], jax.Array], tree: Any) -> Any:
  return jax.tree.map(fn, tree)


def _check_index(name: str, value: int, n: int, axis: AxisName) -> int:
  if not isinstance(value, (int, np.integer)) or not -n <= value < n:
    raise MeshnetError(f"{name}={value!r} is not a device index on axis {axis!r} of size "
                       f"{n}; pass an int in [0, {n})")
  return int(value) % n


def _check_dim(x: jax.Array, dim: int, what: str) -> int:
  if x.ndim == 0:
    raise MeshnetError(f"{what}: the local array is a scalar (shape ()), which has no "
                       "dimension to split or join; reshape it to [1] first")
  if not -x.ndim <= dim < x.ndim:
    raise MeshnetError(f"{what}: dim={dim} is out of range for a local array of shape "
                       f"{tuple(x.shape)}; pass a dim in [{-x.ndim}, {x.ndim})")
  return dim % x.ndim


def _stack_dim(x: jax.Array, dim: int, what: str) -> int:
  """``dim`` as the position of a new stacking axis in ``[0, x.ndim]``."""
  if not -(x.ndim + 1) <= dim <= x.ndim:
    raise MeshnetError(f"{what}: dim={dim} is out of range for stacking a local array of "
                       f"shape {tuple(x.shape)}; pass a dim in [{-x.ndim - 1}, {x.ndim}]")
  return dim % (x.ndim + 1)


def _check_divides(x: jax.Array, dim: int, n: int, what: str) -> None:
  if x.shape[dim] % n:
    raise MeshnetError(
        f"{what}: dimension {dim} of the local array {tuple(x.shape)} has size "
        f"{x.shape[dim]}, not a multiple of the axis size {n}; pad it or pick another dim")


def _check_op(op: str, allowed: Sequence[str], what: str) -> None:
  if op not in allowed:
    raise MeshnetError(f"{what}: op={op!r} is not one of {', '.join(allowed)}")


def _combine(op: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  return {"sum": jnp.add, "mean": jnp.add, "max": jnp.maximum, "min": jnp.minimum}[op]


def _as_reducible(x: jax.Array, op: str, what: str) -> tuple[jax.Array, Callable]:
  """``x`` in a dtype the reduction takes, and the cast back: booleans reduce
  as uint8 under max/min (any/all); a boolean sum or mean is refused."""
  if x.dtype != jnp.bool_:
    return x, lambda r: r
  if op in ("sum", "mean"):
    raise MeshnetError(f"{what}: op={op!r} on a boolean array; cast it to an integer "
                       "dtype first, or use op='max' (any) / op='min' (all)")
  return x.astype(jnp.uint8), lambda r: r.astype(jnp.bool_)


def all_reduce(x: Any, axis: AxisName, op: str = "sum") -> Any:
  """Every device gets the reduction of all devices' ``x`` over ``axis``.

  Args:
    x: local ``[...]`` (a pytree of them).
    axis: mesh axis name or tuple of names.
    op: ``sum``, ``mean`` (integers average to floating point, as
      ``jnp.mean``), ``max`` or ``min`` (booleans: any / all).

  Returns:
    Local ``[...]``, the same on every device of ``axis``.
  """
  _check_op(op, REDUCE_OPS, "all_reduce")
  name = _axes(axis)
  lax_op = {"sum": jax.lax.psum, "mean": jax.lax.psum, "max": jax.lax.pmax,
            "min": jax.lax.pmin}[op]

  def one(leaf):
    leaf, back = _as_reducible(leaf, op, "all_reduce")
    out = lax_op(leaf, name)
    return out / axis_size(axis) if op == "mean" else back(out)
  return _per_leaf(one, x)


def all_gather(x: Any, axis: AxisName, *, dim: int = 0, tiled: bool = False) -> Any:
  """Every device gets every device's ``x``, in device order.

  Args:
    x: local ``[..., d, ...]`` with ``d`` at ``dim``.
    dim: where the devices' pieces go.
    tiled: concatenate along ``dim`` (``[..., n*d, ...]``) instead of
      stacking on a new axis at ``dim`` (``[..., n, d, ...]``).
  """
  def one(leaf):
    d = (_check_dim if tiled else _stack_dim)(leaf, dim, "all_gather")
    return jax.lax.all_gather(leaf, _axes(axis), axis=d, tiled=tiled)
  return _per_leaf(one, x)


def reduce_scatter(x: Any, axis: AxisName, *, dim: int = 0, op: str = "sum") -> Any:
  """The reduction over ``axis``, split along ``dim``: device ``i`` gets piece ``i``.

  Args:
    x: local ``[..., n*d, ...]``; ``x.shape[dim]`` must divide by ``n``.
    op: ``sum`` or ``mean``.

  Returns:
    Local ``[..., d, ...]``: rows ``[i*d, (i+1)*d)`` of the reduction.
  """
  _check_op(op, ("sum", "mean"), "reduce_scatter")
  n = axis_size(axis)

  def one(leaf):
    d = _check_dim(leaf, dim, "reduce_scatter")
    _check_divides(leaf, d, n, "reduce_scatter")
    leaf, _ = _as_reducible(leaf, op, "reduce_scatter")
    out = jax.lax.psum_scatter(leaf, _axes(axis), scatter_dimension=d, tiled=True)
    return out / n if op == "mean" else out
  return _per_leaf(one, x)


def _tree_rounds(n: int) -> list[int]:
  """Binomial-tree strides 1, 2, 4, ... below ``n``."""
  return [1 << r for r in range(max(n - 1, 0).bit_length())]


def _permute(x: jax.Array, axis: AxisName, pairs: Sequence[tuple[int, int]]) -> jax.Array:
  return jax.lax.ppermute(x, _axes(axis), list(pairs))


def broadcast(x: Any, axis: AxisName, *, source: int = 0) -> Any:
  """Every device gets device ``source``'s ``x`` (a binomial tree of
  ``ceil(log2 n)`` ``ppermute`` rounds; bits copied exactly).

  Args:
    x: local ``[...]``; only ``source``'s value matters.
    source: the device index along ``axis`` that sends.

  Returns:
    Local ``[...]``: ``source``'s ``x`` on every device.
  """
  n = axis_size(axis)
  source = _check_index("source", source, n, axis)

  def one(leaf):
    rel = (axis_index(axis) - source) % n  # distance from the source
    for stride in _tree_rounds(n):  # holders [0, stride) send to [stride, 2*stride)
      pairs = [((source + j) % n, (source + j + stride) % n)
               for j in range(stride) if j + stride < n]
      received = _permute(leaf, axis, pairs)
      leaf = jnp.where((rel >= stride) & (rel < 2 * stride), received, leaf)
    return leaf
  return _per_leaf(one, x)


def reduce(x: Any, axis: AxisName, *, dest: int = 0, op: str = "sum") -> Any:
  """Device ``dest`` gets the reduction of every device's ``x``; the others
  get zeros (a binomial tree of ``ceil(log2 n)`` ``ppermute`` rounds).

  Args:
    x: local ``[...]``.
    dest: the device index along ``axis`` that receives.
    op: ``sum``, ``mean``, ``max`` or ``min``.

  Returns:
    Local ``[...]``: the reduction on ``dest``, zeros elsewhere.
  """
  _check_op(op, REDUCE_OPS, "reduce")
  n = axis_size(axis)
  dest = _check_index("dest", dest, n, axis)
  combine = _combine(op)

  def one(leaf):
    leaf, back = _as_reducible(leaf, op, "reduce")
    rel = (axis_index(axis) - dest) % n
    for stride in _tree_rounds(n):  # rel = k*2*stride + stride sends to k*2*stride
      pairs = [((dest + j) % n, (dest + j - stride) % n) for j in range(stride, n, 2 * stride)]
      received = _permute(leaf, axis, pairs)
      receives = (rel % (2 * stride) == 0) & (rel + stride < n)
      leaf = jnp.where(receives, combine(leaf, received), leaf)
    if op == "mean":
      leaf = leaf / n
    return back(jnp.where(rel == 0, leaf, jnp.zeros_like(leaf)))
  return _per_leaf(one, x)


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _store_if(cond: jax.Array, buf: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
  """``buf[start:start + len(rows)] = rows`` where ``cond``, else ``buf``
  unchanged; selects on the rows only, so the buffer is updated in place."""
  current = jax.lax.dynamic_slice_in_dim(buf, start, rows.shape[0], axis=0)
  return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(cond, rows, current), start, axis=0)


def scatter(x: Any, axis: AxisName, *, source: int = 0, dim: int = 0) -> Any:
  """Device ``i`` gets piece ``i`` (along ``dim``) of device ``source``'s ``x``
  (a binomial tree: each round a holder passes on half of what it holds).

  Args:
    x: local ``[..., n*d, ...]``; only ``source``'s value matters.
    source: the device index along ``axis`` that sends.
    dim: the dimension cut into ``n`` pieces.

  Returns:
    Local ``[..., d, ...]``.
  """
  n = axis_size(axis)
  source = _check_index("source", source, n, axis)

  def one(leaf):
    d = _check_dim(leaf, dim, "scatter")
    _check_divides(leaf, d, n, "scatter")
    pieces = jnp.moveaxis(leaf.reshape(
        *leaf.shape[:d], n, leaf.shape[d] // n, *leaf.shape[d + 1:]), d, 0)  # [n, ...]
    pieces = jnp.roll(pieces, -source, axis=0)  # in tree order: piece k for rel k
    width = _pow2(n)
    buf = jnp.concatenate([pieces, jnp.zeros((width - n, *pieces.shape[1:]), pieces.dtype)])
    rel = (axis_index(axis) - source) % n
    for stride in reversed(_tree_rounds(n)):  # rel % 2s == 0 holds [rel, rel+2s)
      pairs = [((source + j) % n, (source + j + stride) % n)
               for j in range(0, n, 2 * stride) if j + stride < n]
      half = jax.lax.dynamic_slice_in_dim(buf, jnp.minimum(rel + stride, width - stride),
                                          stride, axis=0)
      received = _permute(half, axis, pairs)
      buf = _store_if(rel % (2 * stride) == stride, buf, received,
                      jnp.minimum(rel, width - stride))
    return jax.lax.dynamic_index_in_dim(buf, rel, axis=0, keepdims=False)
  return _per_leaf(one, x)


def gather(x: Any, axis: AxisName, *, dest: int = 0, dim: int = 0, tiled: bool = True) -> Any:
  """Device ``dest`` gets every device's ``x`` in device order; the others
  get zeros (a binomial tree, the reverse of :func:`scatter`).

  Args:
    x: local ``[..., d, ...]``.
    dest: the device index along ``axis`` that receives.
    dim: where the pieces go.
    tiled: concatenate along ``dim`` (``[..., n*d, ...]``) instead of
      stacking on a new axis at ``dim`` (``[..., n, d, ...]``).
  """
  n = axis_size(axis)
  dest = _check_index("dest", dest, n, axis)

  def one(leaf):
    d = (_check_dim if tiled else _stack_dim)(leaf, dim, "gather")
    width = _pow2(n)
    rel = (axis_index(axis) - dest) % n
    buf = jnp.zeros((width, *leaf.shape), leaf.dtype)
    buf = jax.lax.dynamic_update_index_in_dim(buf, leaf, rel, axis=0)
    for stride in _tree_rounds(n):  # rel % 2s == s sends [rel, rel+s) to rel - s
      pairs = [((dest + j) % n, (dest + j - stride) % n) for j in range(stride, n, 2 * stride)]
      part = jax.lax.dynamic_slice_in_dim(buf, jnp.minimum(rel, width - stride), stride, axis=0)
      received = _permute(part, axis, pairs)
      buf = _store_if((rel % (2 * stride) == 0) & (rel + stride < n), buf, received,
                      jnp.minimum(rel + stride, width - stride))
    out = jnp.roll(buf[:n], dest, axis=0)  # tree order back to device order: [n, ...]
    out = jnp.where(rel == 0, out, jnp.zeros_like(out))
    out = jnp.moveaxis(out, 0, d)
    if tiled:
      out = out.reshape(*leaf.shape[:d], n * leaf.shape[d], *leaf.shape[d + 1:])
    return out
  return _per_leaf(one, x)


def all_to_all(x: Any, axis: AxisName, *, split_dim: int = 0, concat_dim: int = 0) -> Any:
  """Piece ``j`` of device ``i``'s ``x`` (cut along ``split_dim``) goes to device
  ``j``, which concatenates what it receives along ``concat_dim`` in sender order.

  Args:
    x: local ``[..., n*d, ...]`` (``split_dim`` divisible by ``n``).

  Returns:
    Local array with ``split_dim`` divided by ``n`` and ``concat_dim``
    multiplied by ``n`` (the same shape when the two dims agree).
  """
  n = axis_size(axis)

  def one(leaf):
    s = _check_dim(leaf, split_dim, "all_to_all")
    c = _check_dim(leaf, concat_dim, "all_to_all")
    _check_divides(leaf, s, n, "all_to_all")
    return jax.lax.all_to_all(leaf, _axes(axis), s, c, tiled=True)
  return _per_leaf(one, x)


def shift(x: Any, axis: AxisName, *, offset: int = 1) -> Any:
  """Ring ``ppermute``: device ``i``'s ``x`` goes to device ``(i + offset) mod n``.

  Args:
    x: local ``[...]``.
    offset: any integer; negative shifts the other way round the ring.

  Returns:
    Local ``[...]``: device ``(i - offset) mod n``'s ``x``.
  """
  if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
    raise MeshnetError(f"shift: offset={offset!r} must be an int")
  n = axis_size(axis)
  if offset % n == 0:
    return x
  pairs = [(i, (i + offset) % n) for i in range(n)]
  return _per_leaf(lambda leaf: _permute(leaf, axis, pairs), x)


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
  _axes(axis_name)  # every name an axis of the shard_map, or one line saying so
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
    mean: ``tree -> tree`` that averages the whole tree at once instead of
      collectives (e.g. :func:`meshnet.shm.make_host_mean`'s shared-memory
      mean: one exchange for every leaf, summed in axis order; buckets and
      ``flatten`` do not apply).
  """
  if mean is not None:
    return mean(tree)
  if ordered_size is not None:
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
