"""Data-parallel gradients and updates equal one device on the whole batch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet import losses
from meshnet.sharding import batch_sharding

import reference

TIGHT = dict(rtol=2e-5, atol=2e-6)


def _custom_model():
  """A user's own pair of functions: a tanh layer and a linear read-out,
  written without train/key (meshnet must accept that)."""

  def init(key):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": 0.3 * jax.random.normal(k1, (64, 24)),
        "readout": 0.3 * jax.random.normal(k2, (24, 10)),
        "scale": jnp.ones(()),
    }

  def apply(params, x):
    return params["scale"] * jnp.tanh(x @ params["hidden"]) @ params["readout"]

  return meshnet.Model(init, apply)


MODELS = {
    "mlp": lambda: meshnet.models.mlp([64, 32, 16, 10]),
    "custom": _custom_model,
}


def _put(mesh, batch):
  return tuple(jax.device_put(a, batch_sharding(mesh)) for a in batch)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("data, flatten", [(8, True), (8, False), (2, True)])
def test_gradient_equals_single_device(model_name, data, flatten, digits_batches):
  model = MODELS[model_name]()
  mesh = meshnet.make_mesh(data=data, devices=jax.devices()[:data])
  params = model.init(jax.random.key(0))
  x, y = digits_batches[0]
  grad_fn = jax.jit(meshnet.make_grad_fn(model, mesh, loss="cross_entropy",
                                         bucket_bytes=4096, flatten_buckets=flatten))
  loss, grads = grad_fn(params, _put(mesh, (x, y)), jax.random.key(1))
  ref_loss, ref_grads = reference.loss_and_grad(model, losses.cross_entropy, params, x, y)
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(grads), reference.to_numpy(ref_grads),
                              **TIGHT)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adamw"])
def test_parameters_after_steps_equal_single_device(model_name, opt, digits_batches):
  model = MODELS[model_name]()
  optimizer = meshnet.make_optimizer(
      meshnet.OptimConfig(optimizer=opt, lr=0.05 if opt != "adamw" else 1e-3,
                          weight_decay=1e-2 if opt == "adamw" else 0.0), 3)
  mesh = meshnet.make_mesh(data=-1)
  key = jax.random.key(0)
  state = meshnet.init_train_state(model, optimizer, mesh, key)
  initial = reference.to_numpy(state.params)
  step = meshnet.make_train_step(model, optimizer, mesh)
  dp_losses = []
  for batch in digits_batches:
    state, metrics = step(state, _put(mesh, batch))
    dp_losses.append(float(metrics["loss"]))
  ref_params, ref_losses = reference.train(model, losses.cross_entropy, optimizer,
                                           initial, digits_batches)
  np.testing.assert_allclose(dp_losses, ref_losses, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(state.params),
                              reference.to_numpy(ref_params), **TIGHT)
  assert int(state.step) == len(digits_batches)


def test_params_stay_replicated_and_state_is_donated(digits_batches):
  model = MODELS["mlp"]()
  optimizer = optax.adam(1e-3)
  mesh = meshnet.make_mesh(data=-1)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  step = meshnet.make_train_step(model, optimizer, mesh)
  old = state
  state, _ = step(state, _put(mesh, digits_batches[0]))
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.is_fully_replicated
  assert len(leaf.sharding.device_set) == 8
  assert jax.tree.leaves(old.params)[0].is_deleted()  # donated


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_gradient_accumulation_equals_whole_batch(grad_accum, digits_batches):
  model = MODELS["mlp"]()
  mesh = meshnet.make_mesh(data=-1)
  params = model.init(jax.random.key(0))
  x, y = digits_batches[1]
  batch = _put(mesh, (x, y))
  key = jax.random.key(1)
  loss_k, grads_k = jax.jit(meshnet.make_grad_fn(model, mesh, grad_accum=grad_accum))(
      params, batch, key)
  loss_1, grads_1 = jax.jit(meshnet.make_grad_fn(model, mesh))(params, batch, key)
  ref_loss, ref_grads = reference.loss_and_grad(model, losses.cross_entropy, params, x, y)
  for loss, grads in ((loss_k, grads_k), (loss_1, grads_1)):
    np.testing.assert_allclose(loss, ref_loss, **TIGHT)
    chex.assert_trees_all_close(reference.to_numpy(grads),
                                reference.to_numpy(ref_grads), **TIGHT)


def test_accumulated_train_step_equals_one_step(digits_batches):
  model = MODELS["mlp"]()
  optimizer = optax.sgd(0.1)
  mesh = meshnet.make_mesh(data=-1)
  results = []
  for grad_accum in (1, 4):
    state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = meshnet.make_train_step(model, optimizer, mesh, grad_accum=grad_accum)
    for batch in digits_batches:
      state, _ = step(state, _put(mesh, batch))
    results.append(reference.to_numpy(state.params))
  chex.assert_trees_all_close(results[0], results[1], **TIGHT)


@pytest.mark.parametrize("clip_norm", [0.05, 1e6])
def test_clipping_caps_global_norm(clip_norm, digits_batches):
  """With sgd(lr=1) the update is minus the clipped gradient, so its norm is
  min(raw norm, clip_norm) and its direction the raw gradient's."""
  model = MODELS["mlp"]()
  optimizer = meshnet.make_optimizer(
      meshnet.OptimConfig(optimizer="sgd", lr=1.0, clip_norm=clip_norm), 1)
  mesh = meshnet.make_mesh(data=-1)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  before = reference.to_numpy(state.params)
  x, y = digits_batches[0]
  _, raw = reference.loss_and_grad(model, losses.cross_entropy, before, x, y)
  raw_norm = float(optax.tree.norm(raw))
  assert raw_norm > 0.05  # the small clip really clips
  state, metrics = meshnet.make_train_step(model, optimizer, mesh)(state, _put(mesh, (x, y)))
  np.testing.assert_allclose(metrics["grad_norm"], raw_norm, rtol=1e-5)
  delta = jax.tree.map(lambda a, b: b - a, reference.to_numpy(state.params), before)
  np.testing.assert_allclose(optax.tree.norm(delta), min(raw_norm, clip_norm), rtol=1e-5)
  scale = min(1.0, clip_norm / raw_norm)
  chex.assert_trees_all_close(delta, jax.tree.map(lambda g: scale * g, raw),
                              rtol=1e-4, atol=1e-7)


def test_dropout_masks_differ_per_example():
  """Every example is the same (one per device); with one key for all, their
  dropout masks (and gradients) would be equal and the mean gradient would
  equal any single one's. Keys from each example's global index make them
  differ."""
  width = 256

  def init(key):
    return {"w": jnp.ones((width,))}

  def apply(params, x, *, train=False, key=None):
    h = meshnet.nn.dropout(jnp.broadcast_to(params["w"][None, :], x.shape), 0.5,
                           key=key, train=train)
    return h

  model = meshnet.Model(init, apply)
  mesh = meshnet.make_mesh(data=-1)
  x = np.ones((8, width), np.float32)
  loss = lambda out, y: jnp.sum(out, axis=-1)
  grad_fn = jax.jit(meshnet.make_grad_fn(model, mesh, loss=loss))
  _, grads = grad_fn(init(None), _put(mesh, (x, x)), jax.random.key(0))
  g = np.asarray(grads["w"])
  # Each example's gradient is its mask * 2; the mean over 8 different masks
  # takes values k/4 for k in 0..8, not only {0, 2}.
  assert len(np.unique(g)) > 2
  # Reproducible: the same key gives the same masks.
  _, again = grad_fn(init(None), _put(mesh, (x, x)), jax.random.key(0))
  np.testing.assert_array_equal(g, np.asarray(again["w"]))


def test_flax_module_trains_like_single_device(digits_batches):
  import flax.linen as linen

  class Net(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.Dense(10)(linen.relu(linen.Dense(32)(x)))

  x, y = digits_batches[0]
  model = meshnet.models.from_flax(Net(), x[:1])
  mesh = meshnet.make_mesh(data=-1)
  params = model.init(jax.random.key(0))
  loss, grads = jax.jit(meshnet.make_grad_fn(model, mesh))(
      params, _put(mesh, (x, y)), jax.random.key(1))
  ref_loss, ref_grads = reference.loss_and_grad(model, losses.cross_entropy, params, x, y)
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(grads), reference.to_numpy(ref_grads),
                              **TIGHT)


def test_batch_not_divisible_by_data_axis_is_one_line_error():
  model = MODELS["mlp"]()
  mesh = meshnet.make_mesh(data=-1)
  grad_fn = jax.jit(meshnet.make_grad_fn(model, mesh, grad_accum=2))
  x = np.zeros((24, 64), np.float32)
  with pytest.raises(meshnet.MeshnetError, match=r"24 is not divisible by data=8 x "
                     r"grad_accum=2 = 16"):
    grad_fn(model.init(jax.random.key(0)), (x, np.zeros(24, np.int32)), jax.random.key(0))


def test_unsupported_axes_are_refused_before_jit():
  mesh = meshnet.make_mesh(data=4, stage=2)
  with pytest.raises(meshnet.MeshnetError, match="stage=2"):
    meshnet.make_train_step(MODELS["mlp"](), optax.sgd(0.1), mesh)
