"""FSDP (ZeRO-3) and tensor parallelism in the unpipelined step: every layout
computes what one device computes; the state lives sharded; checkpoints
restore across these meshes."""

import os
import re
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import meshnet
from meshnet.config import CheckpointConfig, Config, MeshConfig, ModelConfig, TrainConfig
from meshnet.sharding import batch_sharding
from meshnet.train import run

import reference

TIGHT = dict(rtol=2e-5, atol=2e-6)
LAYOUTS = [dict(fsdp=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, ENV.get("PYTHONPATH")]))


def _custom_model():
  """A user's closure model without names and with odd leaf shapes: the
  default FSDP rule splits what fsdp divides, and nothing over tensor."""

  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"embed": 0.3 * jax.random.normal(k1, (64, 24)),
            "mix": 0.3 * jax.random.normal(k2, (24, 7)),
            "odd": 0.3 * jax.random.normal(k3, (7, 10)),
            "scale": jnp.ones(())}

  def apply(params, x, *, train=False, key=None):
    h = jnp.tanh(x @ params["embed"])
    if train:  # its own dropout, drawn from the key meshnet gives it
      h = jnp.where(jax.random.bernoulli(key, 0.8, h.shape), h / 0.8, 0.0)
    return params["scale"] * jnp.tanh(h @ params["mix"]) @ params["odd"]

  return meshnet.Model(init, apply)


MODELS = {
    "mlp": lambda: meshnet.models.mlp([64, 32, 16, 10], dropout=0.2),
    "custom": _custom_model,
}


def _put(mesh, batch):
  return tuple(jax.device_put(a, batch_sharding(mesh)) for a in batch)


def _one_device(model, key):
  mesh = meshnet.make_mesh(data=1, devices=jax.devices()[:1])
  return mesh, jax.jit(meshnet.make_grad_fn(model, mesh))


@pytest.mark.parametrize("axes", LAYOUTS, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_loss_and_gradient_equal_one_device(model_name, axes, digits_batches):
  model = MODELS[model_name]()
  params = model.init(jax.random.key(0))
  x, y = digits_batches[0]
  key = jax.random.key(1)
  one_mesh, one = _one_device(model, key)  # dropout on: the same masks by example index
  ref_loss, ref_grads = one(params, _put(one_mesh, (x, y)), key)
  mesh = meshnet.make_mesh(**axes)
  loss, grads = jax.jit(meshnet.make_grad_fn(model, mesh, bucket_bytes=2048))(
      params, _put(mesh, (x, y)), key)
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(grads), reference.to_numpy(ref_grads), **TIGHT)
  specs = [g.sharding.spec for g in jax.tree.leaves(grads)]
  assert any("fsdp" in spec for spec in specs)  # gradients come back as shards
  assert any("tensor" in spec for spec in specs) == (
      axes.get("tensor", 1) > 1 and model_name == "mlp")  # tensor only where named


@pytest.mark.parametrize("model_name, opt, axes", [
    ("mlp", "adam", LAYOUTS[0]), ("mlp", "adam", LAYOUTS[1]), ("mlp", "adam", LAYOUTS[2]),
    ("custom", "adam", LAYOUTS[0]), ("custom", "adam", LAYOUTS[2]), ("mlp", "sgd", LAYOUTS[1]),
], ids=lambda v: ",".join(f"{k}={n}" for k, n in v.items()) if isinstance(v, dict) else v)
def test_parameters_after_three_steps_equal_one_device(model_name, opt, axes, digits_batches):
  model = MODELS[model_name]()
  optimizer = meshnet.make_optimizer(
      meshnet.OptimConfig(optimizer=opt, lr=1e-2 if opt == "adam" else 0.1, clip_norm=1.0), 3)
  results = []
  for mesh in (meshnet.make_mesh(data=1, devices=jax.devices()[:1]), meshnet.make_mesh(**axes)):
    state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
    step = meshnet.make_train_step(model, optimizer, mesh)
    history = []
    for batch in digits_batches:
      state, metrics = step(state, _put(mesh, batch))
      history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    results.append((history, reference.to_numpy(state.params),
                    reference.to_numpy(state.opt_state)))
  (h1, p1, o1), (hn, pn, on) = results
  np.testing.assert_allclose(hn, h1, **TIGHT)  # loss and grad_norm, step by step
  chex.assert_trees_all_close(pn, p1, **TIGHT)
  chex.assert_trees_all_close(on, o1, **TIGHT)


def _per_device_bytes(tree):
  """Bytes of ``tree`` on each device, from the arrays' own shards."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def test_parameters_and_optimizer_state_live_sharded_on_fsdp8():
  model = meshnet.models.mlp([64, 256, 128, 64, 10])
  optimizer = optax.adam(1e-3)
  mesh = meshnet.make_mesh(fsdp=8)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  total = sum(a.nbytes for a in jax.tree.leaves((state.params, state.opt_state)))
  per_device = _per_device_bytes((state.params, state.opt_state))
  assert len(per_device) == 8
  for nbytes in per_device.values():
    assert abs(nbytes - total / 8) <= 0.1 * total / 8, (nbytes, total / 8)
  # ... and after a step (the update keeps every leaf in its shards).
  step = meshnet.make_train_step(model, optimizer, mesh)
  x = np.zeros((64, 64), np.float32)
  state, _ = step(state, _put(mesh, (x, np.zeros(64, np.int32))))
  after = _per_device_bytes((state.params, state.opt_state))
  assert after == per_device


def _tensor_all_reduces(compiled_text, mesh):
  """All-reduce ops whose groups are the mesh's ``tensor`` pairs."""
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  pairs = {tuple(sorted(ids[d, f, s, :].tolist())) for d in range(ids.shape[0])
           for f in range(ids.shape[1]) for s in range(ids.shape[2])}
  count = 0
  for line in compiled_text.splitlines():
    if not re.search(r"\sall-reduce(-start)?\(", line):
      continue
    groups = re.search(r"replica_groups=(\{\{[0-9,{}]*\}\}|\[[0-9,]+\]<=\[[0-9]+\])", line)
    if groups is None:
      continue
    text = groups.group(1)
    if text.startswith("{{"):
      found = {tuple(sorted(map(int, g.split(",")))) for g in re.findall(r"\{([0-9,]+)\}", text)}
    else:  # iota form [n,k]<=[N]: consecutive device ids in groups of k
      n, k = map(int, re.match(r"\[([0-9]+),([0-9]+)\]", text).groups())
      found = {tuple(range(i * k, (i + 1) * k)) for i in range(n)}
    count += found == pairs
  return count


@pytest.mark.parametrize("widths, pairs", [([64, 32, 16, 10], 1), ([64, 32, 16, 32, 16, 10], 2)])
def test_one_tensor_all_reduce_per_megatron_pair_in_the_forward(widths, pairs):
  model = meshnet.models.mlp(widths)
  mesh = meshnet.make_mesh(data=2, fsdp=2, tensor=2)
  state = meshnet.init_train_state(model, optax.sgd(0.1), mesh, jax.random.key(0))
  batch = _put(mesh, (np.zeros((16, 64), np.float32), np.zeros(16, np.int32)))
  mask = jax.device_put(np.ones(16, np.float32), batch_sharding(mesh))
  text = meshnet.make_eval_step(model, mesh).lower(state.params, batch, mask).compile().as_text()
  assert _tensor_all_reduces(text, mesh) == pairs
  # The column layer's weight stays split over tensor (no gather over tensor).
  assert state.params[0]["w"].sharding.spec == P("fsdp", "tensor")
  assert state.params[1]["w"].sharding.spec == P("tensor", "fsdp")


def test_custom_model_without_names_gets_no_tensor_sharding():
  model = _custom_model()
  mesh = meshnet.make_mesh(data=2, fsdp=2, tensor=2)
  state = meshnet.init_train_state(model, optax.adam(1e-3), mesh, jax.random.key(0))
  specs = {k: v.sharding.spec for k, v in state.params.items()}
  assert specs == {"embed": P("fsdp", None), "mix": P("fsdp", None), "odd": P(None, "fsdp"),
                   "scale": P()}
  mu = state.opt_state[0].mu
  assert {k: v.sharding.spec for k, v in mu.items()} == specs  # Adam's moments alike


def test_an_axis_that_does_not_divide_is_one_line_before_compiling():
  model = meshnet.models.mlp([64, 30, 16, 10])  # 30 hidden units over tensor=4
  mesh = meshnet.make_mesh(data=2, tensor=4)
  with pytest.raises(meshnet.MeshnetError, match=r"parameter \[0\]\['b'\] dimension 0 "
                     r"\(logical 'mlp'\) has size 30, which tensor=4 does not divide"):
    meshnet.init_train_state(model, optax.sgd(0.1), mesh, jax.random.key(0))
  with pytest.raises(meshnet.MeshnetError, match=r"size 30, which tensor=4 does not divide"):
    meshnet.make_grad_fn(model, mesh)(model.init(jax.random.key(0)),
                                      (np.zeros((8, 64), np.float32), np.zeros(8, np.int32)),
                                      jax.random.key(0))


def test_unsupported_combinations_are_one_line():
  model = meshnet.models.mlp([64, 32, 16, 10])
  mesh = meshnet.make_mesh(data=2, fsdp=4)
  with pytest.raises(meshnet.MeshnetError, match=r"deterministic=True with fsdp=4"):
    meshnet.make_train_step(model, optax.sgd(0.1), mesh, deterministic=True)
  with pytest.raises(meshnet.MeshnetError, match=r"grad_transport='shm' with fsdp=4"):
    meshnet.make_train_step(model, optax.sgd(0.1), mesh, grad_transport="shm")
  with pytest.raises(meshnet.MeshnetError, match=r"deterministic=True with fsdp=2, tensor=1 "
                     r"in a pipeline"):
    run(Config(mesh=MeshConfig(fsdp=2, stage=4), model=ModelConfig(hidden=(32, 16, 16)),
               optim=meshnet.OptimConfig(deterministic=True),
               train=TrainConfig(steps=1, eval_every=0, progress=False)), log=lambda _: None)
  with pytest.raises(meshnet.MeshnetError, match=r"global batch size 36 is not divisible by "
                     r"data=2 x fsdp=4 = 8"):
    meshnet.step.check_batch_size(36, mesh)


def _config(path, mesh, steps, resume=False):
  return Config(
      mesh=mesh, model=ModelConfig(hidden=(64, 32, 48)),
      checkpoint=CheckpointConfig(dir=str(path), every=6, resume=resume),
      train=TrainConfig(steps=steps, eval_every=0, log_every=1, progress=False))


SAVED_ON = {"fsdp4tensor2": MeshConfig(fsdp=4, tensor=2), "data8": MeshConfig(data=8),
            "one": MeshConfig(data=1, devices=1)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """A 12-step run on fsdp=4,tensor=2 (the trajectory every layout follows),
  and 6-step checkpoints saved on each mesh of :data:`SAVED_ON`."""
  root = tmp_path_factory.mktemp("checkpoints")
  whole = run(_config(root / "whole", SAVED_ON["fsdp4tensor2"], 12), log=lambda _: None)
  for name, mesh in SAVED_ON.items():
    run(_config(root / name, mesh, 6), log=lambda _: None)
  return root, whole


@pytest.mark.parametrize("saved_on, then", [
    ("fsdp4tensor2", MeshConfig(data=8)), ("fsdp4tensor2", MeshConfig(data=1, devices=1)),
    ("data8", MeshConfig(fsdp=4, tensor=2)), ("one", MeshConfig(data=2, fsdp=2, tensor=2)),
    ("fsdp4tensor2", MeshConfig(fsdp=4, tensor=2)),
], ids=["fsdp4tensor2-to-data8", "fsdp4tensor2-to-1", "data8-to-fsdp4tensor2",
        "1-to-data2fsdp2tensor2", "same-mesh"])
def test_checkpoint_restores_across_meshes_on_the_same_trajectory(tmp_path, checkpoints,
                                                                   saved_on, then):
  root, whole = checkpoints
  shutil.copytree(root / saved_on, tmp_path / "part")
  messages = []
  resumed = run(_config(tmp_path / "part", then, 12, resume=True), log=messages.append)
  assert "resumed from step 6" in " ".join(messages)
  assert [r["step"] for r in resumed.history] == list(range(7, 13))
  expected = [r["loss"] for r in whole.history if r["step"] > 6]
  np.testing.assert_allclose([r["loss"] for r in resumed.history], expected, rtol=2e-4)
  chex.assert_trees_all_close(reference.to_numpy(resumed.params),
                              reference.to_numpy(whole.params), rtol=2e-3, atol=2e-5)
  if then == SAVED_ON[saved_on]:  # the same mesh: bit for bit
    assert meshnet.checkpoint.digest(resumed.state) == meshnet.checkpoint.digest(whole.state)


def test_cli_trains_on_data_fsdp_tensor_like_data_parallel():
  def train(mesh):
    proc = subprocess.run(
        [sys.executable, "-m", "meshnet", "train", "--mesh", mesh, "--steps", "20",
         "--log-every", "10", "--eval-every", "20", "--no-progress"],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr

  sharded = train("data=2,fsdp=2,tensor=2")
  assert "mesh data=2 fsdp=2 stage=1 tensor=2: 8 cpu devices" in sharded
  evals = [re.search(r"eval @ step 20: loss ([0-9.]+), accuracy ([0-9.]+)%", out).groups()
           for out in (sharded, train("data=8"))]
  assert evals[0] == evals[1]  # four decimals of the loss, two of the accuracy


def test_cli_refuses_a_mesh_that_does_not_divide_the_model_in_one_line():
  proc = subprocess.run(
      [sys.executable, "-m", "meshnet", "train", "--mesh", "data=2,tensor=4", "--hidden",
       "30,16", "--steps", "1", "--no-progress"],
      capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode != 0
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  assert "dimension 0 (logical 'mlp') has size 30, which tensor=4 does not divide" in lines[-1]
  assert "Traceback" not in proc.stderr
