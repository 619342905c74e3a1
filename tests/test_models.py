"""Models as pure functions; optimizers and schedules from config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet.optim import make_schedule


def test_mnist_mlp_shapes_and_dropout():
  model = meshnet.models.mlp([784, 512, 256, 128, 10], dropout=0.2)
  params = model.init(jax.random.key(0))
  assert [(l["w"].shape, l["b"].shape) for l in params] == [
      ((784, 512), (512,)), ((512, 256), (256,)), ((256, 128), (128,)), ((128, 10), (10,))]
  x = jax.random.uniform(jax.random.key(1), (32, 784))
  eval_out = model.apply(params, x)
  assert eval_out.shape == (32, 10)
  np.testing.assert_array_equal(model.apply(params, x, train=False, key=jax.random.key(2)),
                                eval_out)  # no dropout when not training
  a = model.apply(params, x, train=True, key=jax.random.key(2))
  b = model.apply(params, x, train=True, key=jax.random.key(3))
  assert not np.allclose(a, b) and not np.allclose(a, eval_out)
  np.testing.assert_array_equal(a, model.apply(params, x, train=True, key=jax.random.key(2)))
  with pytest.raises(meshnet.MeshnetError, match="needs a key when train=True"):
    model.apply(params, x, train=True)


def test_mlp_matches_a_hand_written_forward():
  model = meshnet.models.mlp([4, 3, 1], activation="sigmoid", output_activation="sigmoid")
  params = model.init(jax.random.key(0))
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  sig = lambda z: 1 / (1 + np.exp(-z))
  (l1, l2) = jax.device_get(params)
  expected = sig(sig(x @ l1["w"] + l1["b"]) @ l2["w"] + l2["b"])
  np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-5)


def test_init_scale_follows_fan_in():
  params = meshnet.models.mlp([1000, 1000, 10]).init(jax.random.key(0))
  np.testing.assert_allclose(np.std(params[0]["w"]), np.sqrt(2 / 1000), rtol=0.02)  # relu
  np.testing.assert_allclose(np.std(params[1]["w"]), np.sqrt(1 / 1000), rtol=0.1)


@pytest.mark.parametrize("widths, message", [
    ([10], "need an input and an output size"),
    ([3, 0, 2], "need an input and an output size"),
])
def test_mlp_bad_widths(widths, message):
  with pytest.raises(meshnet.MeshnetError, match=message):
    meshnet.models.mlp(widths)


def test_model_accepts_apply_without_train_and_key():
  model = meshnet.Model(lambda key: {"w": jnp.ones((2, 2))}, lambda p, x: x @ p["w"])
  out = model.apply(model.init(None), jnp.ones((3, 2)), train=True, key=jax.random.key(0))
  np.testing.assert_array_equal(out, 2 * np.ones((3, 2)))
  with pytest.raises(TypeError):
    meshnet.Model(None, None)


def test_warmup_cosine_schedule():
  config = meshnet.OptimConfig(lr=0.1, lr_schedule="warmup_cosine", warmup_steps=10)
  schedule = make_schedule(config, 110)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(5), 0.05, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 0.1, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.05, rtol=1e-5)  # half-way down the cosine
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-7)
  with pytest.raises(meshnet.MeshnetError, match=r"warmup_steps=200 must be in \[0, 110\)"):
    make_schedule(meshnet.OptimConfig(lr_schedule="warmup_cosine", warmup_steps=200), 110)


@pytest.mark.parametrize("name, expected", [
    ("sgd", lambda p, g: p - 0.1 * g),
    ("momentum", lambda p, g: p - 0.1 * g),  # first step: velocity = g
    ("adam", lambda p, g: p - 0.1 * np.sign(g)),  # first step: m/sqrt(v) = sign(g)
])
def test_first_optimizer_step(name, expected):
  optimizer = meshnet.make_optimizer(meshnet.OptimConfig(optimizer=name, lr=0.1), 10)
  p = jnp.array([1.0, -2.0, 3.0])
  g = jnp.array([0.5, -0.25, 2.0])
  updates, _ = optimizer.update(g, optimizer.init(p), p)
  np.testing.assert_allclose(optax.apply_updates(p, updates), expected(np.asarray(p),
                                                                       np.asarray(g)),
                             rtol=1e-5)


def test_weight_decay():
  p, g = jnp.array([1.0, -2.0]), jnp.zeros(2)
  sgd = meshnet.make_optimizer(meshnet.OptimConfig("sgd", lr=0.1, weight_decay=0.5), 10)
  updates, _ = sgd.update(g, sgd.init(p), p)
  np.testing.assert_allclose(optax.apply_updates(p, updates), p * (1 - 0.1 * 0.5))
  adamw = meshnet.make_optimizer(meshnet.OptimConfig("adamw", lr=0.1, weight_decay=0.5), 10)
  updates, _ = adamw.update(g, adamw.init(p), p)
  np.testing.assert_allclose(optax.apply_updates(p, updates), p * (1 - 0.1 * 0.5), rtol=1e-6)
