"""What a run costs: the run record first in the metrics file, measured from
the state's arrays, XLA's temporaries of the compiled step, and the
``--show-sharding`` table."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import meshnet
from meshnet import cli, runcost
from meshnet.config import (
    CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig,
)
from meshnet.metrics import read_metrics
from meshnet.plot import read_curves
from meshnet.sharding import batch_sharding
from meshnet.train import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(meshnet.__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT}
HIDDEN = (64, 32)  # digits: 64 -> 64 -> 32 -> 10; every width but the 10 divides by 8
BATCH = 64
STEPS = 3


def _itemsize(leaf) -> int:
  return np.dtype(leaf.dtype).itemsize


def _expected_per_device(tree) -> int:
  """Bytes per device from each leaf's sharding alone (``shard_shape``): the
  independent count that ``addressable_shards`` must agree with on these
  evenly split layouts."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * _itemsize(leaf)
             for leaf in jax.tree.leaves(tree))


def _total(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _config(mesh, tmp_path, **train):
  return Config(
      mesh=mesh, model=ModelConfig(hidden=HIDDEN), data=DataConfig(batch_size=BATCH),
      optim=OptimConfig(optimizer="adam", lr=1e-3),
      train=TrainConfig(steps=STEPS, eval_every=0, log_every=1, progress=False,
                        metrics_file=str(tmp_path / "m.jsonl"), **train))


def _compiled_step(config, state, mesh):
  """The run's train step compiled again, here, for XLA's own figures."""
  model = meshnet.models.build("mlp", 64, 10, hidden=HIDDEN)
  optimizer = meshnet.make_optimizer(config.optim, STEPS)
  step = meshnet.make_train_step(model, optimizer, mesh, loss="cross_entropy")
  ds = meshnet.load_dataset("digits")
  batch = meshnet.global_batch((ds.x_train, ds.y_train), np.arange(BATCH),
                               batch_sharding(mesh))
  return step.lower(state, batch).compile()


# -- the pure functions -------------------------------------------------------

def test_bytes_per_device_counts_what_each_device_holds():
  mesh = meshnet.make_mesh(data=2, fsdp=2, tensor=2)
  x = np.ones((64, 32), np.float32)  # 8 KiB
  split = jax.device_put(x, NamedSharding(mesh, P("fsdp", "tensor")))
  replicated = jax.device_put(x, NamedSharding(mesh, P()))
  rows = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "tensor"))))
  assert meshnet.bytes_per_device(split) == 8192 // 4
  assert meshnet.bytes_per_device(replicated) == 8192
  assert meshnet.bytes_per_device(rows) == 8192 // 8
  tree = {"a": split, "b": [replicated, rows], "host": x, "n": 3}
  held = meshnet.device_bytes(tree)
  assert sorted(held, key=lambda d: d.id) == sorted(mesh.devices.flat, key=lambda d: d.id)
  assert set(held.values()) == {8192 // 4 + 8192 + 8192 // 8}  # numpy / int count nothing
  assert meshnet.bytes_per_device(tree) == 8192 // 4 + 8192 + 8192 // 8
  assert meshnet.bytes_per_device({}) == 0
  # One device holding more than the others: the most is what counts.
  one = jax.device_put(np.ones((10,), np.float32), mesh.devices.flat[3])
  assert meshnet.bytes_per_device([rows, one]) == 1024 + 40
  assert meshnet.device_bytes([rows, one])[mesh.devices.flat[0]] == 1024


def test_param_table_rows_follow_param_specs():
  mesh = meshnet.make_mesh(data=2, fsdp=2, tensor=2)
  model = meshnet.models.mlp([64, 32, 16, 10])
  optimizer = meshnet.make_optimizer(OptimConfig(optimizer="adam", lr=1e-3), 10)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  specs = meshnet.param_specs(model, jax.eval_shape(model.init, jax.random.key(0)), mesh)
  rows = meshnet.param_table(state.params)
  assert [r.path for r in rows] == ["[0]['b']", "[0]['w']", "[1]['b']", "[1]['w']",
                                    "[2]['b']", "[2]['w']"]
  assert [r.spec for r in rows] == [repr(specs[i][k]) for i in range(3) for k in ("b", "w")]
  assert rows[1] == meshnet.ParamRow("[0]['w']", (64, 32), "float32", "P('fsdp', 'tensor')",
                                     64 * 32 * 4 // 4)
  assert [r.bytes_per_device for r in rows] == [
      _expected_per_device(leaf) for leaf in jax.tree.leaves(state.params)]
  table = meshnet.format_param_table(state.params)
  lines = table.splitlines()
  assert lines[0].split() == ["parameter", "shape", "dtype", "spec", "bytes", "per", "device"]
  assert len(lines) == 1 + len(rows) + 1
  for row, line in zip(rows, lines[1:]):
    assert line.startswith(row.path) and row.spec in line and str(row.shape) in line
  count = sum(math.prod(r.shape) for r in rows)
  assert lines[-1] == (
      f"total: 6 arrays, {count:,} parameters, "
      f"{runcost.format_bytes(meshnet.bytes_per_device(state.params))} per device "
      f"({runcost.format_bytes(4 * count)} in all)")


def test_the_printed_line_says_whose_devices():
  record = {"param_bytes_per_device": 2048, "opt_state_bytes_per_device": 4096,
            "temp_bytes_per_device": 3 * 2 ** 20, "devices": 8, "processes": 1}
  assert runcost.format_run_record(record) == (
      "memory per device: parameters 2.00 KiB, optimizer state 4.00 KiB, train step "
      "temporaries 3.00 MiB (the most on one of the 8 devices)")
  assert runcost.format_run_record({**record, "processes": 2}).endswith(
      "(the most on one of this process's 4 devices)")
  assert runcost.format_run_record({**record, "devices": 2, "processes": 2}).endswith(
      "3.00 MiB (this process's device)")
  assert runcost.format_run_record({**record, "temp_bytes_per_device": None}).endswith(
      "optimizer state 4.00 KiB, train step not compiled (the most on one of the 8 devices)")


def test_format_bytes():
  assert [runcost.format_bytes(n) for n in (0, 40, 1023, 2560, 52520, 1029344, 3 * 2 ** 30,
                                            None)] == [
      "0 B", "40 B", "1.00 KiB", "2.50 KiB", "51.3 KiB", "0.98 MiB", "3.00 GiB", "?"]


# -- meshnet train ------------------------------------------------------------

@pytest.mark.parametrize("axes, split", [({"fsdp": 8}, 8), ({"data": 8}, 1)])
def test_run_record_is_first_and_measured_from_the_state(tmp_path, axes, split):
  config = _config(MeshConfig(**axes), tmp_path)
  messages = []
  result = run(config, log=messages.append)
  records = read_metrics(str(tmp_path / "m.jsonl"))
  record = records[0]
  assert record == result.cost | {"time": record["time"]}
  assert [r["step"] for r in records[1:]] == [1, 2, 3]  # the only run record is the first
  assert all("kind" not in r for r in records[1:])

  state, mesh = result.state, meshnet.make_mesh(**axes)
  params, opt_state = state.params, state.opt_state
  n_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert record["kind"] == "run"
  assert record["mesh"] == {"data": 1, "fsdp": 1, "stage": 1, "tensor": 1, **axes}
  assert (record["devices"], record["processes"], record["params"]) == (8, 1, n_params)
  assert record["param_bytes"] == _total(params) == 4 * n_params
  assert record["param_bytes_per_device"] == _expected_per_device(params)
  assert record["opt_state_bytes_per_device"] == _expected_per_device(opt_state)
  if split == 1:
    assert record["param_bytes_per_device"] == _total(params)
    assert record["opt_state_bytes_per_device"] == _total(opt_state)
  else:  # about 1/8: only two biases (74 floats) and Adam's counts are not split
    for got, tree in ((record["param_bytes_per_device"], params),
                      (record["opt_state_bytes_per_device"], opt_state)):
      assert _total(tree) / 8 < got < 1.1 * _total(tree) / 8

  temp = runcost.temp_bytes(_compiled_step(config, state, mesh))
  assert temp > 0 and record["temp_bytes_per_device"] == temp

  printed = next(m for m in messages if m.startswith("memory per device"))
  assert printed == (
      f"memory per device: parameters {runcost.format_bytes(record['param_bytes_per_device'])}"
      f", optimizer state {runcost.format_bytes(record['opt_state_bytes_per_device'])}, "
      f"train step temporaries {runcost.format_bytes(temp)} "
      "(the most on one of the 8 devices)")
  compiled_at = next(i for i, m in enumerate(messages) if m.startswith("compiled the train"))
  assert messages[compiled_at + 1] == printed  # right under the start-of-run lines


def test_pipelined_run_record_is_measured_from_its_arrays(tmp_path):
  config = _config(MeshConfig(data=2, stage=2, devices=4), tmp_path)
  result = run(config, log=lambda _: None)
  record = read_metrics(str(tmp_path / "m.jsonl"))[0]
  assert record["kind"] == "run" and record["devices"] == 4
  assert record["mesh"] == {"data": 2, "fsdp": 1, "stage": 2, "tensor": 1}
  assert record["param_bytes_per_device"] == _expected_per_device(result.state.params)
  assert record["opt_state_bytes_per_device"] == _expected_per_device(result.state.opt_state)
  assert record["temp_bytes_per_device"] > 0


def test_a_resumed_run_appends_its_own_record_and_nothing_compiled_says_so(tmp_path):
  ck = CheckpointConfig(dir=str(tmp_path / "ck"))
  first = _config(MeshConfig(data=8), tmp_path)
  run(dataclasses.replace(first, checkpoint=ck), log=lambda _: None)
  again = CheckpointConfig(dir=str(tmp_path / "ck"), resume=True)
  messages = []
  resumed = run(dataclasses.replace(_config(MeshConfig(fsdp=8), tmp_path), checkpoint=again),
                log=messages.append)
  records = read_metrics(str(tmp_path / "m.jsonl"))
  assert [r.get("kind", r.get("step")) for r in records] == ["run", 1, 2, 3, "run"]
  assert records[0]["mesh"]["data"] == 8 and records[-1]["mesh"]["fsdp"] == 8
  assert resumed.cost["temp_bytes_per_device"] is None  # step 3 of 3: nothing to compile
  assert any(m.startswith("memory per device") and "train step not compiled" in m
             for m in messages)
  curves = read_curves(str(tmp_path / "m.jsonl"))
  assert curves.train_loss[0].tolist() == [1, 2, 3]


def test_meshnet_train_show_sharding_then_plot(tmp_path):
  """The command as a user runs it: the table, the record first, then a plot."""
  metrics = tmp_path / "m.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "meshnet", "train", "--devices", "8", "--mesh",
       "data=2,fsdp=2,tensor=2", "--hidden", ",".join(map(str, HIDDEN)), "--batch-size",
       str(BATCH), "--steps", "2", "--log-every", "1", "--eval-every", "0", "--no-progress",
       "--show-sharding", "--metrics-file", str(metrics)],
      capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout + proc.stderr
  lines = out.splitlines()

  mesh = meshnet.make_mesh(data=2, fsdp=2, tensor=2)
  model = meshnet.models.mlp([64, *HIDDEN, 10])
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  specs = meshnet.param_specs(model, shapes, mesh)
  assert repr(specs[0]["w"]) == "P('fsdp', 'tensor')"  # a Megatron column layer
  header = next(i for i, l in enumerate(lines) if l.split()[:4] == ["parameter", "shape",
                                                                     "dtype", "spec"])
  rows = lines[header + 1:header + 7]
  for row, (i, name) in zip(rows, [(i, k) for i in range(3) for k in ("b", "w")]):
    leaf = shapes[i][name]
    per_device = math.prod(NamedSharding(mesh, specs[i][name]).shard_shape(leaf.shape)) * 4
    assert row.split()[0] == f"[{i}]['{name}']"
    assert f"  {repr(specs[i][name])}  " in row and str(leaf.shape) in row
    assert row.endswith(runcost.format_bytes(per_device)), row
  assert lines[header + 7].startswith("total: 6 arrays, 6,570 parameters, ")
  assert header > next(i for i, l in enumerate(lines) if l.startswith("model: "))

  with open(metrics) as f:
    first = json.loads(f.readline())
  assert first["kind"] == "run" and first["mesh"] == {"data": 2, "fsdp": 2, "stage": 1,
                                                      "tensor": 2}
  assert first["params"] == 6570 and first["temp_bytes_per_device"] > 0
  per_device = sum(math.prod(NamedSharding(mesh, s).shard_shape(leaf.shape)) * 4
                   for s, leaf in zip(jax.tree.leaves(specs), jax.tree.leaves(shapes)))
  assert first["param_bytes_per_device"] == per_device
  assert first["opt_state_bytes_per_device"] == 2 * per_device + 2 * 4  # mu, nu, 2 counts
  memory = next(l for l in lines if l.startswith("memory per device: "))
  assert f"parameters {runcost.format_bytes(per_device)}," in memory

  picture = tmp_path / "loss.png"
  assert cli.main(["plot", str(metrics), "-o", str(picture)]) == 0
  assert picture.stat().st_size > 0
  assert read_curves(str(metrics)).train_loss[0].tolist() == [1, 2]


def test_show_sharding_is_a_config_field_and_off_by_default(capsys):
  args = cli.build_parser().parse_args(["train", "--show-sharding"])
  assert cli.config_from_args(args).train.show_sharding is True
  args = cli.build_parser().parse_args(["train"])
  assert cli.config_from_args(args).train.show_sharding is False
  assert TrainConfig().show_sharding is False
