"""Whole runs: XOR, the 4-3-1 sigmoid net against numpy backprop, digits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from meshnet.metrics import read_metrics
from meshnet.sharding import batch_sharding
from meshnet.train import run


def _quiet(**train):
  return TrainConfig(progress=False, **train)


def test_xor_all_four_correct():
  config = Config(
      mesh=MeshConfig(data=-1, devices=4),
      model=ModelConfig(hidden=(4,), activation="relu"),
      data=DataConfig("xor", batch_size=4),
      optim=OptimConfig("adam", lr=0.05),
      train=_quiet(steps=300, eval_every=300, seed=0),
  )
  result = run(config, log=lambda _: None)
  assert result.eval["eval_accuracy"] == 1.0
  model = meshnet.models.mlp([2, 4, 1])
  ds = meshnet.load_dataset("xor")
  pred = np.asarray(model.apply(result.state.params, ds.x_train))
  np.testing.assert_array_equal(pred[:, 0] > 0.5, ds.y_train[:, 0] > 0.5)  # 4/4


def _numpy_backprop(w1, b1, w2, b2, x, t, lr, steps):
  """Classic backprop of a 4-3-1 sigmoid net with MSE, float64 numpy."""
  sig = lambda z: 1 / (1 + np.exp(-z))
  losses = []
  for _ in range(steps):
    h = sig(x @ w1 + b1)
    y = sig(h @ w2 + b2)
    losses.append(np.mean((y - t) ** 2))
    dy = 2 * (y - t) / len(x) * y * (1 - y)
    dh = dy @ w2.T * h * (1 - h)
    w2, b2 = w2 - lr * h.T @ dy, b2 - lr * dy.sum(0)
    w1, b1 = w1 - lr * x.T @ dh, b1 - lr * dh.sum(0)
  return np.array(losses)


def test_sigmoid_431_net_follows_numpy_backprop():
  # 16 examples: every 4-bit pattern, target "at least two bits set".
  x = np.array([[(i >> k) & 1 for k in range(4)] for i in range(16)], np.float32)
  t = (x.sum(1, keepdims=True) >= 2).astype(np.float32)
  model = meshnet.models.mlp([4, 3, 1], activation="sigmoid", output_activation="sigmoid")
  lr, steps = 2.0, 60
  optimizer = optax.sgd(lr)
  mesh = meshnet.make_mesh(data=-1)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(4))
  (l1, l2) = jax.device_get(state.params)
  expected = _numpy_backprop(*(np.float64(a) for a in (l1["w"], l1["b"], l2["w"], l2["b"])),
                             x.astype(np.float64), t.astype(np.float64), lr, steps)
  step = meshnet.make_train_step(model, optimizer, mesh, loss="mse")
  batch = tuple(jax.device_put(a, batch_sharding(mesh)) for a in (x, t))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, expected, rtol=1e-4)
  assert losses[-1] < 0.6 * losses[0]  # it learns, as the reference does


def test_digits_default_run_reaches_95_percent(tmp_path):
  metrics_file = tmp_path / "metrics.jsonl"
  config = Config(train=TrainConfig(metrics_file=str(metrics_file), progress=False))
  result = run(config, log=lambda _: None)
  assert result.eval["eval_accuracy"] >= 0.95
  records = read_metrics(str(metrics_file))
  train_records = [r for r in records if "loss" in r]
  eval_records = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in train_records] == list(range(10, 221, 10))
  assert all(r["samples_per_sec"] > 0 and np.isfinite(r["loss"]) for r in train_records)
  assert train_records[-1]["loss"] < 0.3 * train_records[0]["loss"]
  assert [r["step"] for r in eval_records] == [100, 200, 220]
  assert eval_records[-1]["eval_accuracy"] == pytest.approx(result.eval["eval_accuracy"])


def test_run_with_a_custom_model_and_dropout():
  def init(key):
    return {"w": 0.1 * jax.random.normal(key, (64, 10)), "b": jnp.zeros((10,))}

  def apply(params, x, *, train=False, key=None):
    x = meshnet.nn.dropout(x, 0.1, key=key, train=train)
    return x @ params["w"] + params["b"][None, :]

  config = Config(optim=OptimConfig("adam", lr=1e-2),
                  train=_quiet(steps=60, eval_every=60))
  result = run(config, model=meshnet.Model(init, apply), log=lambda _: None)
  assert result.eval["eval_accuracy"] > 0.85  # a linear model on digits


def test_non_finite_loss_stops_at_the_first_bad_step():
  """w <- w - lr * dL/dw with L = mean((w x)^2) and lr*2x^2 = 4 multiplies w
  by -3 each step, so the float32 loss overflows at a step computed here
  independently in numpy, and the run must name that step."""
  model = meshnet.Model(lambda key: {"w": jnp.ones(())},
                        lambda params, x: params["w"] * x)
  x = np.ones((8, 1), np.float32)
  ds = meshnet.Dataset("blowup", x, np.zeros((8, 1), np.float32), x,
                       np.zeros((8, 1), np.float32), "mse", 1)
  w, expected = np.float32(1), None
  with np.errstate(over="ignore", invalid="ignore"):
    for s in range(1, 200):
      if not np.isfinite(np.mean(np.square(w * x))):  # float32, as the run computes it
        expected = s
        break
      w = np.float32(w - np.float32(2.0) * 2 * w)
  config = Config(data=DataConfig(batch_size=8), optim=OptimConfig("sgd", lr=2.0),
                  train=_quiet(steps=100, log_every=25, eval_every=0))
  with pytest.raises(meshnet.NonFiniteLossError) as info:
    run(config, model=model, dataset=ds, log=lambda _: None)
  assert info.value.step == expected
  assert f"at step {expected}; training stopped" in str(info.value)


@pytest.mark.parametrize("config, message", [
    (Config(data=DataConfig(batch_size=100)), "global batch size 100 is not divisible by "
     "data=8 = 8"),
    (Config(data=DataConfig(batch_size=128), optim=OptimConfig(grad_accum=3)),
     "global batch size 128 is not divisible by data=8 x grad_accum=3 = 24"),
    (Config(model=ModelConfig(name="resnet")), "unknown model 'resnet'; choose one of mlp"),
    (Config(mesh=MeshConfig(data=3)), "mesh data=3 uses 3 devices but there are 8"),
    (Config(optim=OptimConfig(optimizer="lion")), "unknown optimizer 'lion'"),
])
def test_bad_configs_are_one_line_errors(config, message):
  with pytest.raises(meshnet.MeshnetError, match=message) as info:
    run(config, log=lambda _: None)
  assert "\n" not in str(info.value)


def test_a_finite_loss_with_a_nan_update_is_never_checkpointed(tmp_path):
  """sqrt'(0) is infinite: the loss is finite but the gradient (so the
  update) is NaN. The run must stop at step 1 and save nothing (it used to
  save NaN parameters as step 1 and end cleanly when step 1 was the last)."""
  def apply(params, x):
    h = x @ params["w"]
    return h + 0.0 * jnp.sqrt(jnp.abs(h - h))

  model = meshnet.Model(lambda key: {"w": 0.1 * jax.random.normal(key, (64, 10))}, apply)
  for steps in (1, 5):
    directory = tmp_path / str(steps)
    config = Config(train=_quiet(steps=steps, eval_every=0),
                    checkpoint=meshnet.config.CheckpointConfig(dir=str(directory), every=1))
    with pytest.raises(meshnet.NonFiniteStateError) as info:
      run(config, model=model, log=lambda _: None)
    assert info.value.step == 1, str(info.value)
    assert "became NaN or infinite at step 1" in str(info.value)
    saved = [p for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    assert saved == [], saved
