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
