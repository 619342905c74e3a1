"""Defaults that fit the data (issue 11, part 3): settings not given are
resolved per data set and device count, the same from the command line and
from Python; settings given are kept."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet import cli, models
from meshnet.checkpoint import saved_config
from meshnet.config import (
    CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig,
)
from meshnet.defaults import DEFAULTS, RECIPES, resolve_defaults
from meshnet.optim import make_optimizer
from meshnet.train import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(meshnet.__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))

XOR_NOTES = [
    "hidden 8 (xor recipe; default 256,128)",
    "activation tanh (xor recipe; default relu)",
    "lr 0.05 (xor recipe; default 0.001)",
    "epochs 200 (xor recipe; default 20)",
    "batch size 4 (the data set has 4 examples; default 128)",
    "mesh data=4 on 4 of the 8 devices (a batch of 4 cannot be split over 8; default data=8)",
]


def _quiet(**fields):
  return TrainConfig(progress=False, **fields)


def test_xor_with_no_other_flag_says_what_it_chose_and_gets_4_of_4():
  proc = subprocess.run([sys.executable, "-m", "meshnet", "train", "--dataset", "xor"],
                        capture_output=True, text=True, env=ENV, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  lines = out.splitlines()
  assert lines[:len(XOR_NOTES)] == XOR_NOTES, out  # each once, before the run's lines
  assert all(lines.count(note) == 1 for note in XOR_NOTES), out
  assert "mesh data=4 fsdp=1 stage=1 tensor=1: 4 cpu devices, 1 process" in out
  assert "xor: 4 train / 4 test examples; global batch 4 (1 steps/epoch); 200 steps" in out
  assert "eval @ step 200: loss" in out and "accuracy 100.00%" in out  # all 4 points


def test_python_runs_resolve_alike(tmp_path):
  messages = []
  result = run(Config(data=DataConfig("xor"), train=_quiet(seed=7)), log=messages.append)
  assert messages[:len(XOR_NOTES)] == XOR_NOTES
  assert result.eval["eval_accuracy"] == 1.0 and len(result.history) > 0
  assert int(result.state.step) == 200
  widths = [layer["w"].shape for layer in result.params]
  assert widths == [(2, 8), (8, 1)]


def test_the_xor_recipe_reaches_4_of_4_for_every_seed():
  """The resolved recipe (model, optimizer, run length), full batch as the
  run takes it, for 64 seeds at once."""
  ds = meshnet.load_dataset("xor")
  config, _ = resolve_defaults(Config(data=DataConfig("xor")), ds, 8)
  mc, steps = config.model, config.train.epochs  # one step per epoch
  model = models.build(mc.name, ds.input_size, ds.num_outputs, hidden=mc.hidden,
                       activation=mc.activation, dropout=mc.dropout)
  optimizer = make_optimizer(config.optim, steps)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)

  def final_error(key):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    params = model.init(key)
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return jnp.max(jnp.abs(model.apply(params, x) - y))

  errors = jax.jit(jax.vmap(final_error))(jax.random.split(jax.random.key(0), 64))
  assert float(errors.max()) < 0.2  # every output on the right side of 0.5


def test_given_settings_are_kept_even_when_they_equal_the_default():
  ds = meshnet.load_dataset("xor")
  given = Config(mesh=MeshConfig(data=2, devices=2), model=ModelConfig(hidden=(256, 128),
                 activation="relu"), data=DataConfig("xor", batch_size=2),
                 optim=OptimConfig(lr=1e-3), train=TrainConfig(epochs=20))
  config, notes = resolve_defaults(given, ds, 2)
  assert notes == []
  assert config == dataclasses.replace(
      given, mesh=MeshConfig(data=2, fsdp=1, stage=1, tensor=1, devices=2))
  # From the command line: a flag given with the default's value is given.
  args = cli.build_parser().parse_args(["train", "--dataset", "xor", "--lr", "0.001",
                                        "--hidden", "256,128", "--epochs", "20"])
  config, notes = resolve_defaults(cli.config_from_args(args), ds, 8)
  assert (config.optim.lr, config.model.hidden, config.train.epochs) == (1e-3, (256, 128), 20)
  assert notes == ["activation tanh (xor recipe; default relu)",
                   "batch size 4 (the data set has 4 examples; default 128)",
                   "mesh data=4 on 4 of the 8 devices (a batch of 4 cannot be split over 8; "
                   "default data=8)"]


def test_resolving_twice_changes_nothing():
  ds = meshnet.load_dataset("xor")
  config, _ = resolve_defaults(Config(data=DataConfig("xor")), ds, 8)
  assert resolve_defaults(config, ds, 4) == (config, [])
  assert config.mesh == MeshConfig(data=4, fsdp=1, stage=1, tensor=1, devices=4)


@pytest.mark.parametrize("config, n_devices, batch, note", [
    (Config(), 8, 128, None),  # digits: the default run is unchanged
    (Config(mesh=MeshConfig(data=3, devices=3)), 3, 126,
     "batch size 126 (rounded down to a multiple of data=3 = 3; default 128)"),
    (Config(optim=OptimConfig(grad_accum=3)), 8, 120,
     "batch size 120 (rounded down to a multiple of data=8 x grad_accum=3 = 24; "
     "default 128)"),
    (Config(mesh=MeshConfig(data=2, stage=4), optim=OptimConfig(grad_accum=3)), 8, 120,
     "batch size 120 (rounded down to a multiple of data=2 x microbatches=12 = 24; "
     "default 128)"),
])
def test_the_default_batch_is_what_the_mesh_can_split(config, n_devices, batch, note):
  resolved, notes = resolve_defaults(config, meshnet.load_dataset("digits"), n_devices)
  assert resolved.data.batch_size == batch
  assert notes == ([note] if note else [])
  if config == Config():
    assert resolved.model.hidden == DEFAULTS["model.hidden"]
    assert (resolved.optim.lr, resolved.train.epochs) == (1e-3, 20)
    assert resolved.mesh.axes() == {"data": 8, "fsdp": 1, "stage": 1, "tensor": 1}


def test_a_given_batch_narrows_only_the_default_mesh(capsys):
  ds = meshnet.load_dataset("xor")
  config, notes = resolve_defaults(Config(data=DataConfig("xor", batch_size=2)), ds, 8)
  assert config.mesh.axes()["data"] == 2 and config.data.batch_size == 2
  assert notes[-1].startswith("mesh data=2 on 2 of the 8 devices")
  # A given mesh is used as it is: a clear error, as before.
  assert cli.main(["train", "--no-progress", "--dataset", "xor", "--mesh", "data=8"]) == 2
  err = capsys.readouterr().err
  assert err == ("meshnet: error: dataset xor has 4 training examples, fewer than data=8 = 8 "
                 "(one example per device and micro-step); use a smaller --mesh\n")
  # A batch that does not divide the whole default mesh is reported, not narrowed.
  digits = meshnet.load_dataset("digits")
  config, _ = resolve_defaults(Config(data=DataConfig(batch_size=100)), digits, 8)
  assert config.mesh.axes()["data"] == 8
  # Several processes: the mesh cannot leave a process out.
  with pytest.raises(meshnet.MeshnetError, match="a global batch of 4 cannot be split over "
                     "the 8 devices of 2 processes"):
    resolve_defaults(Config(data=DataConfig("xor")), ds, 8, processes=2)


def test_a_resumed_run_takes_the_checkpoints_batch_and_model(tmp_path):
  """100 examples: batch 96 on the default 8-device mesh. Resumed on data=4
  with nothing else given, the batch is the checkpoint's 96 (a fresh run on
  data=4 would take all 100) and the run continues."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(100, 4)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  ds = meshnet.Dataset("blobs", x, y, x[:20], y[:20], "cross_entropy", 2)
  first = Config(model=ModelConfig(hidden=(16,)),
                 checkpoint=CheckpointConfig(dir=str(tmp_path), every=2),
                 train=_quiet(steps=4, eval_every=0))
  run(first, dataset=ds, log=lambda _: None)
  assert saved_config(str(tmp_path))["data"]["batch_size"] == 96
  assert resolve_defaults(Config(mesh=MeshConfig(data=4)), ds, 4)[0].data.batch_size == 100
  messages = []
  resumed = Config(mesh=MeshConfig(data=4, devices=4),
                   checkpoint=CheckpointConfig(dir=str(tmp_path), resume=True),
                   train=_quiet(steps=6, eval_every=0))
  result = run(resumed, dataset=ds, log=messages.append)
  assert "hidden 16 (the checkpoint's; default 256,128)" in messages
  assert "batch size 96 (the checkpoint's; default 128)" in messages
  assert "resumed from step 4 of" in " ".join(messages)
  assert int(result.state.step) == 6
  assert saved_config(str(tmp_path))["data"]["batch_size"] == 96


def test_every_recipe_names_only_fields_with_a_default():
  for name, recipe in RECIPES.items():
    assert set(recipe) <= set(DEFAULTS), name
