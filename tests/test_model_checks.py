"""A model, its parameters and its targets are checked from shapes before
anything runs: one clear error instead of a silent wrong result."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet.pipeline import make_pipeline


def _model(init=None, apply=None):
  init = init or (lambda key: {"w": jnp.ones((4, 3))})
  apply = apply or (lambda p, x: x @ p["w"])
  return meshnet.Model(init, apply)


X = np.ones((8, 4), np.float32)
LABELS = np.zeros((8,), np.int32)
TARGETS = np.zeros((8, 3), np.float32)


@pytest.mark.parametrize("model, loss, batch, message", [
    (_model(init=lambda key: {"w": jnp.ones((4, 3)), "n": jnp.arange(3)}), "cross_entropy",
     (X, LABELS), r"parameter \['n'\] has dtype int32; parameters must be floating-point"),
    (_model(init=lambda key: {"w": jnp.ones((4, 3)), "name": "dense"}), "cross_entropy",
     (X, LABELS), "model.init returned something that is not a pytree of arrays"),
    (_model(init=lambda key: {"w": jnp.ones((4, 3)), "on": jnp.ones(3, bool)}), "mse",
     (X, TARGETS), r"parameter \['on'\] has dtype bool"),
    (_model(), "mse", (X, LABELS), r"loss 'mse' needs float targets shaped like the outputs "
     r"\(8, 3\), got int32 \(8,\); for class labels use loss='cross_entropy'"),
    (_model(), "cross_entropy", (X, TARGETS), r"loss 'cross_entropy' needs integer labels "
     r"\(8,\) for outputs \(8, 3\), got float32 \(8, 3\)"),
    (_model(apply=lambda p, x: (x @ p["w"])[:4]), "cross_entropy", (X, LABELS),
     r"model.apply maps inputs \(8, 4\) to outputs \(4, 3\): the batch axis changed"),
    (_model(apply=lambda p, x: jnp.sum(x @ p["w"], axis=0)), "cross_entropy", (X, LABELS),
     r"model.apply maps inputs \(8, 4\) to outputs \(3,\)"),
])
def test_bad_models_and_targets_are_one_line_errors(model, loss, batch, message):
  mesh = meshnet.make_mesh(data=-1)
  optimizer = optax.sgd(0.1)
  with pytest.raises(meshnet.MeshnetError, match=message) as info:
    state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = meshnet.make_train_step(model, optimizer, mesh, loss=loss)
    step(state, batch)
  assert "\n" not in str(info.value)


def test_pipelined_step_checks_the_outputs_too():
  layer = _model(init=lambda key: {"w": jnp.ones((4, 4))})
  model = meshnet.sequential([layer, layer])
  mesh = meshnet.make_mesh(data=4, stage=2)
  pipe = make_pipeline(model, mesh, (4,), microbatches=2)
  optimizer = optax.sgd(0.1)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  step = meshnet.make_train_step(model, optimizer, mesh, loss="mse", pipeline=pipe)
  with pytest.raises(meshnet.MeshnetError, match="loss 'mse' needs float targets"):
    step(state, (X, LABELS))
