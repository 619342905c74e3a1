"""A stage's backward cut into an input half and a weight half (ZB-H1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet import stepcost
from meshnet.pipeline import make_pipeline, plan, split
from meshnet.pipeline.schedules import make_schedule
from meshnet.pipeline.rounds import pack


def _dense_stack(params, x):
  for w, b in params:
    x = jax.nn.relu(x @ w + b[None])
  return x


def _params(key, widths):
  keys = jax.random.split(key, len(widths))
  return [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros((b,)))
          for k, a, b in zip(keys, widths[:-1], widths[1:])]


def _dots(fn, *args):
  """``dot_general`` equations in the program of ``fn(*args)``."""
  return sum(eqn.primitive.name == "dot_general"
             for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns)


def _residuals(params, x):
  """The vjp's residual leaves, as a forward keeps them, and their structure."""
  pullback = jax.vjp(_dense_stack, params, x)[1]
  return jax.tree.flatten(pullback)


def _backward(leaves, treedef, seed):
  """The executor's backward: the pullback rebuilt from stored residuals."""
  return jax.tree.unflatten(treedef, leaves)(seed)


def test_the_halves_share_the_work_and_equal_the_fused_backward():
  widths = [12, 16, 16, 16, 8]
  params = _params(jax.random.key(0), widths)
  x = jax.random.normal(jax.random.key(1), (5, 12))
  seed = jax.random.normal(jax.random.key(2), (5, 8))
  leaves, treedef = _residuals(params, x)
  backward = lambda leaves, seed: _backward(leaves, treedef, seed)
  halves = split.split(backward, leaves, seed)
  n = len(params)
  # Carried: each layer's pre-activation cotangent, nothing weight- or input-shaped.
  assert sorted(halves.layout.shapes) == sorted((5, w) for w in widths[1:])
  dx, carried = halves.run_input(leaves, seed, width=halves.layout.size + 7)
  # dx takes one matmul a layer; the weight half only the weight gradients'.
  assert _dots(lambda l, g: halves.run_input(l, g, width=carried.shape[0]), leaves, seed) == n
  assert _dots(halves.run_weight, carried, leaves, seed) == n
  assert carried.shape == (halves.layout.size + 7,) and carried.dtype == jnp.uint32
  dflat = halves.run_weight(carried, leaves, seed)
  ref_dflat, ref_dx = backward(leaves, seed)
  np.testing.assert_array_equal(dx, ref_dx)
  jax.tree.map(np.testing.assert_array_equal, dflat, ref_dflat)


def test_a_forward_inside_the_traced_backward_is_recomputed_not_carried():
  params = _params(jax.random.key(0), [6, 8, 8])
  x, seed = jnp.ones((3, 6)), jnp.ones((3, 8))
  halves = split.split(lambda p, x, g: jax.vjp(_dense_stack, p, x)[1](g), params, x, seed)
  assert halves.layout.shapes == ((3, 8), (3, 8))  # cotangents only, no activations
  dx, carried = halves.run_input(params, x, seed, width=halves.layout.size)
  dflat = halves.run_weight(carried, params, x, seed)
  ref_dflat, ref_dx = jax.vjp(_dense_stack, params, x)[1](seed)
  np.testing.assert_array_equal(dx, ref_dx)
  jax.tree.map(np.testing.assert_array_equal, dflat, ref_dflat)


def test_closed_over_values_unused_parameters_and_a_zero_input_gradient():
  scale = jnp.arange(4.0)  # closed over: a constant of the traced program

  def fn(params, x, seed):
    def f(p, x):
      return jnp.sum(jnp.tanh(p["w"] * scale) * p["v"]) + 0.0 * x.sum()
    return jax.vjp(f, params, x)[1](seed)

  params = {"w": jnp.ones(4), "v": jnp.full(4, 2.0), "unused": jnp.ones(3)}
  x, seed = jnp.ones((2, 3)), jnp.asarray(1.5)
  halves = split.split(fn, params, x, seed)
  dx, carried = halves.run_input(params, x, seed, width=max(1, halves.layout.size))
  dflat = halves.run_weight(carried, params, x, seed)
  ref_dflat, ref_dx = jax.jit(fn)(params, x, seed)
  np.testing.assert_array_equal(dx, ref_dx)
  jax.tree.map(np.testing.assert_allclose, dflat, ref_dflat)
  assert not np.any(dflat["unused"])


@pytest.mark.parametrize("S,M", [(2, 3), (2, 8), (3, 5), (4, 4), (4, 9)])
def test_the_carried_slot_holds_each_microbatch_from_its_input_half_to_its_weight_half(S, M):
  rounds = pack(make_schedule("zb", S, M))
  buffers = plan.plan(rounds, list(range(S)))
  tabs = buffers.tables
  slot = {}  # (device, chunk, carried slot) -> microbatch written there last
  for r in range(rounds.num_rounds):
    for d in range(S):
      if tabs["b_branch"][r, d]:
        slot[(d, tabs["b_chunk"][r, d], tabs["b_carry"][r, d])] = tabs["b_micro"][r, d]
        assert tabs["b_carry"][r, d] < buffers.num_carry
      else:  # an idle input half writes the trash slot
        assert tabs["b_carry"][r, d] == buffers.num_carry
      if tabs["w_branch"][r, d]:
        key = (d, tabs["w_chunk"][r, d], tabs["w_carry"][r, d])
        assert slot.get(key) == tabs["w_micro"][r, d], (r, d)


def test_zb_with_the_split_matches_one_device_and_the_plan_counts_its_buffer():
  model = meshnet.models.mlp([6, 16, 16, 16, 16, 16, 4])
  mesh = meshnet.make_mesh(stage=2, data=1, devices=jax.devices()[:2])
  optimizer = optax.adam(1e-2)
  x = jax.random.normal(jax.random.key(3), (16, 6))
  y = jax.random.randint(jax.random.key(4), (16,), 0, 4)
  pipe = make_pipeline(model, mesh, (6,), schedule="zb", microbatches=4)
  step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  one = meshnet.make_mesh(data=1, devices=jax.devices()[:1])
  ref_step = meshnet.make_train_step(model, optimizer, one)
  ref = meshnet.init_train_state(model, optimizer, one, jax.random.key(0))
  for _ in range(3):
    state, metrics = step(state, (x, y))
    ref, ref_metrics = ref_step(ref, (x, y))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state.params, ref.params)
  shape = stepcost.pipeline_shape(model, {"data": 1, "fsdp": 1, "stage": 2, "tensor": 1}, 6,
                                  schedule="zb", microbatches=4, virtual_stages=1,
                                  remat=False, loss="cross_entropy", outputs=4,
                                  local_batch=16)
  # stage 1 carries its layers' pre-activation cotangents (and the loss's)
  assert shape.carry_slots >= 1 and shape.carried_words[1] >= 4 * (16 + 4)  # mb = 4
  assert 0 not in shape.carried_words  # the first stage computes no dx: nothing to split
