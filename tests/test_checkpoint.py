"""Checkpoints: resume bit-for-bit, restore on other meshes, survive kills."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import meshnet
from meshnet import checkpoint
from meshnet.config import (
    CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, PipelineConfig,
    TrainConfig,
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
  metrics = [r for r in read_metrics(str(tmp_path / "part" / "m.jsonl")) if "kind" not in r]
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
  for name in os.listdir(tmp_path / "10" / "state" / "d"):  # the OCDBT data files
    os.truncate(tmp_path / "10" / "state" / "d" / name, 10)
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


# Issue 9 ("Trust first"), the checkpoint part.

def _small(directory, steps, *, every=0, keep=3, resume=False, overwrite=False, seed=0,
           optim=OptimConfig(), metrics=None, batch_size=128):
  return Config(
      model=ModelConfig(hidden=(32,)), optim=optim, data=DataConfig(batch_size=batch_size),
      checkpoint=CheckpointConfig(dir=str(directory), every=every, keep=keep, resume=resume,
                                  overwrite=overwrite),
      train=TrainConfig(steps=steps, eval_every=0, log_every=1, progress=False, seed=seed,
                        metrics_file=metrics))


def _steps(directory):
  return [r["step"] for r in checkpoint.list_checkpoints(str(directory))]


def _entries(directory):
  return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def test_a_second_run_without_resume_is_refused_and_overwrite_replaces(tmp_path):
  first = run(_small(tmp_path, 6, every=3), log=lambda _: None)
  with pytest.raises(meshnet.MeshnetError, match=r"already holds checkpoints \(steps 3, 6\); "
                     r"continue them with --resume.*--overwrite"):
    run(_small(tmp_path, 4, every=2, seed=1), log=lambda _: None)
  assert _steps(tmp_path) == [3, 6]
  assert checkpoint.digest(checkpoint.load_params(str(tmp_path), 6)) == checkpoint.digest(
      first.params)
  messages = []
  second = run(_small(tmp_path, 4, every=2, seed=1, overwrite=True), log=messages.append)
  assert _steps(tmp_path) == [2, 4]  # the old run's steps are gone, the new ones all written
  assert checkpoint.digest(checkpoint.load_params(str(tmp_path), 4)) == checkpoint.digest(
      second.params)
  assert any("deleted the earlier checkpoints 3, 6" in m for m in messages), messages


def test_an_error_while_a_save_is_in_flight_keeps_that_save(tmp_path):
  """The final evaluation fails as it is traced, right after the final save
  started; the process then exits: the save must be complete (it was left
  as 10.orbax-checkpoint-tmp with Orbax tracebacks)."""
  script = textwrap.dedent(f"""
      import meshnet
      from meshnet.config import CheckpointConfig, Config, TrainConfig
      from meshnet.train import run
      mlp = meshnet.models.mlp([64, 512, 512, 10])
      def apply(params, x, *, train=False, key=None):
        if not train and x.shape[0] > 128:  # the evaluation batch
          raise RuntimeError("the final evaluation failed")
        return mlp.apply(params, x, train=train, key=key)
      run(Config(checkpoint=CheckpointConfig(dir={str(tmp_path)!r}, every=5),
                 train=TrainConfig(steps=10, eval_every=10, progress=False)),
          model=meshnet.Model(mlp.init, apply), log=print)
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=ENV, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1 and "RuntimeError: the final evaluation failed" in out, out
  assert "Event loop is closed" not in out and out.count("Traceback") == 1, out
  assert _entries(tmp_path) == ["10", "5"]  # no 10.orbax-checkpoint-tmp
  assert _steps(tmp_path) == [5, 10]


def test_a_nan_stop_finishes_the_good_save_and_saves_no_nan(tmp_path):
  with pytest.raises(meshnet.NonFiniteLossError) as error:
    run(_small(tmp_path, 20, every=1, optim=OptimConfig(optimizer="sgd", lr=1e30)),
        log=lambda _: None)
  bad = error.value.step
  assert not any("tmp" in name for name in os.listdir(tmp_path))
  assert _steps(tmp_path)[-1] == bad - 1
  params = checkpoint.load_params(str(tmp_path), bad - 1)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("change, message", [
    ({"optim": OptimConfig(optimizer="sgd")},
     r'optim.optimizer "adam" in the checkpoint, "sgd" now'),
    ({"seed": 1, "batch_size": 64},
     r'train.seed 0 in the checkpoint, 1 now; data.batch_size 128 in the checkpoint, 64 now'),
    ({"optim": OptimConfig(clip_norm=1.0)},
     r"optimizer state of another structure \(optim.clip_norm null in the checkpoint, "
     r"1.0 now\)"),
])
def test_resume_of_another_run_names_the_fields_and_deletes_nothing(tmp_path, change, message):
  run(_small(tmp_path, 4, every=2, keep=2), log=lambda _: None)
  before = checkpoint.digest(checkpoint.load_params(str(tmp_path), 4))
  with pytest.raises(meshnet.MeshnetError, match=rf"checkpoint 4 in {tmp_path} .*{message}"):
    run(_small(tmp_path, 8, every=2, keep=2, resume=True, **change), log=lambda _: None)
  assert _entries(tmp_path) == ["2", "4"]
  assert checkpoint.digest(checkpoint.load_params(str(tmp_path), 4)) == before


def test_resume_may_change_the_run_length_and_learning_rate(tmp_path):
  run(_small(tmp_path, 4, every=2), log=lambda _: None)
  messages = []
  run(_small(tmp_path, 6, every=2, resume=True, optim=OptimConfig(lr=3e-3)),
      log=messages.append)
  assert "resumed from step 4" in " ".join(messages)
  assert _steps(tmp_path) == [2, 4, 6]


def test_truncated_and_junk_steps_are_set_aside_not_counted_or_deleted(tmp_path):
  run(_small(tmp_path, 10, every=5), log=lambda _: None)
  for name in os.listdir(tmp_path / "10" / "state" / "d"):  # the OCDBT data files
    os.truncate(tmp_path / "10" / "state" / "d" / name, 10)
  os.mkdir(tmp_path / "12")  # junk: an empty step directory
  messages = []
  run(_small(tmp_path, 15, every=5, resume=True), log=messages.append)
  text = "\n".join(messages)
  assert "checkpoint step 12" in text and "moved to 12.corrupt" in text
  assert "checkpoint step 10" in text and "corrupt (" in text and "moved to 10.corrupt" in text
  assert "resumed from step 5" in text
  assert _entries(tmp_path) == ["10", "10.corrupt", "12.corrupt", "15", "5"]
  checkpoint.load_params(str(tmp_path), 10)  # the new step 10 was written (not skipped)


def _spoil_meta(step_dir, how):
  path = step_dir / "meta" / "metadata"
  if how == "garbage":
    path.write_text("{not json")
  else:
    meta = json.loads(path.read_text())
    del meta[how]
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["garbage", "sampler"])
def test_unreadable_meta_falls_back_to_the_previous_step(tmp_path, how):
  run(_small(tmp_path, 4, every=2), log=lambda _: None)
  _spoil_meta(tmp_path / "4", how)
  messages = []
  run(_small(tmp_path, 6, every=2, resume=True), log=messages.append)
  text = "\n".join(messages)
  assert "checkpoint step 4" in text and "meta of step 4" in text and "4.corrupt" in text
  assert "resumed from step 2" in text


def test_inspect_skips_an_unreadable_meta_in_one_line(tmp_path, capsys):
  run(_small(tmp_path, 4, every=2), log=lambda _: None)
  _spoil_meta(tmp_path / "4", "garbage")
  assert meshnet.cli.main(["inspect", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "skipping meta of step 4 is unreadable (JSONDecodeError" in out, out
  assert "showing step 2" in out and "parameters of step 2" in out


def test_a_second_writer_is_stopped_in_one_line(tmp_path):
  holder = checkpoint.Checkpointer(str(tmp_path), log=lambda _: None)
  try:
    proc = subprocess.run(TRAIN + ["--steps", "2", "--checkpoint-dir", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
  finally:
    holder.close()
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert proc.stderr.splitlines()[-1] == (
      f"meshnet: error: checkpoint directory {tmp_path} is in use by another run (pid "
      f"{os.getpid()} on {socket.gethostname()}); wait for it to end or choose "
      "another --checkpoint-dir")
  assert _entries(tmp_path) == []
  checkpoint.Checkpointer(str(tmp_path), log=lambda _: None).close()  # free again


def test_checkpoint_urls_reach_orbax_untouched(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  url = checkpoint.checkpoint_path("gs://bucket/x")
  assert str(url) == "gs://bucket/x" and str(url / "5") == "gs://bucket/x/5"
  assert str(checkpoint.checkpoint_path("runs/ck")) == str(tmp_path / "runs" / "ck")
  try:
    import gcsfs  # noqa: F401
  except ImportError:  # no client for gs:// here: the URL must fail as a URL, not a local dir
    with pytest.raises(meshnet.MeshnetError, match="checkpoint directory gs://bucket/x"):
      run(_small("gs://bucket/x", 2), log=lambda _: None)
  assert os.listdir(tmp_path) == []  # no ./gs:/bucket/x


def test_metrics_after_a_resume_hold_every_step_once(tmp_path):
  metrics = str(tmp_path / "m.jsonl")
  ckpt = tmp_path / "ck"
  run(_small(ckpt, 14, every=5, metrics=metrics), log=lambda _: None)
  shutil.rmtree(ckpt / "14")  # as if killed after step 14 was logged, before its save
  run(_small(ckpt, 14, every=5, resume=True, metrics=metrics), log=lambda _: None)
  # Each run's record first, then its steps (the resumed run's from step 11).
  assert [r.get("kind", r.get("step")) for r in read_metrics(metrics)] == [
      "run", *range(1, 11), "run", *range(11, 15)]


def test_restore_errors_print_no_event_loop_tracebacks(tmp_path):
  _finish(["--steps", "4", "--checkpoint-every", "2", "--checkpoint-dir", str(tmp_path)])
  for name in os.listdir(tmp_path / "4" / "state" / "d"):  # the OCDBT data outside the shards
    os.truncate(tmp_path / "4" / "state" / "d" / name, 10)
  out = _finish(["--steps", "6", "--checkpoint-dir", str(tmp_path), "--resume"])
  assert "resumed from step 2" in out and "moved to 4.corrupt" in out, out
  assert "Traceback" not in out and "Event loop is closed" not in out, out


def test_reads_left_unretrieved_by_a_failed_restore_are_not_logged(tmp_path):
  """A failed restore raises its first failed read; asyncio logs the others
  ("Task exception was never retrieved", with a traceback) when they are
  collected, which may be after the restore returned. CI once caught one."""
  import asyncio
  import gc
  import logging

  from orbax.checkpoint._src.serialization import serialization

  with checkpoint._quiet_closed_event_loop():  # installs the filters once
    pass
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logging.getLogger().addHandler(handler)

  async def plain_failure():
    raise ValueError("not a read")

  def leave_unretrieved(coro):
    loop = asyncio.new_event_loop()
    task = loop.create_task(coro)
    loop.run_until_complete(asyncio.wait([task]))  # waits, never retrieves
    assert task.done() and not task.cancelled()
    loop.close()
    del task
    gc.collect()

  try:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    missing = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "x")}}
    leave_unretrieved(serialization.async_deserialize(sharding, missing))
    assert [r.getMessage() for r in records] == []
    leave_unretrieved(plain_failure())  # anyone else's lost error still shows
    assert len(records) == 1 and "exception was never retrieved" in records[0].getMessage()
    assert str(records[0].exc_info[1]) == "not a read"
  finally:
    logging.getLogger().removeHandler(handler)


def test_sigterm_without_a_checkpoint_dir_says_so(tmp_path):
  proc = _start(["--steps", "1000000"])
  for line in proc.stdout:
    if line.startswith("compiled the train step"):
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert out.splitlines()[-1] == "meshnet: terminated (SIGTERM)" and "Traceback" not in out


def test_sigterm_while_compiling_exits_143_not_a_crash(tmp_path):
  proc = _start(["--steps", "1000000", "--hidden", "1024,1024"])
  for line in proc.stdout:
    if line.startswith("model:"):
      break
  time.sleep(0.3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert out.splitlines()[-1] == "meshnet: terminated (SIGTERM)", out


def test_signals_during_a_restore_are_delivered_after_it():
  """An interrupt inside Orbax's reads would come out as a plain Exception
  and make a good step look corrupt; signals wait until the read is done."""
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, _: received.append(signum))
  try:
    with checkpoint._deferred_signals():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)
      assert received == []
    assert received == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_a_kill_during_the_first_overwriting_save_loses_nothing(tmp_path):
  """--overwrite renames the old steps aside, saves, waits for the save, and
  only then deletes them: whenever the run is killed, a complete checkpoint
  remains (the old code deleted first, and a kill in the save lost both)."""
  big = ["--hidden", "1024,1024", "--steps", "4", "--checkpoint-every", "2",
         "--checkpoint-dir", str(tmp_path)]
  _finish(big)
  proc = _start(big + ["--overwrite", "--seed", "1"])
  deadline = time.time() + 120
  while (tmp_path / "4").exists():
    assert proc.poll() is None or proc.returncode == 0
    assert time.time() < deadline
    time.sleep(0.001)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  complete = [p.name for p in tmp_path.iterdir()
              if (p / "meta" / "metadata").exists() and (p / "state").is_dir()]
  assert complete, sorted(os.listdir(tmp_path))

