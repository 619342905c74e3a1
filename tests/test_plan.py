"""``meshnet plan``: its bytes against the real arrays and XLA's compiled step,
its link fit against a bench file, the command end to end, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import meshnet
from meshnet import hardware, planner
from meshnet.config import Config, MeshConfig, OptimConfig
from meshnet.errors import MeshnetError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(meshnet.__file__)))
DEVICE = hardware.device_spec("cpu", flops=1e11, memory_bandwidth=1e10)
MNIST_MLP = (784, 512, 256, 128, 10)
DIGITS_MLP = (64, 256, 128, 10)


def _mesh(**axes) -> MeshConfig:
  return MeshConfig(**{"data": 1, "fsdp": 1, "stage": 1, "tensor": 1, **axes})


def _config(widths=DIGITS_MLP, batch=128, optimizer="adam", **kw) -> planner.PlanConfig:
  return planner.PlanConfig(widths=tuple(widths), batch_size=batch, device=DEVICE,
                            optim=OptimConfig(optimizer=optimizer), **kw)


def _real_state(config: planner.PlanConfig):
  """``init_train_state``'s real arrays for the plan's model, optimizer and mesh."""
  model = meshnet.models.mlp(list(config.widths), activation=config.activation)
  optimizer = meshnet.make_optimizer(config.optim, 10)
  axes = {a: getattr(config.mesh, a) for a in meshnet.AXES}
  mesh = meshnet.make_mesh(devices=jax.devices()[:config.devices], **axes)
  return model, optimizer, mesh, meshnet.init_train_state(model, optimizer, mesh,
                                                          jax.random.key(0))


def _device_bytes(tree) -> int:
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("mesh, extra, optimizer", [
    (_mesh(data=8), {}, "sgd"),
    (_mesh(data=8), {}, "adam"),
    (_mesh(data=2, stage=4), {"microbatches": 4}, "adam"),
    (_mesh(data=2, stage=4), {"microbatches": 4}, "momentum"),
    (_mesh(), {}, "adam"),
])
def test_parameter_and_optimizer_bytes_are_the_real_arrays(mesh, extra, optimizer):
  config = _config(MNIST_MLP, batch=256, optimizer=optimizer, mesh=mesh, **extra)
  result = planner.plan(config)
  *_, state = _real_state(config)
  assert result.memory.params == _device_bytes(state.params)
  assert result.memory.grads == _device_bytes(state.params)
  assert result.memory.optimizer == _device_bytes(state.opt_state)
  assert result.num_params == 567_434


def test_arguments_and_outputs_are_xlas_for_the_real_step():
  """The step meshnet train compiles, on real arrays and a real batch."""
  config = _config(MNIST_MLP, batch=512, mesh=_mesh(data=4))
  model, optimizer, mesh, state = _real_state(config)
  step = meshnet.make_train_step(model, optimizer, mesh)
  x = np.zeros((512, 784), np.float32)
  y = np.zeros((512,), np.int32)
  batch = meshnet.global_batch((x, y), np.arange(512), meshnet.sharding.batch_sharding(mesh))
  analysis = step.lower(state, batch).compile().memory_analysis()
  memory = planner.plan(config).memory
  assert memory.arguments == analysis.argument_size_in_bytes
  assert memory.outputs == analysis.output_size_in_bytes


# (config, what it exercises); temporaries within 25% of XLA's temp_size_in_bytes.
COMPILED = [
    (dict(widths=DIGITS_MLP, batch=128, mesh=_mesh(data=8)), "plain, 8 devices"),
    (dict(widths=MNIST_MLP, batch=256, mesh=_mesh()), "plain, one device"),
    (dict(widths=MNIST_MLP, batch=1024, mesh=_mesh(data=2), grad_accum=4,
          optimizer="sgd"), "gradient accumulation"),
    (dict(widths=MNIST_MLP, batch=1024, mesh=_mesh(data=2, stage=4), microbatches=8,
          optimizer="sgd"), "1f1b, gather-bound"),
    (dict(widths=(64,) + (256,) * 8 + (10,), batch=1024, mesh=_mesh(data=2, stage=4),
          microbatches=8, schedule="zb"), "zero bubble, rounds-bound"),
    (dict(widths=(64,) + (256,) * 8 + (10,), batch=512, mesh=_mesh(data=2, stage=2),
          microbatches=4, schedule="interleaved", virtual_stages=2), "interleaved"),
    (dict(widths=DIGITS_MLP, batch=1024, mesh=_mesh(data=2, stage=2), microbatches=8,
          schedule="gpipe"), "gpipe, padded input"),
]


@pytest.mark.parametrize("kwargs, what", COMPILED, ids=[w for _, w in COMPILED])
def test_memory_matches_xlas_compiled_step(kwargs, what):
  config = _config(**kwargs)
  memory = planner.plan(config).memory
  xla = planner.compiled_memory(config)
  assert memory.arguments == xla.arguments, what
  assert memory.outputs == xla.outputs, what
  assert abs(memory.temporaries / xla.temporaries - 1) <= 0.25, (
      what, memory.temporaries, xla.temporaries)


def test_traffic_and_time_follow_the_link():
  link = hardware.LinkSpec({name: hardware.LinkCost(1e-3, 1e9)
                            for name in hardware.STEP_COLLECTIVES})
  device = hardware.DeviceSpec("cpu", 1e11, 1e10, 0, link)
  config = planner.PlanConfig(widths=MNIST_MLP, batch_size=1024, device=device,
                              mesh=MeshConfig(data=4), optim=OptimConfig(optimizer="sgd"))
  assert config.mesh == _mesh(data=4)  # axes not given are 1
  result = planner.plan(config)
  (data,) = result.traffic
  bucket = 4 * 567_434 + 4  # every gradient and the loss, one all-reduce
  assert data.axis == "data" and data.calls == {"all_reduce": 1}
  assert data.bytes_sent == round(2 * 3 / 4 * bucket)
  assert data.seconds == pytest.approx(1e-3 + 2 * 3 / 4 * bucket / 1e9)
  step = result.step
  assert step.step_s == pytest.approx(step.compute_s + step.comm_s)
  assert step.comm_s == pytest.approx(data.seconds)
  # 2 x in x out per example forward, the same for weight gradients, and
  # input gradients for every layer but the first.
  forward = 2 * 256 * sum(i * o for i, o in zip(MNIST_MLP[:-1], MNIST_MLP[1:]))
  assert step.flops == pytest.approx(3 * forward - 2 * 256 * 784 * 512)
  devices = [row.devices for row in result.scaling]
  assert devices == [1, 2, 4, 8] and result.scaling[0].speedup == 1.0
  assert result.scaling[0].comm_s == 0.0  # one device: no collective
  assert result.scaling[2].step_s == pytest.approx(step.step_s)


def test_pipeline_traffic_counts_every_round():
  config = _config(MNIST_MLP, batch=1024, mesh=_mesh(data=2, stage=4), microbatches=8)
  result = planner.plan(config)
  p = result.pipeline
  stage = next(t for t in result.traffic if t.axis == "stage")
  assert stage.calls["ppermute"] == 2 * p["rounds"]  # activations and cotangents
  message = 4 * p["microbatch"] * p["activation_width"]
  # The stage vectors and their gradient move in one all_to_all each
  # (meshnet.pipeline.restack): S rows of the longest stage's pieces, the
  # first layer's quarter; b3 [10], kept whole on every stage, joins the
  # gradient norm's sum of a float per split parameter (7); the finite
  # check sums a byte per split leaf (7 params, Adam's 7 + 7).
  moved = 4 * 4 * (784 * 512 + 512) // 4
  assert stage.calls == {"all_to_all": 2, "ppermute": 2 * p["rounds"], "all_reduce": 3}
  assert stage.bytes_sent == round(2 * 3 / 4 * moved + p["rounds"] * 2 * message
                                   + 2 * 3 / 4 * (4 + 4 * 7 + 4 * 10 + 21))
  assert 0 < p["bubble"] < 1 and p["microbatches"] == 8 and p["microbatch"] == 64


def _bench_lines(path, latency=1e-3, bandwidth=2e9, shift=(2e-4, 5e8)):
  """JSON lines as ``meshnet bench collectives`` writes them, with times
  from a known link."""
  lines = []
  for name, (lat, bw) in (("all_reduce", (latency, bandwidth)), ("shift", shift)):
    for size in (1_000, 100_000, 1_000_000):
      nbytes = 4 * size
      seconds = lat + hardware.bus_factor(name, 2) * nbytes / bw
      lines.append({"collective": name, "axes": ["data"], "devices": 2, "processes": 2,
                    "dtype": "float32", "shape": [size], "bytes": nbytes,
                    "median_s": seconds, "min_s": seconds, "max_s": seconds,
                    "algbw_GBps": nbytes / seconds / 1e9, "busbw_GBps": 0.0,
                    "platform": "cpu"})
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  return path


def test_link_file_fits_latency_and_bandwidth(tmp_path):
  path = _bench_lines(tmp_path / "links.jsonl")
  link = hardware.read_link_file(str(path), base=hardware.CPU_LINK)
  assert link.costs["all_reduce"].latency_s == pytest.approx(1e-3)
  assert link.costs["all_reduce"].bandwidth_Bps == pytest.approx(2e9)
  assert link.costs["ppermute"].latency_s == pytest.approx(2e-4)
  assert link.costs["ppermute"].bandwidth_Bps == pytest.approx(5e8)
  assert link.costs["all_gather"] == hardware.CPU_LINK.costs["all_gather"]  # not in the file


def test_link_file_with_one_size_keeps_the_default_latency(tmp_path):
  """One size cannot split latency from bandwidth: the default latency stays
  and the bandwidth makes up the rest (it used to read as infinite)."""
  path = tmp_path / "one.jsonl"
  lines = [json.loads(l) for l in _bench_lines(tmp_path / "all.jsonl").read_text().splitlines()]
  path.write_text("\n".join(json.dumps(l) for l in lines if l["shape"] == [1_000_000]))
  link = hardware.read_link_file(str(path), base=hardware.CPU_LINK)
  cost = link.costs["all_reduce"]
  measured = next(l["median_s"] for l in lines if l["collective"] == "all_reduce"
                  and l["shape"] == [1_000_000])
  assert cost.latency_s == min(hardware.CPU_LINK.costs["all_reduce"].latency_s, measured / 2)
  assert 0 < cost.bandwidth_Bps < float("inf")
  assert cost.time(4_000_000) == pytest.approx(measured)  # the one measured point
  assert "one size only" in link.source


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  return subprocess.run([sys.executable, "-m", "meshnet", "plan", *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_command_prints_the_table_and_json(tmp_path):
  flags = ["--mesh", "data=2,stage=2", "--batch-size", "1024", "--microbatches", "8",
           "--schedule", "1f1b", "--flops", "100G"]
  proc = _run(*flags)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "mlp 64-256-128-10 (50,826 parameters), adam, global batch 1024" in out
  assert "pipeline 1f1b, 8 microbatches of 64" in out
  for row in ("parameters", "optimizer state", "XLA temporaries", "stage axis", "data axis",
              "projection", "speedup"):
    assert row in out, row
  path = _bench_lines(tmp_path / "links.jsonl")
  proc = _run(*flags, "--json", "--link-file", str(path), "--max-devices", "16")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  assert result["mesh"] == {"data": 2, "fsdp": 1, "stage": 2, "tensor": 1}
  assert result["pipeline"]["microbatches"] == 8 and result["batch_size"] == 1024
  assert result["memory"]["arguments"] == result["xla"]["arguments"]
  assert result["memory"]["outputs"] == result["xla"]["outputs"]
  assert result["device"]["flops"] == 1e11
  assert result["device"]["link"]["all_reduce"]["latency_s"] == pytest.approx(1e-3)
  assert [row["devices"] for row in result["scaling"]] == [1, 2, 4, 8, 16]
  assert result["scaling"][0]["speedup"] == 1.0


def test_plan_resolves_flags_as_train_does():
  """xor's 4 examples: train narrows the default mesh to data=4, batch 4."""
  config, notes = planner.plan_config(Config(data=meshnet.DataConfig(dataset="xor")),
                                      DEVICE, n_devices=8)
  assert config.mesh.data == 4 and config.batch_size == 4
  assert config.widths == (2, 8, 1) and config.loss == "mse" and config.activation == "tanh"
  assert any("batch size 4" in note for note in notes)
  memory = planner.plan(config).memory
  assert memory.temporaries and memory.arguments == planner.compiled_memory(config).arguments


def test_parameter_count_plans_without_layers():
  config = planner.PlanConfig(widths=None, num_params=125_000_000, batch_size=512,
                              device=hardware.device_spec("h100"), mesh=_mesh(data=8))
  result = planner.plan(config)
  assert result.memory.params == 500_000_000
  assert result.memory.optimizer == 2 * 500_000_000 + 8  # adam: mu, nu; its and the lr's counts
  assert result.memory.temporaries is None and result.memory.activations is None
  assert result.step.flops == 6 * 125_000_000 * 64


@pytest.mark.parametrize("args, message", [
    (["--link-file", "/nonexistent.jsonl"], "cannot read link file /nonexistent.jsonl"),
    (["--bandwidth", "-1"], "--bandwidth -1 must be a finite number > 0"),
    (["--device-kind", "tpu-v9"], "unknown device kind 'tpu-v9'"),
    (["--layers", "784"], "layer widths 784 need an input and an output width"),
    (["--layers", "784,10", "--params", "7"], "give --layers W0,W1,... or --params N"),
    (["--batch-size", "100", "--mesh", "data=8"], "global batch size 100 is not divisible"),
    (["--params", "1M", "--mesh", "stage=2"], "needs the layer widths to cut into stages"),
    (["--max-devices", "0"], "--max-devices 0 must be >= 1"),
])
def test_bad_input_is_one_line(args, message, capsys):
  assert meshnet.cli.main(["plan", "--no-xla", "--flops", "1G", *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("meshnet: error: ") and message in err, err
  assert err.count("\n") == 1


def test_bad_link_file_line_is_named(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"collective": "all_reduce", "devices": 2}\n')
  with pytest.raises(MeshnetError, match="bad.jsonl line 1 is not a `meshnet bench"):
    hardware.read_link_file(str(path))


# --- fsdp and tensor --------------------------------------------------------------

CUSTOM_MLP = (48, 96, 64, 32, 8)  # a --layers MLP whose hidden widths divide
SHARDED = [
    (_mesh(fsdp=8), DIGITS_MLP, "adam"),
    (_mesh(fsdp=8), DIGITS_MLP, "sgd"),
    (_mesh(data=2, fsdp=4), DIGITS_MLP, "adam"),
    (_mesh(data=2, fsdp=2, tensor=2), DIGITS_MLP, "adam"),
    (_mesh(data=2, fsdp=2, tensor=2), CUSTOM_MLP, "adam"),
    (_mesh(fsdp=4, tensor=2), CUSTOM_MLP, "momentum"),
]
SHARDED_IDS = [f"{m.data}-{m.fsdp}-{m.tensor}-{'x'.join(map(str, w))}-{o}"
               for m, w, o in SHARDED]


@pytest.mark.parametrize("mesh, widths, optimizer", SHARDED, ids=SHARDED_IDS)
def test_sharded_bytes_are_the_real_shards(mesh, widths, optimizer):
  config = _config(widths, batch=128, optimizer=optimizer, mesh=mesh)
  memory = planner.plan(config).memory
  *_, state = _real_state(config)
  assert memory.params == _device_bytes(state.params)
  assert memory.grads == _device_bytes(state.params)
  assert memory.optimizer == _device_bytes(state.opt_state)  # Adam's count included
  total = 4 * sum(i * o + o for i, o in zip(widths[:-1], widths[1:]))
  # within 10% of total / (fsdp x tensor): only biases stay whole
  assert memory.params <= 1.1 * total / (mesh.fsdp * mesh.tensor)


@pytest.mark.parametrize("mesh, widths, optimizer", SHARDED, ids=SHARDED_IDS)
def test_sharded_memory_matches_xlas_compiled_step(mesh, widths, optimizer):
  config = _config(widths, batch=128, optimizer=optimizer, mesh=mesh)
  memory = planner.plan(config).memory
  xla = planner.compiled_memory(config)
  assert memory.arguments == xla.arguments
  assert memory.outputs == xla.outputs
  assert abs(memory.temporaries / xla.temporaries - 1) <= 0.25, (
      memory.temporaries, xla.temporaries)


def test_sharded_traffic_and_projection():
  link = hardware.LinkSpec({name: hardware.LinkCost(1e-3, 1e9)
                            for name in hardware.STEP_COLLECTIVES})
  device = hardware.DeviceSpec("cpu", 1e11, 1e10, 0, link)
  config = planner.PlanConfig(widths=DIGITS_MLP, batch_size=128, device=device,
                              mesh=_mesh(data=2, fsdp=2, tensor=2),
                              optim=OptimConfig(optimizer="sgd"))
  result = planner.plan(config)
  traffic = {t.axis: t for t in result.traffic}
  # fsdp: the weights and the row layer's bias are split; per tensor block,
  # gathered and reduce-scattered once each, (n - 1) / n of the block; the
  # loss and the whole biases (b0's tensor half, b2) averaged in one bucket.
  blocks = 4 * (64 * 256 // 2 + 256 * 128 // 2 + 128 + 128 * 10)
  fsdp = traffic["fsdp"]
  assert fsdp.calls == {"all_gather": 4, "reduce_scatter": 4, "all_reduce": 1}
  assert fsdp.bytes_sent == round(2 * 0.5 * blocks + 2 * 0.5 * 4 * (1 + 128 + 10))
  # tensor: one column/row pair, its forward all-reduce of [32 rows, 128];
  # the column layer is the first (no input cotangent to reduce).
  assert traffic["tensor"].calls == {"all_reduce": 1}
  assert traffic["tensor"].bytes_sent == round(2 * 0.5 * 4 * 32 * 128)
  assert traffic["data"].bytes_sent == round(2 * 0.5 * (blocks // 2))
  step = result.step
  assert step.local_batch == 32
  local = (64, 128, 128, 10)  # widths on one device: the column layer's outputs halved
  forward = 2 * 32 * sum(i * o for i, o in zip(local[:-1], local[1:]))
  assert step.flops == pytest.approx(3 * forward - 2 * 32 * 64 * 128)
  assert [(r.devices, r.mesh) for r in result.scaling] == [
      (4, "data=1,fsdp=2,tensor=2"), (8, "data=2,fsdp=2,tensor=2")]
  assert result.scaling[0].speedup == 1.0
  assert any("data varied" in note for note in result.notes)


# --- pipelines composed with fsdp and tensor, bf16 -----------------------------------

PIPELINED = [
    (_mesh(stage=2, fsdp=2, tensor=2), DIGITS_MLP, "adam"),
    (_mesh(stage=2, fsdp=2, tensor=2), CUSTOM_MLP, "momentum"),
    (_mesh(data=2, stage=4), MNIST_MLP, "adam"),
]
PIPELINED_IDS = [f"{m.data}-{m.stage}-{m.fsdp}-{m.tensor}-{'x'.join(map(str, w))}-{o}"
                 for m, w, o in PIPELINED]


@pytest.mark.parametrize("mesh, widths, optimizer", PIPELINED, ids=PIPELINED_IDS)
def test_pipelined_bytes_are_the_real_arrays(mesh, widths, optimizer):
  """The state as init_train_state stores it (split over stage x fsdp x
  tensor), the stage vectors as Pipeline.stack builds them, and XLA's
  arguments and outputs of the compiled step."""
  config = _config(widths, batch=128, optimizer=optimizer, mesh=mesh, microbatches=4)
  result = planner.plan(config)
  model, _, jax_mesh, state = _real_state(config)
  assert result.memory.params == _device_bytes(state.params)
  assert result.memory.grads == _device_bytes(state.params)
  assert result.memory.optimizer == _device_bytes(state.opt_state)
  pipe = meshnet.make_pipeline(model, jax_mesh, (widths[0],), microbatches=4)
  stacked = pipe.stack(state.params)
  assert result.pipeline["stage_vector_bytes"] == _device_bytes(stacked)
  assert result.pipeline["param_width"] == pipe.param_width
  assert result.pipeline["split_width"] == pipe.split_width
  total = 4 * sum(i * o + o for i, o in zip(widths[:-1], widths[1:]))
  assert result.memory.params <= 1.1 * total / (mesh.stage * mesh.fsdp * mesh.tensor)
  xla = planner.compiled_memory(config)
  assert result.memory.arguments == xla.arguments
  assert result.memory.outputs == xla.outputs


def test_pipeline_with_fsdp_and_tensor_traffic():
  """fsdp: the stage vectors gathered once and their gradient
  reduce-scattered ((n - 1) / n of [v, N] + [v, N_t] each); tensor: per
  microbatch, the forward all-reduce of the row layer's output [mb, 128]."""
  config = _config(DIGITS_MLP, batch=128, mesh=_mesh(stage=2, fsdp=2, tensor=2),
                   microbatches=4)
  result = planner.plan(config)
  p, traffic = result.pipeline, {t.axis: t for t in result.traffic}
  words = 4 * (p["param_width"] + p["split_width"])
  assert traffic["fsdp"].calls == {"all_gather": 2, "reduce_scatter": 2, "all_reduce": 1}
  assert traffic["fsdp"].bytes_sent == round(2 * 0.5 * words + 2 * 0.5 * 4)
  assert p["microbatch"] == 16 and result.step.local_batch == 64  # batch over fsdp too
  assert traffic["tensor"].calls == {"all_reduce": 4}
  assert traffic["tensor"].bytes_sent == round(4 * 2 * 0.5 * 4 * 16 * 128)
  assert any("stage=2, fsdp=2 and tensor=2 kept" in n for n in result.notes)
  assert [r.mesh for r in result.scaling] == ["data=1,fsdp=2,stage=2,tensor=2"]


def test_bf16_pipeline_halves_the_messages():
  fp32 = planner.plan(_config(MNIST_MLP, batch=256, mesh=_mesh(data=2, stage=4),
                              microbatches=4))
  config = _config(MNIST_MLP, batch=256, mesh=_mesh(data=2, stage=4), microbatches=4,
                   precision="bf16")
  bf16 = planner.plan(config)
  assert bf16.pipeline["activation_dtype"] == "bfloat16"
  stage = lambda r: next(t for t in r.traffic if t.axis == "stage")
  rounds = bf16.pipeline["rounds"]
  message = 4 * 32 * 784  # [mb, D] float32: 256 / data=2 / 4 microbatches
  assert stage(fp32).bytes_sent - stage(bf16).bytes_sent == rounds * 2 * message // 2
  assert bf16.memory.activations < fp32.memory.activations
  assert any("precision bf16" in n and "not in the temporaries" in n for n in bf16.notes)
  xla = planner.compiled_memory(config)
  assert bf16.memory.arguments == xla.arguments and bf16.memory.outputs == xla.outputs
  assert abs(bf16.memory.temporaries / xla.temporaries - 1) <= 0.25


def test_deterministic_pipeline_with_fsdp_is_refused_in_one_line():
  with pytest.raises(MeshnetError, match="deterministic with fsdp=2") as e:
    _config(mesh=_mesh(fsdp=2, stage=2), deterministic=True)
  assert "\n" not in str(e.value)


def test_command_plans_fsdp_as_json():
  proc = _run("--mesh", "fsdp=8", "--flops", "100G", "--json")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  config, _ = planner.plan_config(Config(mesh=meshnet.MeshConfig(fsdp=8)), DEVICE,
                                  n_devices=8)
  memory = planner.plan(config).memory
  for key in ("params", "grads", "optimizer", "arguments", "outputs", "temporaries"):
    assert result["memory"][key] == getattr(memory, key), key
  assert result["memory"]["arguments"] == result["xla"]["arguments"]
  assert result["mesh"] == {"data": 1, "fsdp": 8, "stage": 1, "tensor": 1}
def _compiled_hlo(config: planner.PlanConfig):
  """The parsed HLO of the pipelined step meshnet train compiles for ``config``."""
  from meshnet import hlo
  model = meshnet.models.mlp(list(config.widths))
  optimizer = meshnet.make_optimizer(config.optim, 10)
  axes = {a: getattr(config.mesh, a) for a in meshnet.AXES}
  mesh = meshnet.make_mesh(devices=jax.devices()[:config.devices], **axes)
  pipeline = meshnet.make_pipeline(model, mesh, (config.widths[0],),
                                   schedule=config.schedule, microbatches=config.parts)
  step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipeline)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  B = config.batch_size
  batch = meshnet.global_batch((np.zeros((B, config.widths[0]), np.float32),
                                np.zeros((B,), np.int32)), np.arange(B),
                               meshnet.sharding.batch_sharding(mesh))
  return hlo.parse_hlo(step.lower(state, batch).compile().as_text())


def test_pipeline_all_reduces_are_the_compiled_steps():
  """XLA joins the loss's mean over data to the gradient's: one all-reduce
  over data, three over stage (the loss, the gradient norm's squares and the
  finite check of the state split over it), as many as the compiled step has."""
  config = _config(DIGITS_MLP, batch=128, mesh=_mesh(data=2, stage=2), microbatches=4)
  result = planner.plan(config)
  module = _compiled_hlo(config)
  compiled = [op for op in module.ops.values() if op.kind == "all-reduce" and op.bytes]
  planned = sum(t.calls.get("all_reduce", 0) for t in result.traffic)
  assert planned == len(compiled) == 4
  data = next(t for t in result.traffic if t.axis == "data")
  exchanged = max(op.bytes for op in compiled)  # [v, N] gradient and the loss
  assert data.calls == {"all_reduce": 1}
  assert data.bytes_sent == round(2 * 1 / 2 * exchanged)


def test_parameter_count_takes_a_billion_suffix(capsys):
  """``--params 7B`` (how model sizes are written) is 7e9 parameters."""
  assert meshnet.cli.main(["plan", "--no-xla", "--flops", "1G", "--device-kind", "h100",
                           "--params", "7B", "--mesh", "data=8", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["model"]["params"] == 7_000_000_000
  assert result["memory"]["params"] == 28_000_000_000


def test_projection_says_which_device_counts_it_leaves_out():
  """A batch of 6 splits over 1 and 2 replicas, not 4 or 8: those rows are
  left out of the projection, and a note says so instead of nothing."""
  result = planner.plan(_config(DIGITS_MLP, batch=6, mesh=_mesh(data=2)))
  assert [row.devices for row in result.scaling] == [1, 2]
  (note,) = [n for n in result.notes if n.startswith("projection:")]
  assert "no row for 4, 8 devices" in note and "global batch 6" in note
  assert note in planner.format_plan(result)


def test_precision_and_unpipelined_remat_are_named_as_not_modelled():
  proc = _run("--precision", "bf16", "--remat", "layer", "--no-xla")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--precision bf16 and --remat layer: not modelled yet" in proc.stdout + proc.stderr
