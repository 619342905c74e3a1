"""Checkpoints: resume bit-for-bit, restore on other meshes, survive kills."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import meshnet
from meshnet import checkpoint
from meshnet.config import (
    CheckpointConfig, Config, MeshConfig, ModelConfig, PipelineConfig, TrainConfig,
)
from meshnet.metrics import read_metrics
from meshnet.train import run

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
TRAIN = [sys.executable, "-m", "meshnet", "train", "--no-progress", "--eval-every", "0",
         "--log-every", "10"]


def _start(args):
  return subprocess.Popen(TRAIN + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=ENV)


def _wait_for(path, proc, timeout=120):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.01)


def _finish(args):
  proc = subprocess.run(TRAIN + args, capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout + proc.stderr


def test_sigkill_then_resume_is_bit_identical(tmp_path):
  steps = ["--steps", "600", "--checkpoint-every", "50"]
  _finish(steps + ["--checkpoint-dir", str(tmp_path / "a")])
  expected = checkpoint.digest(checkpoint.load_params(str(tmp_path / "a"), 600))

  seed = random.randrange(10**6)
  delay = random.Random(seed).uniform(0.0, 1.0)  # the run has ~3 s left after step 50
  proc = _start(steps + ["--checkpoint-dir", str(tmp_path / "b")])
  _wait_for(tmp_path / "b" / "50" / "meta", proc)
  time.sleep(delay)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  out = _finish(steps + ["--checkpoint-dir", str(tmp_path / "b"), "--resume"])
  assert "resumed from step" in out, out
  got = checkpoint.digest(checkpoint.load_params(str(tmp_path / "b"), 600))
  assert got == expected, f"kill after {delay:.2f}s (seed {seed}): digests differ"


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
  proc = _start(["--steps", "100000", "--checkpoint-every", "50", "--checkpoint-dir",
                 str(tmp_path)])
  _wait_for(tmp_path / "50" / "meta", proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  line = [l for l in out.splitlines() if l.startswith("stopped by SIGTERM")][0]
  step = int(line.split("after step ")[1].split(";")[0])
  assert f"saved checkpoint {step} in {tmp_path}" in line
  steps = [r["step"] for r in checkpoint.list_checkpoints(str(tmp_path))]
  assert steps[-1] == step and step > 50


def test_sigkill_during_an_async_save_keeps_the_previous_one(tmp_path):
  """Checkpoints of a 4M-parameter model are saved every step; the run is
  killed while a step directory is still being written."""
  proc = _start(["--steps", "100000", "--checkpoint-every", "1", "--keep", "2",
                 "--hidden", "2048,1024", "--checkpoint-dir", str(tmp_path)])
  _wait_for(tmp_path / "1" / "meta", proc)
  deadline = time.time() + 60
  while not any("tmp" in name for name in os.listdir(tmp_path)):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.001)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = [n for n in os.listdir(tmp_path) if "tmp" in n]
  complete = [r["step"] for r in checkpoint.list_checkpoints(str(tmp_path))]
  assert complete
  out = _finish(["--steps", str(max(complete) + 2), "--hidden", "2048,1024",
                 "--checkpoint-dir", str(tmp_path), "--resume"])
  assert f"resumed from step {max(complete)} of {tmp_path}" in out
  if partial:  # the kill landed mid-save (almost always): said so in one line
    assert "ignoring unfinished checkpoint" in out


def _config(tmp_path, mesh, steps, resume=False, every=10, **mesh_kw):
  return Config(
      mesh=mesh,
      model=ModelConfig(hidden=(64, 48, 32)),
      pipeline=PipelineConfig(schedule="1f1b", microbatches=4),
      checkpoint=CheckpointConfig(dir=str(tmp_path), every=every, resume=resume),
      train=TrainConfig(steps=steps, eval_every=0, log_every=1, progress=False,
                        metrics_file=str(tmp_path / "m.jsonl")),
  )


@pytest.mark.parametrize("new_mesh", [MeshConfig(data=2, stage=4), MeshConfig(data=8),
                                      MeshConfig(data=1, devices=1)])
def test_restore_on_another_mesh_continues_the_trajectory(tmp_path, new_mesh):
  first = MeshConfig(data=4, stage=2)
  whole = run(_config(tmp_path / "whole", first, 30), log=lambda _: None)
  run(_config(tmp_path / "part", first, 15), log=lambda _: None)
  messages = []
  resumed = run(_config(tmp_path / "part", new_mesh, 30, resume=True), log=messages.append)
  assert "resumed from step 15" in " ".join(messages)
  expected = [r["loss"] for r in whole.history if r["step"] > 15]
  got = [r["loss"] for r in resumed.history]
  assert [r["step"] for r in resumed.history] == list(range(16, 31))
  np.testing.assert_allclose(got, expected, rtol=2e-4)
  metrics = read_metrics(str(tmp_path / "part" / "m.jsonl"))
  assert [r["step"] for r in metrics] == list(range(1, 31))  # appended on resume


def test_model_mismatch_names_the_leaves(tmp_path):
  base = Config(checkpoint=CheckpointConfig(dir=str(tmp_path)),
                train=TrainConfig(steps=2, eval_every=0, progress=False))
  run(base, log=lambda _: None)
  other = Config(model=ModelConfig(hidden=(64, 128)),
                 checkpoint=CheckpointConfig(dir=str(tmp_path), resume=True),
                 train=TrainConfig(steps=4, eval_every=0, progress=False))
  with pytest.raises(meshnet.MeshnetError, match=r"does not fit this model: \[0\]\['b'\] "
                     r"saved \[256\] float32, expected \[64\] float32"):
    run(other, log=lambda _: None)


def test_corrupt_checkpoint_is_reported_and_skipped(tmp_path):
  config = Config(checkpoint=CheckpointConfig(dir=str(tmp_path), every=5),
                  train=TrainConfig(steps=10, eval_every=0, progress=False))
  run(config, log=lambda _: None)
  files = [os.path.join(root, f) for root, _, names in os.walk(tmp_path / "10" / "state")
           for f in names]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  messages = []
  resumed = run(Config(checkpoint=CheckpointConfig(dir=str(tmp_path), every=5, resume=True),
                       train=TrainConfig(steps=12, eval_every=0, progress=False)),
                log=messages.append)
  text = "\n".join(messages)
  assert "checkpoint step 10" in text and "corrupt" in text
  assert "resumed from step 5" in text
  assert int(resumed.state.step) == 12


def test_inspect_lists_tree_and_digest(tmp_path, capsys):
  result = run(Config(checkpoint=CheckpointConfig(dir=str(tmp_path), every=3),
                      train=TrainConfig(steps=6, eval_every=0, progress=False)),
               log=lambda _: None)
  assert meshnet.cli.main(["inspect", str(tmp_path), "--digest"]) == 0
  out = capsys.readouterr().out
  assert "2 checkpoints in" in out and "step        3" in out and "step        6" in out
  assert "[0]['w']                 (64, 256)" in out
  assert f"digest {checkpoint.digest(result.params)}" in out
  assert meshnet.cli.main(["inspect", str(tmp_path / "nothing")]) == 2
  assert "is not a directory" in capsys.readouterr().err
