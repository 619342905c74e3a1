"""Mixed precision (--precision bf16) and rematerialisation (--remat):
bf16 trains as well as fp32 with float32 masters; remat lowers compiled
temporaries without changing the loss or the gradient."""

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshnet
from meshnet import cli
from meshnet.config import Config, MeshConfig, ModelConfig, PipelineConfig, TrainConfig
from meshnet.errors import MeshnetError
from meshnet.pipeline import make_pipeline
from meshnet.sharding import batch_sharding
from meshnet.train import run

import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, ENV.get("PYTHONPATH")]))
ROUNDING = dict(rtol=1e-5, atol=1e-6)  # float32 rounding: remat reorders nothing else
MESHES = {"data=2": dict(data=2), "fsdp=2": dict(fsdp=2),
          "fsdp=2,tensor=2": dict(fsdp=2, tensor=2)}


@pytest.fixture(scope="module")
def digits_batch():
  ds = meshnet.load_dataset("digits")
  return ds.x_train[:64], ds.y_train[:64]


def _mesh(axes):
  n = int(np.prod(list(axes.values())))
  return meshnet.make_mesh(**axes, devices=jax.devices()[:n])


def _grads(model, axes, batch, **kw):
  mesh = _mesh(axes)
  params = model.init(jax.random.key(0))
  batch = tuple(jax.device_put(a, batch_sharding(mesh)) for a in batch)
  fn = jax.jit(meshnet.make_grad_fn(model, mesh, **kw))
  loss, grads = fn(params, batch, jax.random.key(1))
  return loss, grads, fn.lower(params, batch, jax.random.key(1))


def _train(precision):
  config = Config(mesh=MeshConfig(data=2, devices=2),
                  model=ModelConfig(hidden=(256, 128)),
                  train=TrainConfig(steps=150, eval_every=150, progress=False, seed=0,
                                    precision=precision))
  return run(config, log=lambda line: None)


def test_bf16_on_digits_reaches_fp32_accuracy_with_float32_masters():
  fp32, bf16 = _train("fp32"), _train("bf16")
  gap = abs(bf16.eval["eval_accuracy"] - fp32.eval["eval_accuracy"])
  assert fp32.eval["eval_accuracy"] > 0.9
  assert gap <= 0.01, (fp32.eval, bf16.eval)
  # Master weights and optimizer state stay float32; the loss is float32.
  for leaf in jax.tree.leaves((bf16.state.params, bf16.state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert np.isfinite(bf16.history[-2]["loss"])
  assert bf16.history[-2]["loss"] != fp32.history[-2]["loss"]  # it did compute in bf16


@pytest.mark.parametrize("mesh", ["data=2", "fsdp=2,tensor=2"])
def test_bf16_loss_and_gradient_near_fp32_and_matmuls_in_bf16(mesh, digits_batch):
  model = meshnet.models.mlp([64, 128, 64, 10])
  ref_loss, ref_grads, _ = _grads(model, dict(data=1), digits_batch)
  loss, grads, lowered = _grads(model, MESHES[mesh], digits_batch, precision="bf16")
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert g.dtype == jnp.float32  # the cast's transpose: float32 gradients
    assert np.linalg.norm(np.asarray(g) - np.asarray(r)) <= 0.1 * np.linalg.norm(r) + 1e-6  # bf16: ~3 digits
  dots = re.findall(r"dot_general.*", lowered.as_text())
  assert dots and all("bf16" in d for d in dots), dots[:2]


@pytest.mark.parametrize("mesh", ["data=2", "fsdp=2"])
def test_remat_keeps_loss_and_gradient(mesh, digits_batch):
  model = meshnet.models.mlp([64, 128, 64, 10], dropout=0.1)  # masks recomputed alike
  results = {policy: _grads(model, MESHES[mesh], digits_batch, remat=policy)[:2]
             for policy in ("none", "layer", "full")}
  for policy in ("layer", "full"):
    np.testing.assert_allclose(results[policy][0], results["none"][0], **ROUNDING)
    chex.assert_trees_all_close(reference.to_numpy(results[policy][1]),
                                reference.to_numpy(results["none"][1]), **ROUNDING)


def test_remat_lowers_compiled_temporaries():
  # gelu: its backward needs the pre-activation, which a layer's input recomputes
  model = meshnet.models.mlp([64] + [512] * 8 + [10], activation="gelu")
  rng = np.random.default_rng(0)
  batch = (rng.normal(size=(1024, 64)).astype(np.float32),
           rng.integers(0, 10, 1024).astype(np.int32))
  temp = {}
  for policy in ("none", "layer", "full"):
    _, _, lowered = _grads(model, dict(data=1), batch, remat=policy)
    temp[policy] = lowered.compile().memory_analysis().temp_size_in_bytes
  assert temp["layer"] < 0.8 * temp["none"], temp  # 41 MB vs 58 MB here
  assert temp["full"] <= temp["layer"], temp


@pytest.mark.parametrize("widths", [[64, 32, 32, 32, 10], [64, 256, 128, 10]],
                         ids=["equal-boundaries", "first-input-narrower"])
@pytest.mark.parametrize("policy", ["layer", "full"])
def test_remat_inside_pipeline_stages_keeps_the_gradient(policy, widths, digits_batch):
  """Also when stage 0 reads its input as it is and it is narrower than the
  activations between stages (64 against 256 wide): ``full`` keeps stage
  inputs of two sizes in one residual buffer (a crash before)."""
  model = meshnet.models.mlp(widths, dropout=0.1)
  mesh = meshnet.make_mesh(data=1, stage=2, devices=jax.devices()[:2])
  params = model.init(jax.random.key(0))
  x, y = digits_batch[0][:16], digits_batch[1][:16]
  out = {}
  for p in ("none", policy):
    pipe = make_pipeline(model, mesh, (64,), schedule="1f1b", microbatches=4, remat=p)
    loss, grads = jax.jit(pipe.make_grad_fn())(pipe.stack(params), (x, y), jax.random.key(1))
    out[p] = (loss, reference.to_numpy(pipe.unstack(grads)))
  np.testing.assert_allclose(out[policy][0], out["none"][0], **ROUNDING)
  chex.assert_trees_all_close(out[policy][1], out["none"][1], **ROUNDING)


def test_config_remat_accepts_the_former_boolean():
  assert TrainConfig(remat=True).remat == "full" and TrainConfig(remat=False).remat == "none"
  old = Config(pipeline=PipelineConfig(remat=True))
  assert old.train.remat == "full" and old.pipeline.remat is True
  new = Config(train=TrainConfig(remat="layer"))
  assert new.pipeline.remat is True and new.train.remat == "layer"
  assert Config().pipeline.remat is False and Config().train.remat == "none"
  parse = lambda *a: cli.config_from_args(cli.build_parser().parse_args(["train", *a]))
  assert parse("--remat").train.remat == "full"  # --remat alone: what it meant
  assert parse().train.remat == "none"
  assert parse("--remat", "layer", "--precision", "bf16").train == TrainConfig(
      remat="layer", precision="bf16", **{k: v for k, v in vars(parse().train).items()
                                          if k not in ("remat", "precision")})


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16"], "unknown precision 'fp16'; choose one of fp32, bf16"),
    (["--remat", "some"], "unknown remat policy 'some'; choose one of none, layer, full"),
    (["--precision", "bf16", "--devices", "2", "--mesh", "stage=4", "--steps", "1"],
     "mesh data=-1,stage=4 needs a multiple of 4 devices but there are 2"),
])
def test_bad_precision_or_remat_is_one_line(argv, message, capsys):
  assert cli.main(["train", "--no-progress", *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("meshnet: error: ") and message in err, err
  assert err.count("\n") == 1


def test_step_refuses_unknown_values():
  model = meshnet.models.mlp([4, 2])
  mesh = _mesh(dict(data=1))
  with pytest.raises(MeshnetError, match="unknown precision 'half'"):
    meshnet.make_grad_fn(model, mesh, precision="half")
  with pytest.raises(MeshnetError, match="unknown remat policy 'all'"):
    meshnet.make_train_step(model, meshnet.make_optimizer(meshnet.OptimConfig(lr=0.1), 1),
                            mesh, remat="all")


def test_cli_bf16_with_layer_remat_trains():
  proc = subprocess.run(
      [sys.executable, "-m", "meshnet", "train", "--devices", "2", "--mesh", "data=2",
       "--steps", "40", "--eval-every", "40", "--precision", "bf16", "--remat", "layer",
       "--no-progress"], capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout + proc.stderr
  assert "precision bf16, remat layer" in out
  accuracy = float(re.search(r"eval @ step 40: .*accuracy ([\d.]+)%", out).group(1))
  assert accuracy > 80, out
