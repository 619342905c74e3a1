"""The all_to_all restacking (meshnet.pipeline.restack) moves the same values
as gathering every parameter, and a pipelined step that uses it trains
exactly like one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet.pipeline import make_pipeline, restack


def _mesh(stage, data=1, fsdp=1, tensor=1):
  n = stage * data * fsdp * tensor
  return meshnet.make_mesh(stage=stage, data=data, fsdp=fsdp, tensor=tensor,
                           devices=jax.devices()[:n])


def _gathering(pipe):
  """The same pipeline taking the gather path (a fresh object: nothing cached)."""
  import dataclasses
  other = dataclasses.replace(pipe)
  other.__dict__["_restack"] = None
  return other


def _odd_layer(shape_in, shape_out, dtype):
  """A layer with a 3-D leaf, a bias no stage count divides, a leaf in
  ``dtype`` and a closed-over constant."""
  scale = jnp.linspace(0.5, 1.5, shape_out, dtype=jnp.float32)

  def init(key):
    a, b, c = jax.random.split(key, 3)
    return {"w": 0.3 * jax.random.normal(a, (shape_in, 2, shape_out)),
            "b": 0.1 * jax.random.normal(b, (shape_out,)).astype(dtype),
            "g": jnp.ones((1, 1), jnp.float32) + 0.01 * jax.random.normal(c, (1, 1))}

  def apply(p, x):
    h = jnp.einsum("bi,ico->bo", x, p["w"].astype(x.dtype)) + p["b"].astype(x.dtype)[None, :]
    return jnp.tanh(h * scale[None, :]) * p["g"][0, 0]
  return meshnet.Model(init, apply)


def _odd_model():
  return meshnet.sequential([_odd_layer(12, 10, jnp.float32), _odd_layer(10, 7, jnp.bfloat16),
                             _odd_layer(7, 9, jnp.float32), _odd_layer(9, 9, jnp.float32),
                             _odd_layer(9, 5, jnp.bfloat16), _odd_layer(5, 3, jnp.float32)])


CASES = [
    ("mlp", [64, 48, 40, 32, 24, 10], dict(stage=2), "1f1b", 1),
    ("mlp", [13, 7, 9, 5, 3], dict(stage=2, data=2), "gpipe", 1),  # odd widths: whole leaves
    ("mlp", [16] + [8] * 7 + [3], dict(stage=2), "interleaved", 2),
    ("mlp", [16] + [12] * 7 + [3], dict(stage=4, data=2), "zb", 1),
    ("odd", None, dict(stage=2, data=2), "1f1b", 1),
    ("odd", None, dict(stage=3), "1f1b", 1),
]


@pytest.mark.parametrize("kind,widths,axes,schedule,v", CASES)
def test_restack_moves_what_the_gather_moves(kind, widths, axes, schedule, v):
  model = meshnet.models.mlp(widths) if kind == "mlp" else _odd_model()
  example = (widths[0],) if kind == "mlp" else (12,)
  mesh = _mesh(**axes)
  pipe = make_pipeline(model, mesh, example, schedule=schedule, microbatches=4,
                       virtual_stages=v)
  assert pipe._restack is not None
  state = meshnet.init_train_state(model, optax.sgd(0.1), mesh, jax.random.key(0),
                                   pipeline=pipe)
  moved, gathered = pipe.stack(state.params), _gathering(pipe).stack(state.params)
  np.testing.assert_array_equal(np.asarray(moved), np.asarray(gathered))
  assert moved.sharding == gathered.sharding
  # from parameters laid out any other way (replicated, as model.init gives them)
  fresh = model.init(jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(pipe.stack(fresh)),
                                np.asarray(_gathering(pipe).stack(fresh)))
  # a gradient-like stacked array with distinct values everywhere
  noise = jax.device_put(
      jax.random.normal(jax.random.key(3), moved.shape), moved.sharding)
  back, back_gathered = pipe.unstack(noise), _gathering(pipe).unstack(noise)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(back_gathered), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.sharding == b.sharding, (a.sharding, b.sharding)
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)))
  # stack then unstack gives the parameters back
  for a, b in zip(jax.tree.leaves(pipe.unstack(moved)), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)))


def test_restack_is_used_only_where_it_applies():
  model = meshnet.models.mlp([16, 12, 12, 3])
  for axes, used in ((dict(stage=2), True), (dict(stage=2, fsdp=2), False),
                     (dict(stage=2, tensor=2), False), (dict(stage=1, data=2), False)):
    mesh = _mesh(**axes)
    pipe = make_pipeline(model, mesh, (16,), microbatches=2)
    assert restack.supported(pipe) == used, axes


def test_a_step_through_restack_trains_like_one_device():
  """Adam, three steps, the odd model (bf16 leaves, whole leaves, a 3-D leaf,
  closures) on stage=2 x data=2: the steps the gather path takes (the same
  first loss; later losses and parameters to the last bit, as the compiler fuses the update
  differently), and those of one device (to float rounding: the
  microbatches sum in another order, which Adam's first steps magnify)."""
  model = _odd_model()
  optimizer = optax.adam(0.05)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 12)).astype(np.float32)
  y = rng.integers(0, 3, 16).astype(np.int32)
  mesh = _mesh(stage=2, data=2)
  pipe = make_pipeline(model, mesh, (12,), schedule="1f1b", microbatches=4)
  assert pipe._restack is not None
  runs = {}
  for name, m, p in (("restack", mesh, pipe), ("gather", mesh, _gathering(pipe)),
                     ("one", _mesh(stage=1), None)):
    state = meshnet.init_train_state(model, optimizer, m, jax.random.key(0), pipeline=p)
    step = meshnet.make_train_step(model, optimizer, m, pipeline=p)
    losses = []
    for _ in range(3):
      state, metrics = step(state, (x, y))
      losses.append(float(metrics["loss"]))
    runs[name] = (losses, jax.tree.leaves(state.params), jax.tree.leaves(state.opt_state))
  # The first step starts from the same parameters: the same loss. Later
  # ones start from parameters a last bit apart (the fused update), which
  # some CPUs carry into the loss's last bits (seen on an AMD EPYC).
  assert runs["restack"][0][0] == runs["gather"][0][0]
  np.testing.assert_allclose(runs["restack"][0], runs["gather"][0], rtol=1e-6, atol=1e-7)
  for a, b in zip(runs["restack"][1] + runs["restack"][2],
                  runs["gather"][1] + runs["gather"][2], strict=True):
    assert a.sharding == b.sharding
    np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)),
                               np.asarray(b.astype(jnp.float32)), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(runs["restack"][0], runs["one"][0], rtol=2e-5, atol=2e-6)
  for a, b in zip(runs["restack"][1], runs["one"][1], strict=True):
    # a bf16 leaf rounds apart by a few of its steps (2^-8 relative)
    tol = dict(rtol=1e-2, atol=2e-3) if a.dtype == jnp.bfloat16 else dict(rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)),
                               np.asarray(b.astype(jnp.float32)), **tol)
