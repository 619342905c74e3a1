"""Split backward (schedule zb, custom tables with W ops) against one device.

:mod:`meshnet.pipeline.split` cuts a stage's backward into an input half
(B) and a weight half (W) that carries the cotangent-dependent values
between them; these tests hold the pipeline to one device's loss,
gradients and parameters after optimizer steps on hostile cases (dropout,
scanned runs, remat, hoist off, tensor/fsdp, bf16, parameter-free layers,
a gpt), hold :func:`~meshnet.pipeline.split.split` itself to the fused
pullback, and check the carried buffer's slots over every split schedule.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshnet
from meshnet.pipeline import executor, make_pipeline
from meshnet.sharding import batch_sharding

import reference

TIGHT = dict(rtol=2e-5, atol=2e-6)


def _mesh(**axes):
  n = int(np.prod(list(axes.values())))
  return meshnet.make_mesh(**axes, devices=jax.devices()[:n])


def _put(mesh, batch):
  return tuple(jax.device_put(np.asarray(a), batch_sharding(mesh)) for a in batch)


def _one_device(model, batch, key, **kw):
  one = _mesh(data=1)
  params = model.init(jax.random.key(0))
  return jax.jit(meshnet.make_grad_fn(model, one, **kw))(params, _put(one, batch), key)


def _pipelined(model, axes, batch, key, fill=0.0, **pipeline):
  mesh = _mesh(**axes)
  pipe = make_pipeline(model, mesh, np.shape(batch[0])[1:], **pipeline)
  params = jax.device_put(model.init(jax.random.key(0)), pipe.param_shardings())
  loss, stacked = jax.jit(pipe.make_grad_fn(_fill=fill))(pipe.stack(params),
                                                         _put(mesh, batch), key)
  return pipe, loss, pipe.unstack(stacked)


def _assert_equals_one_device(model, axes, batch, fill=float("nan"), tol=TIGHT, **pipeline):
  """Loss and gradients of the pipeline on ``axes`` equal one device's;
  NaN in every unwritten buffer entry shows that W reads only what B wrote."""
  key = jax.random.key(1)
  ref_loss, ref_grads = _one_device(model, batch, key)
  pipe, loss, grads = _pipelined(model, axes, batch, key, fill=fill, **pipeline)
  np.testing.assert_allclose(loss, ref_loss, **tol)
  chex.assert_trees_all_close(reference.to_numpy(grads), reference.to_numpy(ref_grads), **tol)
  return pipe


@pytest.fixture(scope="module")
def digits():
  ds = meshnet.load_dataset("digits")
  return ds.x_train[:32], ds.y_train[:32]


# --- the executor against one device ---------------------------------------------


def test_tensor_with_remat_runs_and_equals_one_device(digits):
  """tensor=2 x stage=2, zb, remat: the carried values were packed and
  unpacked without being kept whole over tensor, and the compiler's halo
  exchange inside a switch branch deadlocked (XLA aborted the process after
  40 s waiting for the other stage's devices)."""
  model = meshnet.models.mlp([64, 32, 32, 32, 16, 10], dropout=0.2)
  _assert_equals_one_device(model, dict(fsdp=2, stage=2, tensor=2), digits, schedule="zb",
                            microbatches=4, remat=True)
