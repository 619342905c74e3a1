"""Dropout draws the same masks on every layout: a mask is a function of
(seed, step, global example index, layer), so data parallelism, gradient
accumulation, pipelines and a resume on another mesh all train the model one
device trains."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet import checkpoint, losses
from meshnet.pipeline import make_pipeline

import reference

TIGHT = dict(rtol=2e-5, atol=2e-6)
WIDTHS = [64, 48, 40, 32, 10]  # 4 layers of different shapes
RATE = 0.4


def _reference_loss_and_grad(model, params, x, y, key):
  """One device, written from the contract alone: example ``i`` of the global
  batch runs alone with key ``fold_in(key, i)``."""
  def loss(params):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
    one = lambda x_i, k_i: model.apply(params, x_i[None], train=True, key=k_i)[0]
    out = jax.vmap(one)(x, keys)
    return jnp.mean(losses.cross_entropy(out, y))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def batch():
  ds = meshnet.load_dataset("digits")
  return ds.x_train[:32], ds.y_train[:32]


def _layout_grad(model, layout, params, batch, key):
  data, stage, accum = layout
  mesh = meshnet.make_mesh(data=data, stage=stage, devices=jax.devices()[:data * stage])
  if stage == 1:
    fn = meshnet.make_grad_fn(model, mesh, grad_accum=accum)
    return jax.jit(fn)(params, batch, key)
  pipe = make_pipeline(model, mesh, (64,), schedule="1f1b", microbatches=stage * accum)
  loss, stacked = jax.jit(pipe.make_grad_fn())(pipe.stack(params), batch, key)
  return loss, pipe.unstack(stacked)


@pytest.mark.parametrize("layout", [(1, 1, 1), (4, 1, 1), (2, 1, 4), (8, 1, 1), (2, 2, 2),
                                    (1, 4, 1), (2, 4, 1)])
def test_dropout_gradient_is_the_same_on_every_layout(layout, batch):
  """(data, stage, grad_accum): loss and gradient equal the one-device
  reference with dropout on (they differed with every layout before)."""
  model = meshnet.models.mlp(WIDTHS, dropout=RATE)
  params = model.init(jax.random.key(0))
  key = jax.random.key(7)
  loss, grads = _layout_grad(model, layout, params, batch, key)
  ref_loss, ref_grads = _reference_loss_and_grad(model, params, *batch, key)
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(grads), reference.to_numpy(ref_grads),
                              **TIGHT)
  # Dropout is really on: the gradient differs from the one without it.
  plain = meshnet.models.mlp(WIDTHS)
  _, no_dropout = _reference_loss_and_grad(plain, params, *batch, key)
  assert not np.allclose(np.asarray(grads[0]["w"]), np.asarray(no_dropout[0]["w"]))


def test_custom_model_with_its_own_dropout_matches_across_layouts(batch):
  """A user's apply that calls jax.random itself (not meshnet.nn.dropout)."""
  def init(key):
    return {"w": 0.1 * jax.random.normal(key, (64, 10))}

  def apply(params, x, *, train=False, key=None):
    if train:
      x = x * jax.random.bernoulli(key, 0.7, x.shape) / 0.7
    return x @ params["w"]

  model = meshnet.Model(init, apply)
  params = model.init(jax.random.key(0))
  key = jax.random.key(3)
  ref = _reference_loss_and_grad(model, params, *batch, key)
  for layout in ((1, 1, 1), (8, 1, 1), (2, 1, 2)):
    loss, grads = _layout_grad(model, layout, params, batch, key)
    np.testing.assert_allclose(loss, ref[0], **TIGHT)
    chex.assert_trees_all_close(reference.to_numpy(grads), reference.to_numpy(ref[1]),
                                **TIGHT)


def test_training_with_dropout_equals_one_device_on_data_and_stage(batch):
  """Parameters after 3 Adam steps: data=4 and data=2 x stage=2 (ZB) equal one
  device."""
  model = meshnet.models.mlp(WIDTHS, dropout=RATE)
  optimizer = optax.adam(1e-2)
  ds = meshnet.load_dataset("digits")
  batches = [(ds.x_train[i:i + 32], ds.y_train[i:i + 32]) for i in (0, 32, 64)]
  results = []
  for data, stage in ((1, 1), (4, 1), (2, 2)):
    mesh = meshnet.make_mesh(data=data, stage=stage, devices=jax.devices()[:data * stage])
    pipe = (make_pipeline(model, mesh, (64,), schedule="zb", microbatches=4)
            if stage > 1 else None)
    state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
    for b in batches:
      state, _ = step(state, b)
    results.append(reference.to_numpy(state.params))
  for other in results[1:]:
    chex.assert_trees_all_close(other, results[0], rtol=1e-4, atol=1e-6)


ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
TRAIN = [sys.executable, "-m", "meshnet", "train", "--no-progress", "--eval-every", "0",
         "--log-every", "10", "--dropout", "0.3", "--hidden", "64,32", "--steps", "300",
         "--checkpoint-every", "50"]


def _finish(args):
  proc = subprocess.run(TRAIN + args, capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout + proc.stderr


def _params(path, step=300):
  return checkpoint.load_params(str(path), step)


def test_sigkill_resume_with_dropout_is_bit_identical_and_other_meshes_agree(tmp_path):
  _finish(["--checkpoint-dir", str(tmp_path / "a"), "--mesh", "data=4", "--devices", "4"])
  expected = _params(tmp_path / "a")

  seed = random.randrange(10**6)
  delay = random.Random(seed).uniform(0.0, 0.5)
  proc = subprocess.Popen(TRAIN + ["--checkpoint-dir", str(tmp_path / "b"), "--mesh",
                                   "data=4", "--devices", "4"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
  deadline = time.time() + 120
  while not (tmp_path / "b" / "50" / "meta").exists():
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline
    time.sleep(0.01)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = _finish(["--checkpoint-dir", str(tmp_path / "b"), "--resume", "--mesh", "data=4",
                 "--devices", "4"])
  assert "resumed from step" in out, out
  assert checkpoint.digest(_params(tmp_path / "b")) == checkpoint.digest(expected), (
      f"kill after {delay:.2f}s (seed {seed})")

  # Run a's step 250 resumed on other meshes draws the same masks: it ends
  # where the uninterrupted run ends, up to float reassociation.
  for i, mesh in enumerate(("data=2", "data=1,stage=2")):
    other = tmp_path / f"c{i}"
    shutil.copytree(tmp_path / "a" / "250", other / "250")
    _finish(["--checkpoint-dir", str(other), "--resume", "--mesh", mesh, "--devices",
             str(2)])
    chex.assert_trees_all_close(reference.to_numpy(_params(other)),
                                reference.to_numpy(expected), rtol=2e-3, atol=2e-5)


def test_a_model_without_randomness_runs_on_the_whole_batch():
  """Only a model whose output depends on its key runs per example: a
  sequential model without dropout (it splits the key but drops the result)
  keeps whole-batch matmuls and batch-level semantics."""
  plain = meshnet.models.mlp(WIDTHS)
  params = plain.init(jax.random.key(0))
  x = np.ones((4, 64), np.float32)
  assert not meshnet.model.uses_key(plain.apply, params, x)
  assert meshnet.model.uses_key(meshnet.models.mlp(WIDTHS, dropout=0.1).apply, params, x)

  def centre(p, x):  # not per-example: uses the batch mean
    return x - jnp.mean(x, axis=0, keepdims=True)
  model = meshnet.sequential([meshnet.Model(lambda k: {}, centre), plain])
  batch = (np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32),
           np.arange(8, dtype=np.int32) % 10)
  loss, _ = jax.jit(meshnet.make_grad_fn(model, meshnet.make_mesh(
      data=1, devices=jax.devices()[:1])))([{}, params], batch, jax.random.key(0))
  expected = jnp.mean(losses.cross_entropy(model.apply([{}, params], batch[0]), batch[1]))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
