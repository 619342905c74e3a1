"""Review of the GPT's fused attention, one-hot embedding and the pipeline
run line: fused = plain inside pipelines (dropout, rotary, bf16), one-hot =
gather under tensor/fsdp/pipelines and tied tables, the ``auto`` switch at
1024, one-line errors, a plain checkpoint resumed with fused attention and
sampled, and the stage parameter counts of interleaved and tensor-split
pipelines; and two bugs it found: the default embedding's FLOPs against XLA's
count, and ``remat="full"`` with stage inputs of different sizes."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet import flops, nn
from meshnet.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig,
                            OptimConfig, TrainConfig)
from meshnet.models.gpt import GPT_SIZES, gpt_config
from meshnet.pipeline import make_pipeline
from meshnet.sample import sample_checkpoint
from meshnet.sharding import batch_sharding
from meshnet.train import run

import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(layers=4, heads=4, width=32, context=16)
SMALL = dict(SHAPE, layers=2)  # 4 pipeline layers with embed and head
B, T = 16, 16


def _mesh(**axes):
  n = int(np.prod(list(axes.values())))
  return meshnet.make_mesh(**axes, devices=jax.devices()[:n])


def _put(mesh, batch):
  return tuple(jax.device_put(a, batch_sharding(mesh)) for a in batch)


def _batch(vocab=256, seed=0):
  s = np.random.default_rng(seed).integers(0, vocab, (B, T + 1)).astype(np.int32)
  return s[:, :-1], s[:, 1:]


def _token_loss(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)


def _pipeline_grads(model, axes, schedule, batch, virtual_stages=1, precision="fp32"):
  mesh = _mesh(**axes)
  params = model.init(jax.random.key(0))
  pipe = make_pipeline(model, mesh, (T,), schedule=schedule, microbatches=4,
                       virtual_stages=virtual_stages, input_dtype=jnp.int32,
                       precision=precision)
  loss, stacked = jax.jit(pipe.make_grad_fn(loss=_token_loss))(
      pipe.stack(jax.device_put(params, pipe.param_shardings())), _put(mesh, batch),
      jax.random.key(1))
  return float(loss), reference.to_numpy(pipe.unstack(stacked))


@pytest.mark.parametrize("axes, schedule, virtual_stages, options, precision", [
    (dict(data=2, tensor=2, stage=2), "zb", 1, dict(positions="rotary", dropout=0.1), "bf16"),
    (dict(stage=2, fsdp=2), "interleaved", 2, dict(dropout=0.1), "fp32"),
], ids=["data2tensor2stage2-zb-rotary-dropout-bf16", "fsdp2stage2-interleaved-dropout"])
def test_fused_attention_equals_plain_inside_pipelines(axes, schedule, virtual_stages,
                                                       options, precision):
  batch = _batch()
  got = {a: _pipeline_grads(meshnet.models.gpt(None, **SMALL, attention=a, **options), axes,
                            schedule, batch, virtual_stages, precision)
         for a in ("plain", "fused")}
  tol = dict(rtol=2e-2, atol=2e-3) if precision == "bf16" else dict(rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["fused"][0], got["plain"][0], rtol=tol["rtol"] / 10)
  chex.assert_trees_all_close(got["fused"][1], got["plain"][1], **tol)


@pytest.mark.parametrize("vocab, axes, tie", [
    (256, dict(data=2, fsdp=2, tensor=2), True),
    (2000, dict(fsdp=2, tensor=2), True),
    (2000, dict(data=2, tensor=2, stage=2), False),
], ids=["v256-data2fsdp2tensor2-tied", "v2000-fsdp2tensor2-tied", "v2000-zb-pipeline"])
def test_onehot_embedding_equals_gather_when_the_vocabulary_is_split(vocab, axes, tie):
  """The table is ``P('vocab', 'embed')``: with tensor=2 the one-hot matmul
  contracts a split vocabulary; its loss and gradients are the gather's and
  one device's."""
  batch = _batch(vocab)
  one = _mesh(data=1)
  results = {}
  for kind in ("gather", "onehot"):
    model = meshnet.models.gpt(None, **SMALL, vocab=vocab, embedding=kind, tie_embeddings=tie)
    if "stage" in axes:
      results[kind] = _pipeline_grads(model, axes, "zb", batch)
    else:
      params, mesh = model.init(jax.random.key(0)), _mesh(**axes)
      loss, grads = jax.jit(meshnet.make_grad_fn(model, mesh, loss=_token_loss))(
          params, _put(mesh, batch), jax.random.key(1))
      results[kind] = (float(loss), reference.to_numpy(grads))
  model = meshnet.models.gpt(None, **SMALL, vocab=vocab, embedding="gather", tie_embeddings=tie)
  ref_loss, ref_grads = jax.jit(meshnet.make_grad_fn(model, one, loss=_token_loss))(
      model.init(jax.random.key(0)), _put(one, batch), jax.random.key(1))
  for kind in ("gather", "onehot"):
    np.testing.assert_allclose(results[kind][0], float(ref_loss), rtol=1e-5)
    chex.assert_trees_all_close(results[kind][1], reference.to_numpy(ref_grads),
                                rtol=1e-4, atol=1e-6)


def test_auto_embedding_is_onehot_on_a_gpu_up_to_1024_else_gather():
  tokens = jnp.zeros((2, 3), jnp.int32)
  gpu = jax.default_backend() == "gpu"
  for vocab, onehot in ((nn.ONEHOT_MAX_VOCAB, gpu), (nn.ONEHOT_MAX_VOCAB + 1, False)):
    table = nn.embedding_init(jax.random.key(0), vocab, 8)
    jaxpr = str(jax.make_jaxpr(lambda t, p=table: nn.embedding(p, t))(tokens))
    assert ("dot_general" in jaxpr, "gather" in jaxpr) == (onehot, not onehot), vocab
  # gpt(vocab=2000) on random tokens: auto (gather) = onehot.
  model = meshnet.models.gpt("tiny", vocab=2000)
  x, _ = _batch(2000)
  params = model.init(jax.random.key(0))
  np.testing.assert_array_equal(
      np.asarray(model.apply(params, x)),
      np.asarray(meshnet.models.gpt("tiny", vocab=2000, embedding="onehot").apply(params, x)))


@pytest.mark.parametrize("options, message", [
    (dict(embedding="x"), "unknown gpt embedding 'x'; choose one of auto, gather, onehot"),
    (dict(attention="flash"), "unknown gpt attention 'flash'; choose one of plain, fused"),
])
def test_bad_gpt_choices_are_one_line(options, message):
  with pytest.raises(meshnet.MeshnetError, match=message) as info:
    meshnet.models.gpt("tiny", **options)
  assert "\n" not in str(info.value)


def test_meshnet_train_attention_flash_is_one_line():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-m", "meshnet", "train", "--model", "gpt",
                         "--attention", "flash", "--steps", "1"],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines == ["meshnet: error: model.attention='flash' must be one of plain, fused "
                   "(--attention)"], proc.stderr


def _config(path, steps, attention, resume=False):
  return Config(
      mesh=MeshConfig(data=2, tensor=2, devices=4),
      model=ModelConfig(name="gpt", **SMALL, attention=attention),
      data=DataConfig(dataset="text", batch_size=16), optim=OptimConfig(lr=3e-3),
      checkpoint=CheckpointConfig(dir=str(path), every=2, resume=resume),
      train=TrainConfig(steps=steps, eval_every=0, log_every=1, progress=False))


def test_plain_checkpoint_resumes_with_fused_attention_and_samples(tmp_path):
  """Attention kind holds no parameters: a plain run resumed with fused
  attention continues the plain run's losses, and its checkpoint samples
  (greedy: the same bytes as the plain model's)."""
  whole = run(_config(tmp_path / "whole", 4, "plain"), log=lambda _: None)
  run(_config(tmp_path / "ck", 2, "plain"), log=lambda _: None)
  messages = []
  resumed = run(_config(tmp_path / "ck", 4, "fused", resume=True), log=messages.append)
  assert "resumed from step 2" in " ".join(messages)
  np.testing.assert_allclose([r["loss"] for r in resumed.history],
                             [r["loss"] for r in whole.history if r["step"] > 2], rtol=1e-4)
  fused = sample_checkpoint(str(tmp_path / "ck"), "def ", 24, temperature=0)
  plain = sample_checkpoint(str(tmp_path / "whole"), "def ", 24, temperature=0)
  assert fused.step == 4 and len(fused.continuation) == 24
  assert fused.continuation == plain.continuation


@pytest.mark.parametrize("axes, virtual_stages", [
    (dict(stage=2, tensor=2), 2), (dict(fsdp=2, stage=2, tensor=2), 1)])
def test_stage_parameter_counts_of_virtual_and_tensor_split_stages(axes, virtual_stages):
  model = meshnet.models.gpt(None, **SHAPE)
  pipe = make_pipeline(model, _mesh(**axes), (T,), schedule="interleaved"
                       if virtual_stages > 1 else "1f1b", microbatches=4,
                       virtual_stages=virtual_stages, input_dtype=jnp.int32)
  counts = pipe.stage_param_counts
  assert len(counts) == pipe.num_virtual_stages == 2 * virtual_stages
  total = sum(a.size for a in jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(0))))
  assert sum(counts) == total
  assert max(counts) / np.mean(counts) <= pipe.stage_padding < 1.5


# -- two bugs this review found, fixed: regression tests ------------------------------

def _xla_flops(model, batch):
  params = model.init(jax.random.key(0))

  def loss(params, x, y):
    return jnp.mean(_token_loss(model.apply(params, x), y))

  return jax.jit(jax.value_and_grad(loss)).lower(params, *batch).compile().cost_analysis()[
      "flops"]


def test_default_tiny_gpt_analytic_flops_within_10_percent_of_xla():
  size = GPT_SIZES["tiny"]
  seq = np.random.default_rng(0).integers(0, 256, (4, size["context"] + 1)).astype(np.int32)
  batch = (seq[:, :-1], seq[:, 1:])
  analytic = flops.gpt_flops_per_token(gpt_config("tiny", layers=1)) * seq[:, :-1].size
  xla = _xla_flops(meshnet.models.gpt("tiny", layers=1), batch)
  assert abs(xla / analytic - 1) < 0.10, (xla, analytic)


def test_full_remat_pipeline_runs_for_a_gpt():
  model = meshnet.models.gpt(None, **SHAPE)
  mesh = _mesh(stage=2)
  params = model.init(jax.random.key(0))
  batch = _put(mesh, _batch())
  out = {}
  for remat in ("none", "full"):
    pipe = make_pipeline(model, mesh, (T,), schedule="1f1b", microbatches=4, remat=remat,
                         input_dtype=jnp.int32)
    out[remat] = jax.jit(pipe.make_grad_fn())(
        pipe.stack(jax.device_put(params, pipe.param_shardings())), batch, jax.random.key(1))
  np.testing.assert_allclose(out["full"][0], out["none"][0], rtol=1e-5)
