"""The ``meshnet`` command: flags are config fields; errors are one line."""

import dataclasses
import os
import subprocess
import sys

import pytest

from meshnet import cli
from meshnet.config import Config, MeshConfig
from meshnet.metrics import read_metrics


def test_every_train_flag_is_a_config_field():
  config = Config()
  for flag, (section, field, _, _) in cli.TRAIN_FLAGS.items():
    assert field in {f.name for f in dataclasses.fields(getattr(config, section))}, flag


def test_flags_parse_into_the_config():
  args = cli.build_parser().parse_args([
      "train", "--mesh", "data=4", "--devices", "4", "--hidden", "512,256,128",
      "--dataset", "mnist", "--data-dir", "/data", "--batch-size", "256", "--optimizer",
      "adamw", "--lr", "3e-4", "--weight-decay", "0.01", "--clip-norm", "1.0",
      "--grad-accum", "2", "--dropout", "0.2", "--seed", "5", "--eval-every", "0",
      "--steps", "7", "--metrics-file", "m.jsonl", "--lr-schedule", "warmup_cosine",
      "--warmup-steps", "2", "--no-progress",
  ])
  config = cli.config_from_args(args)
  assert config.mesh == MeshConfig(data=4, fsdp=1, stage=1, tensor=1, devices=4)
  assert not config.mesh.is_default  # a given mesh is used as it is
  assert config.model.hidden == (512, 256, 128) and config.model.dropout == 0.2
  assert (config.data.dataset, config.data.data_dir, config.data.batch_size) == (
      "mnist", "/data", 256)
  o = config.optim
  assert (o.optimizer, o.lr, o.weight_decay, o.clip_norm, o.grad_accum, o.lr_schedule,
          o.warmup_steps) == ("adamw", 3e-4, 0.01, 1.0, 2, "warmup_cosine", 2)
  t = config.train
  assert (t.seed, t.eval_every, t.steps, t.metrics_file, t.progress) == (
      5, 0, 7, "m.jsonl", False)


def test_defaults_match_the_config_dataclasses():
  config = cli.config_from_args(cli.build_parser().parse_args(["train"]))
  assert dataclasses.replace(config, mesh=MeshConfig()) == Config()
  assert config.mesh.devices == cli.CLI_DEFAULT_DEVICES


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "data=3"], "mesh data=3 uses 3 devices but there are 8"),
    (["--batch-size", "100"], "global batch size 100 is not divisible by data=8 = 8"),
    (["--model", "gpt9"], "unknown model 'gpt9'"),
    (["--dataset", "cifar"], "unknown dataset 'cifar'"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent"],
     "MNIST file train-images-idx3-ubyte[.gz] not found in /nonexistent"),
    (["--mesh", "pipe=2"], "bad mesh entry 'pipe=2'"),
])
def test_bad_input_is_one_line_on_stderr(argv, message, capsys):
  assert cli.main(["train", "--no-progress", *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("meshnet: error: ") and message in err
  assert err.count("\n") == 1 and "Traceback" not in err


def test_meshnet_train_command(tmp_path):
  """The installed command, in a fresh process that simulates its own devices."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  metrics_file = tmp_path / "m.jsonl"
  proc = subprocess.run(
      ["meshnet", "train", "--devices", "4", "--mesh", "data=4", "--steps", "30",
       "--eval-every", "15", "--log-every", "5", "--metrics-file", str(metrics_file)],
      capture_output=True, text=True, env=env, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout + proc.stderr
  assert "mesh data=4 fsdp=1 stage=1 tensor=1: 4 cpu devices" in out
  assert "step 30/30" in out and "samples/s" in out and "ETA" in out
  assert "eval @ step 30: loss" in out and "accuracy" in out
  records = read_metrics(str(metrics_file))
  steps = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30]
  assert all({"step", "loss", "samples_per_sec"} <= set(r) for r in steps)
  assert [r["step"] for r in evals] == [15, 30]
  assert all(0 <= r["eval_accuracy"] <= 1 for r in evals)


def test_python_dash_m_meshnet_works():
  proc = subprocess.run([sys.executable, "-m", "meshnet", "train", "--help"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "--grad-accum" in proc.stdout
