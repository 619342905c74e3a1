"""The pipeline with ``fsdp`` and ``tensor``: every layout computes what one
device computes, the stages' parameters live split over stage x fsdp x
tensor, and checkpoints move between pipelined and unpipelined meshes."""

import re
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import meshnet
from meshnet.config import (CheckpointConfig, Config, MeshConfig, ModelConfig,
                            PipelineConfig, TrainConfig)
from meshnet.pipeline import make_pipeline
from meshnet.sharding import batch_sharding
from meshnet.train import run

import reference

TIGHT = dict(rtol=2e-5, atol=2e-6)
# After Adam steps: a gradient entry near zero (dropout) is divided by its own
# magnitude, which turns the reductions' float rounding (1e-8) into 1e-5.
STEPS = dict(rtol=2e-4, atol=2e-5)
LAYOUTS = {
    "tensor2stage4": dict(tensor=2, stage=4),
    "fsdp2stage2tensor2": dict(fsdp=2, stage=2, tensor=2),
}


def _odd_layer(n_in, n_out, seed):
  """A user's closure layer without names, with a scalar leaf and its own
  dropout: the default FSDP rule splits what fsdp divides."""
  def init(key):
    return {"w": 0.3 * jax.random.normal(key, (n_in, n_out)), "scale": jnp.ones(())}

  def apply(params, x, *, train=False, key=None):
    h = params["scale"] * jnp.tanh(x @ params["w"] + seed)
    if train:
      h = jnp.where(jax.random.bernoulli(key, 0.9, h.shape), h / 0.9, 0.0)
    return h
  return meshnet.Model(init, apply)


def _custom_model():
  return meshnet.sequential([_odd_layer(64, 24, 0.1), _odd_layer(24, 24, 0.2),
                             _odd_layer(24, 7, 0.3), _odd_layer(7, 10, 0.0)])


MODELS = {
    # Megatron pairs across stage boundaries: 64 -> 32 (column) -> 32 (row) -> ...
    "mlp": lambda: meshnet.models.mlp([64, 32, 32, 32, 16, 10], dropout=0.2),
    "custom": _custom_model,
}


def _put(mesh, batch):
  return tuple(jax.device_put(a, batch_sharding(mesh)) for a in batch)


def _one_device_grads(model, batch, key):
  mesh = meshnet.make_mesh(data=1, devices=jax.devices()[:1])
  params = model.init(jax.random.key(0))
  return jax.jit(meshnet.make_grad_fn(model, mesh))(params, _put(mesh, batch), key)


@pytest.mark.parametrize("schedule", ["1f1b", "zb"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_loss_and_gradients_equal_one_device(model_name, layout, schedule, digits_batches):
  _assert_equals_one_device(MODELS[model_name](), LAYOUTS[layout], digits_batches[0],
                            schedule=schedule, microbatches=4)


def _assert_equals_one_device(model, axes, batch, **pipeline):
  """The pipeline on ``axes`` gives one device's loss and gradients."""
  key = jax.random.key(1)
  ref_loss, ref_grads = _one_device_grads(model, batch, key)
  mesh = meshnet.make_mesh(**axes)
  pipe = make_pipeline(model, mesh, (64,), **pipeline)
  params = jax.device_put(model.init(jax.random.key(0)), pipe.param_shardings())
  loss, stacked = jax.jit(pipe.make_grad_fn())(pipe.stack(params), _put(mesh, batch), key)
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(pipe.unstack(stacked)),
                              reference.to_numpy(ref_grads), **TIGHT)


@pytest.mark.parametrize("model_name, layout, schedule", [
    ("mlp", "tensor2stage4", "1f1b"), ("mlp", "fsdp2stage2tensor2", "zb"),
    ("custom", "fsdp2stage2tensor2", "1f1b"),
])
def test_parameters_after_three_adam_steps_equal_one_device(model_name, layout, schedule,
                                                            digits_batches):
  model = MODELS[model_name]()
  optimizer = meshnet.make_optimizer(
      meshnet.OptimConfig(optimizer="adam", lr=1e-2, clip_norm=1.0), 3)
  results = []
  for axes in (dict(data=1, devices=jax.devices()[:1]), LAYOUTS[layout]):
    mesh = meshnet.make_mesh(**axes)
    pipe = (make_pipeline(model, mesh, (64,), schedule=schedule, microbatches=4)
            if "stage" in axes else None)
    state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
    history = []
    for batch in digits_batches:
      state, metrics = step(state, _put(mesh, batch))
      history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    results.append((history, reference.to_numpy(state.params),
                    reference.to_numpy(state.opt_state)))
  (h1, p1, o1), (hn, pn, on) = results
  np.testing.assert_allclose(hn, h1, **TIGHT)  # loss and grad_norm, step by step
  chex.assert_trees_all_close(pn, p1, **STEPS)
  chex.assert_trees_all_close(on, o1, **STEPS)


def test_interleaved_with_fsdp_and_tensor_equals_one_device(digits_batches):
  _assert_equals_one_device(MODELS["mlp"](), dict(fsdp=2, stage=2, tensor=2),
                            digits_batches[0], schedule="interleaved", microbatches=4,
                            virtual_stages=2)


def _per_device_bytes(tree):
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


@pytest.mark.parametrize("axes", [dict(stage=4, data=2), dict(fsdp=2, stage=4),
                                  dict(fsdp=2, stage=2, tensor=2)],
                         ids=["data2stage4", "fsdp2stage4", "fsdp2stage2tensor2"])
def test_stacked_identical_blocks_cost_no_padding(axes):
  """Eight identical 256-wide blocks (Megatron pairs) and a small output
  layer: the state holds about 1/(stage x fsdp x tensor) of parameters and
  Adam's moments per device, and so does each device's stage vector (no
  padding)."""
  model = meshnet.models.mlp([256] * 9 + [8])
  mesh = meshnet.make_mesh(**axes)
  optimizer = optax.adam(1e-3)
  pipe = make_pipeline(model, mesh, (256,), microbatches=4)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0), pipeline=pipe)
  split = mesh.shape["stage"] * mesh.shape["fsdp"] * mesh.shape["tensor"]
  total = sum(a.nbytes for a in jax.tree.leaves((state.params, state.opt_state)))
  for nbytes in _per_device_bytes((state.params, state.opt_state)).values():
    assert abs(nbytes - total / split) <= 0.1 * total / split, (nbytes, total / split)
  ideal = sum(a.nbytes for a in jax.tree.leaves(state.params)) / split
  stacked = pipe.stack(state.params)
  for nbytes in _per_device_bytes(stacked).values():
    assert abs(nbytes - ideal) <= 0.1 * ideal, (nbytes, ideal)
  # ... and a step keeps every leaf in its shards.
  step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
  x = np.zeros((16, 256), np.float32)
  before = _per_device_bytes((state.params, state.opt_state))
  state, _ = step(state, _put(mesh, (x, np.zeros(16, np.int32))))
  assert _per_device_bytes((state.params, state.opt_state)) == before


def test_tensor_split_weights_stay_split_inside_the_stages():
  model = meshnet.models.mlp([64, 32, 32, 32, 16, 10])
  mesh = meshnet.make_mesh(tensor=2, stage=4)
  pipe = make_pipeline(model, mesh, (64,), microbatches=4)
  params = jax.device_put(model.init(jax.random.key(0)), pipe.param_shardings())
  whole, split = pipe.stack(params)
  assert split.sharding.spec == P("stage", None, "tensor", None)
  # Each device holds one tensor block: [1, 1, 1, N_t].
  assert {s.data.shape for s in split.addressable_shards} == {(1, 1, 1, pipe.split_width)}
  x = _put(mesh, (np.zeros((16, 64), np.float32), np.zeros(16, np.int32)))
  text = jax.jit(pipe.make_grad_fn()).lower((whole, split), x, jax.random.key(0)).compile(
      ).as_text()
  # Megatron's reductions over the tensor pairs are there; no all-gather of
  # the split vectors over tensor.
  assert re.search(r"all-reduce(-start)?\(", text)
  gathered = [line for line in text.splitlines()
              if re.search(r"all-gather(-start)?\(", line) and f",{pipe.split_width}]" in line]
  assert not gathered, gathered[:2]


def _config(path, mesh, steps, resume=False):
  return Config(
      mesh=mesh, model=ModelConfig(hidden=(64, 32, 48)),
      pipeline=PipelineConfig(microbatches=4),
      checkpoint=CheckpointConfig(dir=str(path), every=6, resume=resume),
      train=TrainConfig(steps=steps, eval_every=0, log_every=1, progress=False))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A 12-step run on fsdp=4,tensor=2, and its 6-step checkpoint."""
  root = tmp_path_factory.mktemp("checkpoints")
  whole = run(_config(root / "whole", MeshConfig(fsdp=4, tensor=2), 12), log=lambda _: None)
  run(_config(root / "part", MeshConfig(fsdp=4, tensor=2), 6), log=lambda _: None)
  return root, whole


@pytest.mark.parametrize("then", [MeshConfig(stage=2, fsdp=2, tensor=2),
                                  MeshConfig(data=2, stage=4)],
                         ids=["stage2fsdp2tensor2", "data2stage4"])
def test_checkpoint_from_fsdp_tensor_continues_in_a_pipeline(tmp_path, saved, then):
  root, whole = saved
  shutil.copytree(root / "part", tmp_path / "part")
  messages = []
  resumed = run(_config(tmp_path / "part", then, 12, resume=True), log=messages.append)
  assert "resumed from step 6" in " ".join(messages)
  expected = [r["loss"] for r in whole.history if r["step"] > 6]
  np.testing.assert_allclose([r["loss"] for r in resumed.history], expected, rtol=2e-4)
  chex.assert_trees_all_close(reference.to_numpy(resumed.params),
                              reference.to_numpy(whole.params), rtol=2e-3, atol=2e-5)


def test_pipelined_checkpoint_restores_on_one_device(tmp_path, saved):
  root, whole = saved
  run(_config(tmp_path / "p", MeshConfig(stage=2, fsdp=2, tensor=2), 6), log=lambda _: None)
  resumed = run(_config(tmp_path / "p", MeshConfig(data=1, devices=1), 12, resume=True),
                log=lambda _: None)
  expected = [r["loss"] for r in whole.history if r["step"] > 6]
  np.testing.assert_allclose([r["loss"] for r in resumed.history], expected, rtol=2e-4)


def test_a_tensor_size_that_does_not_divide_a_stage_is_one_line():
  model = meshnet.models.mlp([64, 30, 16, 10])
  mesh = meshnet.make_mesh(tensor=4, stage=2)
  with pytest.raises(meshnet.MeshnetError, match=r"parameter \[0\]\['b'\] dimension 0 "
                     r"\(logical 'mlp'\) has size 30, which tensor=4 does not divide"):
    make_pipeline(model, mesh, (64,))


@pytest.mark.parametrize("axes, schedule", [(dict(data=2, stage=4), "1f1b"),
                                            (dict(fsdp=2, stage=2, tensor=2), "zb")],
                         ids=["data2stage4-1f1b", "fsdp2stage2tensor2-zb"])
def test_bf16_pipeline_moves_bfloat16_and_matches_the_unpipelined_bf16_step(
    axes, schedule, digits_batches):
  model = meshnet.models.mlp([64, 32, 32, 32, 16, 10])
  key = jax.random.key(1)
  one = meshnet.make_mesh(data=1, devices=jax.devices()[:1])
  params = model.init(jax.random.key(0))
  # 8 micro-steps of 8 examples: the pipeline's microbatches (64 / 2 / 4), each
  # one's gradient rounded to bfloat16 and summed in float32, as the pipeline does.
  ref_loss, ref_grads = jax.jit(meshnet.make_grad_fn(model, one, precision="bf16",
                                                     grad_accum=8))(
      params, _put(one, digits_batches[0]), key)
  mesh = meshnet.make_mesh(**axes)
  pipe = make_pipeline(model, mesh, (64,), schedule=schedule, microbatches=4,
                       precision="bf16")
  assert pipe.activation_dtype == jnp.bfloat16
  grad_fn = jax.jit(pipe.make_grad_fn())
  args = (pipe.stack(jax.device_put(params, pipe.param_shardings())),
          _put(mesh, digits_batches[0]), key)
  loss, stacked = grad_fn(*args)
  grads = pipe.unstack(stacked)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  # The same bfloat16 computation, cut into stages: equal up to bfloat16
  # rounding (tensor's partial products are summed in bfloat16 first).
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-3)
  chex.assert_trees_all_close(reference.to_numpy(grads), reference.to_numpy(ref_grads),
                              rtol=2e-2, atol=2e-4)
  # What the program sends between stages is bfloat16 (the CPU backend then
  # widens collectives to float32 itself; accelerators keep them).
  text = grad_fn.lower(*args).as_text()
  sends = [line for line in text.splitlines() if "collective_permute" in line]
  assert sends and all("bf16>" in line and "f32>" not in line for line in sends), sends[:2]


def test_bf16_pipeline_trains_digits_as_well_as_fp32():
  accuracy = {}
  for precision in ("fp32", "bf16"):
    result = run(Config(mesh=MeshConfig(data=2, stage=2, devices=4),
                        model=ModelConfig(hidden=(64, 64, 32)),
                        pipeline=PipelineConfig(microbatches=4),
                        train=TrainConfig(steps=150, eval_every=150, progress=False,
                                          precision=precision)), log=lambda _: None)
    accuracy[precision] = result.eval["eval_accuracy"]
  assert accuracy["fp32"] > 0.9
  assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.01, accuracy


@pytest.mark.parametrize("widths, batch, schedule", [
    ([2, 8, 1], 4, "1f1b"),  # XOR's net: stages of different shapes, microbatches of 1
    ([64, 32, 32, 32, 16, 10], 16, "zb"),
    ([64, 32, 32, 32, 16, 10], 4, "gpipe"),
], ids=["xor-mb1", "mlp-zb", "mlp-gpipe-mb1"])
def test_collectives_inside_the_stages_never_exchange_halos(widths, batch, schedule):
  """Devices on other stages do not run a switch branch, so a
  collective-permute the compiler put in one would wait for them forever (on
  CPU: a deadlock, then an abort). None is in a branch (the send between
  stages runs outside them); and a few steps run."""
  model = meshnet.models.mlp(widths, activation="tanh")
  mesh = meshnet.make_mesh(stage=2, fsdp=2, tensor=2)
  pipe = make_pipeline(model, mesh, (widths[0],), schedule=schedule, microbatches=2)
  optimizer = optax.adam(1e-2)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe, loss="mse")
  rng = np.random.default_rng(0)
  data = _put(mesh, (rng.normal(size=(batch, widths[0])).astype(np.float32),
                     rng.normal(size=(batch, widths[-1])).astype(np.float32)))
  text = step.lower(state, data).compile().as_text()
  permutes = [line for line in text.splitlines()
              if re.search(r"collective-permute(-start)?\(", line)]
  assert any("pipeline_send" in line for line in permutes), permutes
  in_branches = [line for line in permutes if "branch_" in line]
  assert not in_branches, in_branches
  losses = []
  for _ in range(3):
    state, metrics = step(state, data)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
