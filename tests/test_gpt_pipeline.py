"""The GPT pipelined (meshnet.models.gpt through the pipeline executor): its
layered view, every schedule on meshes with data/fsdp/tensor/stage against
one device (dropout included), Adam steps, checkpoints that move between
pipelined and unpipelined runs, and the command line."""

import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig,
                            OptimConfig, PipelineConfig, TrainConfig)
from meshnet.metrics import read_metrics
from meshnet.pipeline import make_pipeline
from meshnet.sharding import batch_sharding
from meshnet.train import run

import reference

SHAPE = dict(layers=4, heads=4, width=32, context=16)
TIGHT = dict(rtol=2e-5, atol=2e-6)
# After Adam steps a gradient entry near zero is divided by its own
# magnitude, which turns the reductions' float rounding (1e-8) into ~1e-5.
STEPS = dict(rtol=2e-4, atol=2e-5)
B, T = 16, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batches(n=3, seed=0):
  """``n`` next-token batches ``(x [B, T], y [B, T])`` of random bytes."""
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(0, 256, (B, T + 1)).astype(np.int32) for _ in range(n)]
  return [(s[:, :-1], s[:, 1:]) for s in seqs]


def _mesh(**axes):
  n = int(np.prod(list(axes.values())))
  return meshnet.make_mesh(**axes, devices=jax.devices()[:n])


def _put(mesh, batch):
  return tuple(jax.device_put(a, batch_sharding(mesh)) for a in batch)


def _pipeline(model, mesh, schedule, virtual_stages=1):
  return make_pipeline(model, mesh, (T,), schedule=schedule, microbatches=4,
                       virtual_stages=virtual_stages, input_dtype=jnp.int32)


def test_layered_view_round_trips_and_runs_like_the_scan():
  model = meshnet.models.gpt(None, **SHAPE, dropout=0.1)
  params = model.init(jax.random.key(0))
  per_layer = model.to_layers(params)
  assert len(model.layers) == len(per_layer) == SHAPE["layers"] + 2
  assert per_layer[0] is params["embed"] and per_layer[-1] is params["head"]
  chex.assert_trees_all_equal(model.from_layers(per_layer), params)
  for layer, p in zip(model.layers, per_layer):  # each layer's init gives its shapes
    chex.assert_trees_all_equal_shapes(jax.eval_shape(layer.init, jax.random.key(0)), p)
  # apply (one scan over the blocks) = the layers one after another, with
  # the keys meshnet.sequential gives them: the same dropout masks.
  x, _ = _batches(1)[0]
  key = jax.random.key(3)
  scanned = jax.jit(lambda p, x, k: model.apply(p, x, train=True, key=k))(params, x, key)
  layered = jax.jit(lambda p, x, k: meshnet.sequential(model.layers).apply(
      p, x, train=True, key=k))(per_layer, x, key)
  np.testing.assert_allclose(scanned, layered, rtol=1e-5, atol=1e-5)
  assert not np.allclose(scanned, model.apply(params, x))  # dropout did act


@pytest.mark.parametrize("axes, schedule, virtual_stages, dropout", [
    (dict(fsdp=2, stage=4), "1f1b", 1, 0.1),
    (dict(data=2, tensor=2, stage=2), "zb", 1, 0.0),
    (dict(data=2, stage=2), "gpipe", 1, 0.1),
    (dict(stage=2), "interleaved", 2, 0.0),
], ids=["fsdp2stage4-1f1b-dropout", "data2tensor2stage2-zb", "data2stage2-gpipe-dropout",
        "stage2-interleaved"])
def test_loss_and_gradients_equal_one_device(axes, schedule, virtual_stages, dropout):
  model = meshnet.models.gpt(None, **SHAPE, dropout=dropout)
  batch, key = _batches(1)[0], jax.random.key(1)
  params = model.init(jax.random.key(0))
  one = _mesh(data=1)
  ref_loss, ref_grads = jax.jit(meshnet.make_grad_fn(model, one))(params, _put(one, batch),
                                                                   key)
  mesh = _mesh(**axes)
  pipe = _pipeline(model, mesh, schedule, virtual_stages)
  loss, stacked = jax.jit(pipe.make_grad_fn())(
      pipe.stack(jax.device_put(params, pipe.param_shardings())), _put(mesh, batch), key)
  grads = pipe.unstack(stacked)  # the gpt's own tree: stacked blocks
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(grads), reference.to_numpy(ref_grads),
                              **TIGHT)


def test_middle_stages_share_one_branch_and_pay_no_padding():
  """fsdp=2,stage=4 with 6 blocks: [embed, block], [block, block] twice,
  [block, head]. The two middle stages are one branch of the compiled
  program and fill their stage vectors exactly (the padding is the
  embed/head stages'), and the train state is split over stage x fsdp."""
  model = meshnet.models.gpt(None, **{**SHAPE, "layers": 6})
  mesh = _mesh(fsdp=2, stage=4)
  pipe = _pipeline(model, mesh, "1f1b")
  groups, sizes, K = pipe.stage_groups, pipe._sizes, pipe.num_virtual_stages  # noqa: SLF001
  middle = range(1, K - 1)
  assert len({groups[k] for k in middle}) == 1 and len(set(groups)) == 3, groups
  assert len({sizes[k] for k in middle}) == 1
  assert pipe.bounds == (0, 2, 4, 6, 8)
  assert all(sizes[k] == pipe.param_width for k in middle)  # only embed/head stages pad
  counts = pipe.stage_param_counts  # what the run line prints
  assert sum(counts) == sum(a.size for a in jax.tree.leaves(model.init(jax.random.key(0))))
  np.testing.assert_allclose(pipe.stage_padding, max(counts) / np.mean(counts), rtol=1e-3)
  assert pipe._raw_first  # noqa: SLF001 (stage 0 reads int32 tokens as they are)
  state = meshnet.init_train_state(model, optax.adam(1e-3), mesh, jax.random.key(0))
  total = sum(a.nbytes for a in jax.tree.leaves(state.params))
  held = {}
  for leaf in jax.tree.leaves(state.params):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  assert max(held.values()) <= 1.1 * total / 8, (max(held.values()), total / 8)


def test_flops_balance_cuts_by_compute_and_equals_one_device():
  """``balance="flops"`` cuts by each layer's forward FLOPs (XLA's count):
  with a vocabulary of 4096 the head costs more than a block and the
  embedding's lookup nothing, so the cut differs from the parameter-balanced
  one (the embedding alone on stage 0) and puts blocks with the embedding;
  the gradient is still one device's."""
  model = meshnet.models.gpt(None, **{**SHAPE, "layers": 6}, vocab=4096)
  mesh = _mesh(fsdp=2, stage=4)
  by_params = make_pipeline(model, mesh, (T,), microbatches=4, input_dtype=jnp.int32)
  by_flops = make_pipeline(model, mesh, (T,), microbatches=4, input_dtype=jnp.int32,
                           balance="flops")
  assert by_params.bounds[1] == 1, by_params.bounds  # the 131k-parameter table alone
  assert by_flops.bounds[1] > 1, by_flops.bounds  # blocks ride with the lookup
  # the cuts a benchmark or planner can compute without a mesh
  assert list(by_params.bounds) == meshnet.pipeline.default_bounds(model.layers, 4)
  assert list(by_flops.bounds) == meshnet.pipeline.default_bounds(
      model.layers, 4, "flops", jax.ShapeDtypeStruct((1, T), jnp.int32))
  with pytest.raises(meshnet.MeshnetError, match="balance"):
    meshnet.pipeline.default_bounds(model.layers, 4, "time")
  with pytest.raises(meshnet.MeshnetError, match="example="):
    meshnet.pipeline.default_bounds(model.layers, 4, "flops")
  costs = meshnet.pipeline.stages.layer_flops(
      model.layers, jax.ShapeDtypeStruct((1, T), jnp.int32))
  assert costs[0] < costs[1] < costs[-1], costs  # lookup < block < 4096-way head
  assert len(set(costs[1:-1])) == 1
  stage_costs = [sum(costs[b:e]) for b, e in zip(by_flops.bounds[:-1], by_flops.bounds[1:])]
  param_cut = [sum(costs[b:e]) for b, e in zip(by_params.bounds[:-1], by_params.bounds[1:])]
  # The head's stage costs the same either way (it is one layer); the stages
  # before it are balanced by compute only when cut by FLOPs.
  assert max(stage_costs) <= max(param_cut)
  assert max(stage_costs[:-1]) < 0.5 * max(param_cut[:-1]), (stage_costs, param_cut)
  batch = _batches(1, seed=4)[0]
  batch = tuple(np.asarray(a) * 13 % 4096 for a in batch)  # tokens across the vocabulary
  params = model.init(jax.random.key(0))
  one = _mesh(data=1)
  ref_loss, ref_grads = jax.jit(meshnet.make_grad_fn(model, one))(
      params, _put(one, batch), jax.random.key(1))
  loss, stacked = jax.jit(by_flops.make_grad_fn())(
      by_flops.stack(jax.device_put(params, by_flops.param_shardings())), _put(mesh, batch),
      jax.random.key(1))
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(by_flops.unstack(stacked)),
                              reference.to_numpy(ref_grads), **TIGHT)
  with pytest.raises(meshnet.MeshnetError, match="unknown stage balance 'memory'"):
    make_pipeline(model, mesh, (T,), input_dtype=jnp.int32, balance="memory")
  from meshnet import cli
  args = cli.build_parser().parse_args(["train", "--mesh", "stage=2", "--stage-balance",
                                        "flops"])
  assert cli.config_from_args(args).pipeline.balance == "flops"
  with pytest.raises(meshnet.MeshnetError, match="pipeline.balance='memory' must be one of"):
    PipelineConfig(balance="memory")


def test_parameters_after_three_adam_steps_equal_one_device():
  model = meshnet.models.gpt(None, **SHAPE)
  optimizer = meshnet.make_optimizer(
      meshnet.OptimConfig(optimizer="adam", lr=1e-2, clip_norm=1.0), 3)
  results = []
  for axes in (dict(data=1), dict(fsdp=2, stage=4)):
    mesh = _mesh(**axes)
    pipe = _pipeline(model, mesh, "1f1b") if "stage" in axes else None
    state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
    history = []
    for batch in _batches(3):
      state, metrics = step(state, _put(mesh, batch))
      history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    results.append((history, reference.to_numpy(state.params)))
  (h1, p1), (hn, pn) = results
  np.testing.assert_allclose(hn, h1, **TIGHT)  # loss and grad_norm, step by step
  chex.assert_trees_all_close(pn, p1, **STEPS)


def _config(path, mesh, steps, resume=False, **pipeline):
  return Config(
      mesh=mesh, model=ModelConfig(name="gpt", **SHAPE),
      data=DataConfig(dataset="text", batch_size=16), optim=OptimConfig(lr=3e-3),
      pipeline=PipelineConfig(microbatches=4, **pipeline),
      checkpoint=CheckpointConfig(dir=str(path), every=2, resume=resume),
      train=TrainConfig(steps=steps, eval_every=0, log_every=1, progress=False))


@pytest.fixture(scope="module")
def pipelined_run(tmp_path_factory):
  """A 4-step pipelined run (data=2,stage=2) and a copy of its step-2 checkpoint."""
  root = tmp_path_factory.mktemp("gpt")
  whole = run(_config(root / "whole", MeshConfig(data=2, stage=2, devices=4), 4),
              log=lambda _: None)
  return root, whole


@pytest.mark.parametrize("first, then", [
    (MeshConfig(data=2, stage=2, devices=4), MeshConfig(data=4, devices=4)),
    (MeshConfig(data=4, devices=4), MeshConfig(fsdp=2, stage=2, devices=4)),
], ids=["pipelined-then-unpipelined", "unpipelined-then-pipelined"])
def test_checkpoint_moves_between_pipelined_and_unpipelined(tmp_path, pipelined_run,
                                                           first, then):
  _, whole = pipelined_run
  run(_config(tmp_path / "ck", first, 2), log=lambda _: None)
  messages = []
  resumed = run(_config(tmp_path / "ck", then, 4, resume=True), log=messages.append)
  assert "resumed from step 2" in " ".join(messages)
  expected = [r["loss"] for r in whole.history if r["step"] > 2]
  np.testing.assert_allclose([r["loss"] for r in resumed.history], expected, rtol=2e-4)
  chex.assert_trees_all_close(reference.to_numpy(resumed.params),
                              reference.to_numpy(whole.params), rtol=2e-3, atol=2e-5)


def test_meshnet_train_gpt_pipelined_command(tmp_path):
  """``meshnet train --model gpt --dataset text --mesh data=2,stage=2`` in a
  fresh process: it trains (the loss falls) and evaluates unpipelined."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  metrics_file = tmp_path / "m.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "meshnet", "train", "--model", "gpt", "--dataset", "text",
       "--mesh", "data=2,stage=2", "--devices", "4", "--layers", "2", "--width", "32",
       "--heads", "4", "--context", "16", "--batch-size", "32", "--lr", "3e-3",
       "--steps", "12", "--eval-every", "12", "--log-every", "4", "--no-progress",
       "--metrics-file", str(metrics_file)],
      capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout + proc.stderr
  assert "pipeline: 2 stages cut by params, layers per stage [2, 2]" in out
  records = read_metrics(str(metrics_file))
  losses = [r["loss"] for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert len(losses) == 3 and losses[-1] < losses[0] < 6.0, losses
  assert len(evals) == 1 and evals[0]["eval_loss"] < 6.0 and "eval_bits_per_byte" in evals[0]


def test_a_tied_gpt_head_cannot_be_pipelined_one_line(tmp_path):
  with pytest.raises(meshnet.MeshnetError, match="--tie-embeddings with stage=2"):
    run(Config(mesh=MeshConfig(stage=2, devices=2),
               model=ModelConfig(name="gpt", **SHAPE, tie_embeddings=True),
               data=DataConfig(dataset="text", batch_size=16),
               train=TrainConfig(steps=1, eval_every=0, progress=False)), log=lambda _: None)
  with pytest.raises(meshnet.MeshnetError, match="pipelining needs a model made of layers"):
    make_pipeline(meshnet.models.gpt(None, **SHAPE, tie_embeddings=True), _mesh(stage=2),
                  (T,), input_dtype=jnp.int32)
