"""Bucketed reductions equal per-leaf means, in fewer collectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import meshnet
from meshnet.collectives import plan_buckets, pmean_bucketed, psum_bucketed


def test_plan_buckets_groups_by_dtype_and_size():
  f32, bf16 = np.float32, jnp.bfloat16
  leaves = [((10,), f32), ((5,), bf16), ((20,), f32), ((100,), f32), ((3,), bf16),
            ((1,), f32)]
  # 100 bytes per bucket: 10+20 floats = 120 bytes > 100, so leaf 2 opens a new one.
  assert plan_buckets(leaves, 100) == [[0], [1, 4], [2], [3], [5]]
  assert plan_buckets(leaves, 10_000) == [[0, 2, 3, 5], [1, 4]]
  with pytest.raises(ValueError):
    plan_buckets(leaves, 0)


def _per_device_tree():
  rng = np.random.default_rng(0)
  return {
      "w": rng.normal(size=(8, 6, 5)).astype(np.float32),
      "b": rng.normal(size=(8, 5)).astype(np.float32),
      "h": rng.normal(size=(8, 3)).astype(jnp.bfloat16),
      "s": rng.normal(size=(8,)).astype(np.float32),
  }


@pytest.mark.parametrize("bucket_bytes, flatten", [(4, True), (64, True), (1 << 20, True),
                                                  (1 << 20, False)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bucketed_reduction_equals_numpy(bucket_bytes, flatten, reduction):
  """Device i holds tree[i]; the reduction over data equals numpy's over axis 0."""
  mesh = meshnet.make_mesh(data=-1)
  tree = _per_device_tree()
  reduce = pmean_bucketed if reduction == "mean" else psum_bucketed

  def local(t):
    return reduce(jax.tree.map(lambda a: a[0], t), "data", bucket_bytes=bucket_bytes,
                  flatten=flatten)

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P()))
  sharded = jax.device_put(tree, NamedSharding(mesh, P("data")))
  out = f(sharded)
  np_reduce = np.mean if reduction == "mean" else np.sum
  for name, value in tree.items():
    expected = np_reduce(value.astype(np.float32), axis=0)
    assert out[name].dtype == value.dtype and out[name].shape == value.shape[1:]
    tol = 3e-2 if value.dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(out[name], np.float32), expected, rtol=tol,
                               atol=tol)


def _all_reduces(bucket_bytes, flatten):
  """All-reduce ops in the program as emitted and as XLA compiled it."""
  mesh = meshnet.make_mesh(data=-1)
  tree = _per_device_tree()
  f = jax.jit(jax.shard_map(
      lambda t: pmean_bucketed(jax.tree.map(lambda a: a[0], t), "data",
                               bucket_bytes=bucket_bytes, flatten=flatten),
      mesh=mesh, in_specs=P("data"), out_specs=P()))
  lowered = f.lower(jax.device_put(tree, NamedSharding(mesh, P("data"))))
  return (lowered.as_text().count("stablehlo.all_reduce"),
          lowered.compile().as_text().count(" all-reduce("))


def test_flat_buckets_set_the_number_of_collectives():
  # 4 leaves in 2 dtypes: one packed reduction per dtype with big buckets,
  # one per leaf with tiny ones.
  assert _all_reduces(1 << 20, True)[0] == 2
  assert _all_reduces(4, True)[0] == 4


def test_unflattened_reductions_are_combined_by_xla():
  emitted, compiled = _all_reduces(1 << 20, False)
  assert emitted == 4  # one per leaf
  assert compiled < emitted  # XLA's all-reduce combiner groups them


# --- named collectives against numpy -------------------------------------------

from meshnet import collectives as C  # noqa: E402

N = 8
AXES = {"one axis": ("data",), "two axes": ("data", "stage")}
MESHES = {"one axis": dict(data=8), "two axes": dict(data=2, stage=4)}


def _run(fn, per_device, layout):
  """``fn`` on device i's ``per_device[i]``; returns ``[n, *local_out]``."""
  mesh = meshnet.make_mesh(**MESHES[layout])
  axes = AXES[layout]
  spec = P(axes)
  f = jax.jit(jax.shard_map(lambda a: fn(a[0], axes)[None], mesh=mesh, in_specs=spec,
                            out_specs=spec))
  return np.asarray(f(jax.device_put(per_device, NamedSharding(mesh, spec))))


def _values(dtype, shape, seed=0):
  rng = np.random.default_rng(seed)
  if dtype == np.bool_:
    return rng.random((N, *shape)) < 0.5
  if np.issubdtype(dtype, np.integer):
    return rng.integers(-50, 50, size=(N, *shape)).astype(dtype)
  return rng.normal(size=(N, *shape)).astype(dtype)


def _close(actual, expected, dtype):
  if np.issubdtype(np.dtype(dtype), np.floating) or np.asarray(expected).dtype.kind == "f":
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_array_equal(actual, expected)
    assert actual.dtype == expected.dtype


LAYOUTS = list(AXES)
SHAPE = (3, 5)  # odd on purpose


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, op", [(np.float32, "sum"), (np.float32, "mean"),
                                       (np.float32, "max"), (np.int32, "min"),
                                       (np.int32, "sum"), (np.int32, "mean"),
                                       (np.bool_, "max"), (np.bool_, "min")])
def test_all_reduce(layout, dtype, op):
  x = _values(dtype, SHAPE)
  out = _run(lambda a, ax: C.all_reduce(a, ax, op=op), x, layout)
  expected = {"sum": x.sum(0, dtype=x.dtype if dtype != np.bool_ else None),
              "mean": x.mean(0), "max": x.max(0), "min": x.min(0)}[op]
  for i in range(N):
    _close(out[i], expected.astype(out.dtype) if op == "mean" else expected, dtype)
  if op == "mean" and dtype == np.int32:
    assert out.dtype.kind == "f"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.bool_])
@pytest.mark.parametrize("dim, tiled", [(0, False), (1, False), (2, False), (0, True),
                                        (1, True)])
def test_all_gather(layout, dtype, dim, tiled):
  x = _values(dtype, SHAPE)
  out = _run(lambda a, ax: C.all_gather(a, ax, dim=dim, tiled=tiled), x, layout)
  expected = np.concatenate(list(x), axis=dim) if tiled else np.stack(list(x), axis=dim)
  for i in range(N):
    _close(out[i], expected, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, op", [(np.float32, "sum"), (np.float32, "mean"),
                                       (np.int32, "sum")])
@pytest.mark.parametrize("dim", [0, 1])
def test_reduce_scatter(layout, dtype, op, dim):
  shape = (8 * 3, 5) if dim == 0 else (3, 8 * 2)
  x = _values(dtype, shape)
  out = _run(lambda a, ax: C.reduce_scatter(a, ax, dim=dim, op=op), x, layout)
  total = x.sum(0, dtype=x.dtype) if op == "sum" else x.mean(0)
  for i, piece in enumerate(np.split(total, N, axis=dim)):
    _close(out[i], piece, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.bool_])
@pytest.mark.parametrize("source", [0, 3, 7])
def test_broadcast_copies_bits(layout, dtype, source):
  x = _values(dtype, SHAPE)
  if dtype == np.float32:
    x[source, 0, 0] = -0.0  # exact copy keeps the sign of zero
  out = _run(lambda a, ax: C.broadcast(a, ax, source=source), x, layout)
  for i in range(N):
    np.testing.assert_array_equal(out[i], x[source])
  if dtype == np.float32:
    assert np.signbit(out[:, 0, 0]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, op", [(np.float32, "sum"), (np.float32, "mean"),
                                       (np.float32, "max"), (np.int32, "sum"),
                                       (np.int32, "min"), (np.bool_, "max")])
@pytest.mark.parametrize("dest", [0, 5])
def test_reduce(layout, dtype, op, dest):
  x = _values(dtype, SHAPE)
  out = _run(lambda a, ax: C.reduce(a, ax, dest=dest, op=op), x, layout)
  expected = {"sum": x.sum(0, dtype=x.dtype if dtype != np.bool_ else None),
              "mean": x.mean(0), "max": x.max(0), "min": x.min(0)}[op]
  _close(out[dest], expected, dtype)
  for i in set(range(N)) - {dest}:
    assert not out[i].any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.bool_])
@pytest.mark.parametrize("source, dim", [(0, 0), (6, 0), (3, 1)])
def test_scatter(layout, dtype, source, dim):
  shape = (8 * 3, 5) if dim == 0 else (3, 8 * 2)
  x = _values(dtype, shape)
  out = _run(lambda a, ax: C.scatter(a, ax, source=source, dim=dim), x, layout)
  for i, piece in enumerate(np.split(x[source], N, axis=dim)):
    np.testing.assert_array_equal(out[i], piece)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.bool_])
@pytest.mark.parametrize("dest, dim, tiled", [(0, 0, True), (7, 1, True), (2, 0, False),
                                              (4, 2, False)])
def test_gather(layout, dtype, dest, dim, tiled):
  x = _values(dtype, SHAPE)
  out = _run(lambda a, ax: C.gather(a, ax, dest=dest, dim=dim, tiled=tiled), x, layout)
  expected = np.concatenate(list(x), axis=dim) if tiled else np.stack(list(x), axis=dim)
  np.testing.assert_array_equal(out[dest], expected)
  for i in set(range(N)) - {dest}:
    assert not out[i].any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
@pytest.mark.parametrize("split_dim, concat_dim", [(0, 0), (0, 1), (1, 0)])
def test_all_to_all(layout, dtype, split_dim, concat_dim):
  shape = (8 * 2, 8 * 3)
  x = _values(dtype, shape)
  out = _run(lambda a, ax: C.all_to_all(a, ax, split_dim=split_dim, concat_dim=concat_dim),
             x, layout)
  for j in range(N):  # device j: piece j of every sender, in sender order
    pieces = [np.split(x[i], N, axis=split_dim)[j] for i in range(N)]
    np.testing.assert_array_equal(out[j], np.concatenate(pieces, axis=concat_dim))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [1, -1, 3, -5, 8, 11])
def test_shift(layout, offset):
  x = _values(np.int32, SHAPE)
  out = _run(lambda a, ax: C.shift(a, ax, offset=offset), x, layout)
  for i in range(N):
    np.testing.assert_array_equal(out[i], x[(i - offset) % N])


def test_axis_index_and_size_over_two_axes():
  idx = _run(lambda a, ax: C.axis_index(ax) + 0 * a, np.zeros((N,), np.int32), "two axes")
  assert idx.tolist() == list(range(N))
  size = _run(lambda a, ax: C.axis_size(ax) + 0 * a, np.zeros((N,), np.int32), "two axes")
  assert size.tolist() == [N] * N


def test_pytrees_and_axis_subsets():
  """A pytree reduces per leaf; over one axis of a 2-axis mesh only that axis mixes."""
  mesh = meshnet.make_mesh(data=2, stage=4)
  x = _values(np.float32, (3,))

  def local(a):
    t = {"a": a[0], "b": (a[0] * 2,)}
    r = C.all_reduce(t, "stage", op="sum")
    return jnp.stack([r["a"], r["b"][0]])[None]

  spec = P(("data", "stage"))
  out = np.asarray(jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec))(
      jax.device_put(x, NamedSharding(mesh, spec))))
  for i in range(N):
    group = x[(i // 4) * 4:(i // 4) * 4 + 4].sum(0)
    np.testing.assert_allclose(out[i, 0], group, rtol=1e-6)
    np.testing.assert_allclose(out[i, 1], 2 * group, rtol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda a, ax: C.all_reduce(a, ax, op="prod"), "op='prod'"),
    (lambda a, ax: C.broadcast(a, ax, source=8), "source=8"),
    (lambda a, ax: C.reduce(a, ax, dest=-9), "dest=-9"),
    (lambda a, ax: C.reduce_scatter(a, ax, dim=1), "not a multiple of the axis size 8"),
    (lambda a, ax: C.all_gather(a, ax, dim=3, tiled=True), "dim=3"),
    (lambda a, ax: C.all_reduce(a > 0, ax, op="sum"), "boolean"),
    (lambda a, ax: C.shift(a, ax, offset=1.5), "offset=1.5"),
    (lambda a, ax: C.shift(a, ax, offset=True), "offset=True"),
    (lambda a, ax: C.all_gather(a, ax, dim=5), "dim=5 is out of range for stacking"),
    (lambda a, ax: C.gather(a, ax, dim=-4, tiled=False), "dim=-4 is out of range for stacking"),
    (lambda a, ax: C.all_gather(a[0, 0], ax, tiled=True)[:1][None], "is a scalar"),
    (lambda a, ax: C.reduce_scatter(a[0, 0], ax)[None, None], "is a scalar"),
    (lambda a, ax: C.scatter(a[0, 0], ax)[None, None], "is a scalar"),
    (lambda a, ax: C.all_to_all(a[0, 0], ax)[None, None], "is a scalar"),
    (lambda a, ax: C.all_reduce(a, "nope"), "axis 'nope' is not an axis of the enclosing"),
    (lambda a, ax: C.broadcast(a, ("data", "nope")), "axis 'nope' is not an axis"),
    (lambda a, ax: C.pmean_bucketed({"a": a}, "nope")["a"], "axis 'nope' is not an axis"),
    (lambda a, ax: C.all_reduce(a, 0), "axis=0 must be a mesh axis name"),
])
def test_bad_arguments_say_what_to_do(call, message):
  with pytest.raises(meshnet.MeshnetError, match=message.replace("(", r"\(")) as info:
    _run(call, _values(np.float32, SHAPE), "one axis")
  assert "\n" not in str(info.value)


def test_scalars_and_axis_lists():
  """0-d leaves reduce, broadcast and shift; an axis tuple may come as a list."""
  x = _values(np.float32, ())
  total = _run(lambda a, ax: C.all_reduce(a, list(ax), op="sum"), x, "two axes")
  np.testing.assert_allclose(total, np.full(N, x.sum()), rtol=1e-6)
  moved = _run(lambda a, ax: C.shift(a, list(ax), offset=-3), x, "two axes")
  np.testing.assert_array_equal(moved, np.roll(x, -3))
  sent = _run(lambda a, ax: C.broadcast(a, list(ax), source=5), x, "two axes")
  np.testing.assert_array_equal(sent, np.full(N, x[5]))
