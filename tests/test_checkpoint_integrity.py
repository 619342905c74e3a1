"""Checkpoint integrity (issue 12, part 4): a digest in every checkpoint's meta,
checked on restore and by `meshnet inspect --verify`.

The corruption is silent: a flipped byte in an out-of-line value of an OCDBT
data file (``<step>/state/ocdbt.process_N/d/...``), which Orbax reads without
error and returns wrong values for. (A flip in ``<step>/state/d/...``, the
b-tree nodes and small inlined values, already fails Orbax's CRC-32C.)
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import meshnet
from meshnet import checkpoint
from meshnet.config import CheckpointConfig, Config, MeshConfig, ModelConfig, TrainConfig
from meshnet.train import run

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
MESHNET = [sys.executable, "-m", "meshnet"]


def _config(directory, steps, *, resume=False, mesh=None):
  return Config(model=ModelConfig(hidden=(256,)),  # arrays big enough to live out of line
                mesh=mesh or MeshConfig(),
                checkpoint=CheckpointConfig(dir=str(directory), every=3, resume=resume),
                train=TrainConfig(steps=steps, eval_every=0, progress=False))


def _flip_a_value_byte(step_dir, process=0):
  """Flips one bit in the middle of the largest value file of ``process``;
  returns that file's path."""
  data = os.path.join(step_dir, "state", f"ocdbt.process_{process}", "d")
  path = max((os.path.join(data, name) for name in os.listdir(data)), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x04]))
  return path


def _inspect_verify(directory):
  proc = subprocess.run(MESHNET + ["inspect", str(directory), "--verify"], capture_output=True,
                        text=True, env={**ENV, "PYTHONPATH": os.getcwd()}, timeout=120)
  return proc.returncode, proc.stdout + proc.stderr


def test_digest_is_the_same_on_any_sharding_and_sees_one_ulp_and_a_swap():
  mesh = meshnet.make_mesh(data=2, fsdp=4)
  x = np.random.default_rng(0).standard_normal((40, 24)).astype(np.float32)
  ref = checkpoint.state_digest({"x": x, "n": np.int32(7)})
  for spec in (P(), P("fsdp"), P(None, "fsdp"), P("data", "fsdp"), P(("data", "fsdp"))):
    sharded = jax.device_put(x, NamedSharding(mesh, spec))
    assert checkpoint.state_digest({"x": sharded, "n": np.int32(7)}) == ref, spec
  nudged = x.copy()
  nudged[5, 3] = np.nextafter(nudged[5, 3], np.float32(1))
  swapped = x.copy()
  swapped[[1, 2]] = swapped[[2, 1]]
  for changed in (nudged, swapped):
    problem = checkpoint.digest_problem(ref, {"x": changed, "n": np.int32(7)})
    assert problem == "does not match its digest (x differs)"
  assert checkpoint.digest_problem(ref, {"x": x, "n": np.int32(7)}) is None


def test_a_flipped_byte_is_named_by_verify_and_skipped_on_resume(tmp_path):
  run(_config(tmp_path, 6), log=lambda _: None)
  assert checkpoint.read_meta(tmp_path / "6")["digest"]["method"] == checkpoint.DIGEST_METHOD
  code, out = _inspect_verify(tmp_path)
  assert code == 0, out
  assert "step        3  ok" in out and "step        6  ok" in out
  assert "2 checkpoints in" in out and "verified" in out

  _flip_a_value_byte(tmp_path / "6")
  code, out = _inspect_verify(tmp_path)
  assert code == 1, out
  assert "step        3  ok" in out
  assert "step        6  mismatch    does not match its digest (" in out
  assert out.strip().endswith("bad: step 6")

  messages = []
  resumed = run(_config(tmp_path, 8, resume=True), log=messages.append)
  text = "\n".join(messages)
  assert "checkpoint step 6 in" in text and "does not match its digest" in text, text
  assert "moved to 6.corrupt" in text and "resumed from step 3" in text, text
  assert int(resumed.state.step) == 8
  assert os.path.isdir(tmp_path / "6.corrupt")  # set aside, never deleted
  clean = run(_config(tmp_path / "clean", 8), log=lambda _: None)
  assert checkpoint.digest(resumed.params) == checkpoint.digest(clean.params)


def test_a_restore_on_another_mesh_verifies(tmp_path):
  run(_config(tmp_path, 3), log=lambda _: None)
  messages = []
  resumed = run(_config(tmp_path, 4, resume=True, mesh=MeshConfig(data=4, stage=2)),
                log=messages.append)
  text = "\n".join(messages)
  assert "resumed from step 3" in text and "digest" not in text, text
  assert int(resumed.state.step) == 4


def test_a_checkpoint_saved_without_a_digest_still_restores(tmp_path):
  run(_config(tmp_path, 3), log=lambda _: None)
  meta_file = tmp_path / "3" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["digest"]  # as meshnet wrote it before checkpoints kept a digest
  meta_file.write_text(json.dumps(meta))
  assert checkpoint.verify_step(tmp_path, 3)[0] == "unverified"
  assert meshnet.cli.main(["inspect", str(tmp_path), "--verify"]) == 0
  messages = []
  resumed = run(_config(tmp_path, 5, resume=True), log=messages.append)
  assert "resumed from step 3" in "\n".join(messages)
  assert int(resumed.state.step) == 5


def test_verify_names_an_unreadable_step_and_a_missing_one(tmp_path, capsys):
  run(_config(tmp_path, 6), log=lambda _: None)
  for name in os.listdir(tmp_path / "3" / "state" / "d"):  # the b-tree: Orbax notices
    os.truncate(tmp_path / "3" / "state" / "d" / name, 10)
  assert meshnet.cli.main(["inspect", str(tmp_path), "--verify"]) == 1
  out = capsys.readouterr().out
  assert "step        3  unreadable  cannot read checkpoint 3" in out
  assert "step        6  ok" in out
  assert meshnet.cli.main(["inspect", str(tmp_path), "--verify", "--step", "6"]) == 0
  assert meshnet.cli.main(["inspect", str(tmp_path), "--verify", "--step", "4"]) == 2
  assert "no checkpoint 4 in" in capsys.readouterr().err


def test_two_processes_each_add_their_shards_and_skip_a_flipped_byte_together(tmp_path):
  """Stages on two processes: each process writes (and digests) its own
  layer; a flip in process 1's values is found by both on resume."""
  train = ["train", "--no-progress", "--eval-every", "0", "--mesh", "data=2,stage=2",
           "--hidden", "256", "--checkpoint-every", "3", "--checkpoint-dir", str(tmp_path)]
  launch = MESHNET + ["launch", "-n", "2", "--devices-per-process", "2", "--", *MESHNET]
  env = {**ENV, "PYTHONPATH": os.getcwd()}
  proc = subprocess.run(launch + train + ["--steps", "6"], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert os.listdir(tmp_path / "6" / "state" / "ocdbt.process_1" / "d")  # process 1 wrote
  code, out = _inspect_verify(tmp_path)
  assert code == 0 and "step        6  ok" in out, out

  _flip_a_value_byte(tmp_path / "6", process=1)
  code, out = _inspect_verify(tmp_path)
  assert code == 1 and "step        6  mismatch" in out, out
  proc = subprocess.run(launch + train + ["--steps", "8", "--resume"], capture_output=True,
                        text=True, env=env, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert "does not match its digest" in out and "moved to 6.corrupt" in out, out
  assert "resumed from step 3" in out, out
  assert checkpoint.verify_step(tmp_path, 8)[0] == "ok"
