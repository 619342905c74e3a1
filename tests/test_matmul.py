"""meshnet.nn.matmul: the values and derivatives of ``x @ w``, with the
weight gradient's matmul on a row-major ``x^T`` on CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshnet import nn


def _arrays(shape_x, shape_w, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape_x), dtype)
  w = jnp.asarray(rng.standard_normal(shape_w) / np.sqrt(shape_w[0]), dtype)
  return x, w


def _loss(mm):
  return lambda x, w: jnp.sum(jnp.tanh(mm(x, w)) ** 2)


PLAIN = lambda x, w: x @ w


@pytest.mark.parametrize("shape_x,shape_w", [((64, 48), (48, 40)), ((3, 5, 24), (24, 7)),
                                             ((1, 16), (16, 16)), ((9, 3), (3, 1))])
def test_values_and_gradients_are_those_of_x_at_w(shape_x, shape_w):
  x, w = _arrays(shape_x, shape_w)
  np.testing.assert_allclose(nn.matmul(x, w), x @ w, rtol=1e-6, atol=1e-6)
  for argnums in ((0, 1), 0, 1):
    got = jax.jit(jax.grad(_loss(nn.matmul), argnums))(x, w)
    want = jax.jit(jax.grad(_loss(PLAIN), argnums))(x, w)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.shape == r.shape and g.dtype == r.dtype
      np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-5)


def test_forward_mode_vmap_and_second_derivatives():
  x, w = _arrays((32, 20), (20, 12))
  tx, tw = _arrays((32, 20), (20, 12), seed=1)
  f, g = _loss(nn.matmul), _loss(PLAIN)
  np.testing.assert_allclose(jax.jvp(f, (x, w), (tx, tw))[1], jax.jvp(g, (x, w), (tx, tw))[1],
                             rtol=1e-5)
  np.testing.assert_allclose(jax.jacfwd(f, 1)(x, w), jax.jacfwd(g, 1)(x, w), rtol=1e-4,
                             atol=1e-6)
  hvp = lambda fn: jax.jvp(jax.grad(lambda v: fn(x, v)), (w,), (tw,))[1]
  np.testing.assert_allclose(hvp(f), hvp(g), rtol=1e-4, atol=1e-5)
  batched = jax.vmap(jax.grad(f, 1), in_axes=(0, None))(x[:, None], w)
  np.testing.assert_allclose(batched, jax.vmap(jax.grad(g, 1), in_axes=(0, None))(x[:, None], w),
                             rtol=1e-5, atol=1e-6)


def test_bf16_gradients_keep_their_dtypes():
  x, w = _arrays((16, 32), (32, 8), jnp.bfloat16)
  gx, gw = jax.grad(lambda x, w: jnp.sum(nn.matmul(x, w).astype(jnp.float32)), (0, 1))(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  rx, rw = jax.grad(lambda x, w: jnp.sum((x @ w).astype(jnp.float32)), (0, 1))(x, w)
  np.testing.assert_allclose(gw.astype(np.float32), rw.astype(np.float32), rtol=2e-2)
  np.testing.assert_allclose(gx.astype(np.float32), rx.astype(np.float32), rtol=2e-2)


def _dots(fn, *args) -> list[str]:
  """The compiled program's matmuls, as their contracting dimensions."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return re.findall(r" dot\([^)]*\), (lhs_contracting_dims=\{\d+\})", text)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_on_cpu_the_weight_gradient_contracts_a_row_major_transpose():
  x, w = _arrays((256, 128), (128, 64))
  plain = _dots(jax.grad(_loss(PLAIN), 1), x, w)
  ours = _dots(jax.grad(_loss(nn.matmul), 1), x, w)
  # x @ w alone: the weight gradient contracts x over its first dimension
  # (column-major for the kernel); ours contracts a transposed copy on its last.
  assert "lhs_contracting_dims={0}" in plain
  assert "lhs_contracting_dims={0}" not in ours
  assert len(ours) == len(plain) == 2  # forward and weight gradient, no matmul of zeros
  # differentiated in x only, nothing is transposed and no matmul is added
  assert len(_dots(jax.grad(_loss(nn.matmul), 0), x, w)) == 2


def test_dense_uses_it():
  params = nn.dense_init(jax.random.key(0), 12, 5)
  x, _ = _arrays((7, 12), (12, 5))
  want = jax.grad(lambda p: jnp.sum(jnp.sin(x @ p["w"] + p["b"][None, :])))(params)
  got = jax.grad(lambda p: jnp.sum(jnp.sin(nn.dense(p, x))))(params)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  text = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(nn.dense(p, x))))).lower(params).as_text()
  if jax.default_backend() == "cpu":
    assert "optimization_barrier" in text
