"""Review of the all_to_all restacking, unrolled runs and idle residual
slots: what `meshnet plan` says the pipelined step sends over ``stage``
against the compiled step, and edge-case models against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshnet
from meshnet import hardware, hlo, losses, planner
from meshnet.config import MeshConfig, OptimConfig
from meshnet.pipeline import make_pipeline

import reference

DEVICE = hardware.device_spec("cpu", flops=1e11, memory_bandwidth=1e10)


def _compiled_collectives(config: planner.PlanConfig) -> dict[str, list[int]]:
  """Bytes of each collective of the step meshnet train compiles for ``config``."""
  model = meshnet.models.mlp(list(config.widths))
  optimizer = meshnet.make_optimizer(config.optim, 10)
  axes = {a: getattr(config.mesh, a) for a in meshnet.AXES}
  mesh = meshnet.make_mesh(devices=jax.devices()[:config.devices], **axes)
  pipeline = make_pipeline(model, mesh, (config.widths[0],), schedule=config.schedule,
                           microbatches=config.parts)
  step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipeline)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0),
                                   pipeline=pipeline)
  B = config.batch_size
  batch = meshnet.global_batch((np.zeros((B, config.widths[0]), np.float32),
                                np.zeros((B,), np.int32)), np.arange(B),
                               meshnet.sharding.batch_sharding(mesh))
  module = hlo.parse_hlo(step.lower(state, batch).compile().as_text())
  out: dict[str, list[int]] = {}
  for op in module.ops.values():
    if op.kind in ("all-to-all", "all-gather") and op.bytes:
      out.setdefault(op.kind, []).append(op.bytes)
  return out


def test_plan_prices_the_all_to_all_the_step_runs():
  """The plan modelled the old all-gathers over stage (a gather of every
  split leaf, then the gradient gathered back: 8 all-gathers, about twice
  the bytes); the step runs two all_to_alls of ``[S, width]``."""
  widths = (64, 48, 40, 32, 10)  # b3 [10] stays whole on stage=4
  config = planner.PlanConfig(widths=widths, batch_size=64, device=DEVICE,
                              optim=OptimConfig(optimizer="sgd"),
                              mesh=MeshConfig(data=1, fsdp=1, stage=4, tensor=1),
                              microbatches=4)
  stage = next(t for t in planner.plan(config).traffic if t.axis == "stage")
  compiled = _compiled_collectives(config)
  assert "all-gather" not in compiled
  assert stage.calls["all_to_all"] == len(compiled["all-to-all"]) == 2
  assert "all_gather" not in stage.calls
  width = (64 * 48 + 48) // 4  # the first stage's pieces, the longest
  assert compiled["all-to-all"] == [4 * 4 * width] * 2


def test_plan_memory_after_the_rounds_is_the_restacks():
  """Eight stages of one 512-wide layer each: after the rounds the step
  holds the stage's gradient and two ``[S, width]`` messages, not the old
  gather's ``[S, v, N]`` (the plan said 2.2x XLA's temporaries)."""
  config = planner.PlanConfig(widths=(64,) + (512,) * 8 + (10,), batch_size=16,
                              device=DEVICE, optim=OptimConfig(optimizer="sgd"),
                              mesh=MeshConfig(data=1, fsdp=1, stage=8, tensor=1),
                              microbatches=8)
  planned = planner.plan(config).memory.temporaries
  compiled = planner.compiled_memory(config).temporaries
  assert abs(planned / compiled - 1) <= 0.1, (planned, compiled)


def _dense(n_in, n_out, extra=None):
  def init(key):
    a, b = jax.random.split(key)
    p = {"w": 0.3 * jax.random.normal(a, (n_in, n_out)),
         "b": 0.1 * jax.random.normal(b, (n_out,))}
    if extra == "scalar":
      p["s"] = jnp.float32(1.1)
    if extra == "empty":
      p["z"] = jnp.zeros((0, 4))
    return p

  def apply(p, x):
    h = x @ p["w"] + p["b"][None, :]
    return jnp.tanh(h * p["s"] if extra == "scalar" else h)
  return meshnet.Model(init, apply)


RELU_DICT = meshnet.Model(lambda key: {}, lambda p, x: jax.nn.relu(x))
RELU_TUPLE = meshnet.Model(lambda key: (), lambda p, x: jax.nn.relu(x))

EDGE = [
    ("layers without parameters", lambda: meshnet.sequential(
        [_dense(8, 6), RELU_DICT, _dense(6, 6), RELU_TUPLE, _dense(6, 3)]), 2, "zb", 1),
    ("a stage of layers without parameters", lambda: meshnet.sequential(
        [_dense(8, 6), RELU_DICT, RELU_TUPLE, RELU_DICT, _dense(6, 3)]), 3, "1f1b", 1),
    ("scalar leaves", lambda: meshnet.sequential(
        [_dense(8, 6, "scalar"), _dense(6, 6, "scalar"), _dense(6, 3, "scalar")]), 3, "gpipe", 1),
    ("0-size leaves, unrolled runs, interleaved", lambda: meshnet.sequential(
        [_dense(8, 6, "empty")] + [_dense(6, 6, "empty")] * 6 + [_dense(6, 3, "empty")]),
     2, "interleaved", 2),
]


@pytest.mark.parametrize("what, build, stages, schedule, virtual", EDGE,
                         ids=[e[0] for e in EDGE])
def test_edge_models_restack_like_one_device(what, build, stages, schedule, virtual):
  """Through restack, with never-written buffer entries poisoned with NaN
  (idle forwards now store into free residual slots): one device's loss and
  gradient, and stack then unstack gives the parameters back."""
  model = build()
  mesh = meshnet.make_mesh(stage=stages, devices=jax.devices()[:stages])
  M = 4
  pipe = make_pipeline(model, mesh, (8,), schedule=schedule, microbatches=M,
                       virtual_stages=virtual)
  assert pipe._restack is not None
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2 * M, 8)).astype(np.float32)
  y = rng.integers(0, 3, 2 * M).astype(np.int32)
  stacked = pipe.stack(params)
  loss, grads = jax.jit(pipe.make_grad_fn(_fill=float("nan")))(stacked, (x, y),
                                                              jax.random.key(1))
  ref_loss, ref_grads = reference.loss_and_grad(model, losses.cross_entropy, params, x, y)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-6)
  for a, b in zip(jax.tree.leaves(pipe.unstack(grads)), jax.tree.leaves(ref_grads),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(pipe.unstack(stacked)), jax.tree.leaves(params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("restacked", [True, False])
def test_a_model_whose_init_returns_a_tuple_trains_like_one_device(restacked):
  """make_pipeline takes a tuple of layers' params; the unstacked gradient
  was a list, which the step's output shardings (a tuple) refused on both
  paths (restack and gather)."""
  import dataclasses
  import optax
  layers = meshnet.sequential([_dense(8, 6), _dense(6, 6), _dense(6, 3)])
  model = meshnet.Model(lambda key: tuple(layers.init(key)), layers.apply,
                        layers=layers.layers)
  mesh = meshnet.make_mesh(stage=3, devices=jax.devices()[:3])
  pipe = make_pipeline(model, mesh, (8,), microbatches=3)
  if not restacked:
    pipe = dataclasses.replace(pipe)
    pipe.__dict__["_restack"] = None
  optimizer = optax.sgd(0.1)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0), pipeline=pipe)
  params = reference.to_numpy(state.params)  # before the step donates them
  step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8)).astype(np.float32)
  y = rng.integers(0, 3, 6).astype(np.int32)
  state, metrics = step(state, (x, y))
  ref_params, ref_losses = reference.train(model, losses.cross_entropy, optimizer, params,
                                           [(x, y)])
  np.testing.assert_allclose(float(metrics["loss"]), ref_losses[0], rtol=2e-5)
  assert isinstance(state.params, tuple)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
