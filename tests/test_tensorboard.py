"""--tensorboard: event files read back with TensorBoard's own reader."""

import io
import json
import os
import shutil
import subprocess
import sys
import time

import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import meshnet
from meshnet import cli
from meshnet.config import (
    CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, PipelineConfig,
    TrainConfig,
)
from meshnet.metrics import read_metrics
from meshnet.pipeline import make_schedule
from meshnet.pipeline.timeline import image as timeline_image, text as timeline_text
from meshnet.tensorboard import TensorBoardWriter
from meshnet.train import run

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
TRAIN_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "samples_per_sec": "train/samples_per_sec", "epoch": "train/epoch"}
EVAL_TAGS = {"eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy"}


def _events(logdir, purge=True) -> EventAccumulator:
  events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0,
                                                        "tensors": 0},
                            purge_orphaned_data=purge)
  events.Reload()
  return events


def _scalars(events, tag) -> dict[int, float]:
  points = events.Scalars(tag)
  steps = [p.step for p in points]
  assert len(steps) == len(set(steps)), (tag, steps)  # every step once
  return {p.step: p.value for p in points}


def _text(events, name) -> str:
  (entry,) = events.Tensors(f"{name}/text_summary")
  return entry.tensor_proto.string_val[0].decode()


def _assert_matches(events, records, tags):
  """The scalars of ``tags`` are exactly ``records``' values at their steps."""
  for field, tag in tags.items():
    expected = {r["step"]: r[field] for r in records if field in r}
    got = _scalars(events, tag)
    assert sorted(got) == sorted(expected), (tag, sorted(got), sorted(expected))
    for step, value in expected.items():  # event files hold float32
      assert got[step] == pytest.approx(np.float32(value), rel=1e-6), (tag, step)


def test_event_files_hold_the_runs_metrics_at_their_steps(tmp_path):
  config = Config(
      mesh=MeshConfig(data=4, devices=4),
      train=TrainConfig(steps=20, log_every=5, eval_every=10, progress=False,
                        metrics_file=str(tmp_path / "m.jsonl"),
                        tensorboard=str(tmp_path / "tb")),
  )
  result = run(config, log=lambda _: None)
  records = read_metrics(str(tmp_path / "m.jsonl"))
  events = _events(tmp_path / "tb")

  _assert_matches(events, [r for r in records if "loss" in r], TRAIN_TAGS)
  _assert_matches(events, [r for r in records if "eval_loss" in r], EVAL_TAGS)
  assert sorted(_scalars(events, "train/loss")) == [5, 10, 15, 20]
  assert sorted(_scalars(events, "eval/accuracy")) == [10, 20]
  assert _scalars(events, "eval/accuracy")[20] == pytest.approx(
      result.eval["eval_accuracy"], rel=1e-6)

  mesh = _text(events, "run/mesh")
  assert mesh.lstrip().startswith("mesh data=4 fsdp=1 stage=1 tensor=1: 4 cpu devices")
  config_text = "\n".join(line[4:] for line in _text(events, "run/config").splitlines())
  saved = json.loads(config_text)  # the run's settings, defaults resolved
  resolved, _ = meshnet.resolve_defaults(config, meshnet.load_dataset("digits"), 4)
  assert saved == json.loads(json.dumps(resolved.to_dict()))
  assert saved["model"]["hidden"] == [256, 128] and saved["data"]["batch_size"] == 128
  assert saved["train"]["tensorboard"] == str(tmp_path / "tb")
  assert events.Tags()["images"] == []  # no stage axis, no timeline


def test_a_pipelined_run_shows_its_timeline_picture(tmp_path):
  config = Config(
      mesh=MeshConfig(data=1, stage=2, devices=2),
      model=ModelConfig(hidden=(16, 8)),
      data=DataConfig(batch_size=32),
      pipeline=PipelineConfig(schedule="gpipe", microbatches=4),
      train=TrainConfig(steps=2, log_every=1, eval_every=0, progress=False,
                        tensorboard=str(tmp_path / "tb")),
  )
  run(config, log=lambda _: None)
  events = _events(tmp_path / "tb")
  (picture,) = events.Images("pipeline/timeline")
  pixels = matplotlib.image.imread(io.BytesIO(picture.encoded_image_string))
  expected = timeline_image(make_schedule("gpipe", 2, 4))
  assert (picture.height, picture.width) == expected.shape[:2]
  np.testing.assert_array_equal(np.round(pixels[..., :3] * 255).astype(np.uint8), expected)
  schedule_text = "\n".join(line[4:] for line in
                            _text(events, "pipeline/schedule").splitlines())
  assert schedule_text == timeline_text(make_schedule("gpipe", 2, 4))
  assert sorted(_scalars(events, "train/loss")) == [1, 2]


def _resumable(tmp_path, steps, lr, resume=False):
  return Config(
      mesh=MeshConfig(data=4, devices=4),
      model=ModelConfig(hidden=(32,)),
      optim=OptimConfig(lr=lr),
      checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), every=10, resume=resume),
      train=TrainConfig(steps=steps, log_every=5, eval_every=10, progress=False,
                        metrics_file=str(tmp_path / "m.jsonl"),
                        tensorboard=str(tmp_path / "tb")),
  )


def test_a_resumed_run_continues_the_same_curves(tmp_path):
  first = run(_resumable(tmp_path, 20, lr=1e-3), log=lambda _: None)
  # As if stopped after logging step 20 but before its checkpoint was on disk.
  shutil.rmtree(tmp_path / "ckpt" / "20")
  messages = []
  second = run(_resumable(tmp_path, 30, lr=3e-3, resume=True), log=messages.append)

  assert "restoring checkpoint 10 " in "\n".join(messages)
  assert any(m.startswith("restored checkpoint 10 in ") for m in messages), messages
  first_loss = {r["step"]: r["loss"] for r in first.history if "loss" in r}
  second_loss = {r["step"]: r["loss"] for r in second.history if "loss" in r}
  assert sorted(second_loss) == [15, 20, 25, 30]
  assert second_loss[15] != pytest.approx(first_loss[15])  # another lr: other values

  expected = [r for r in first.history if r["step"] <= 10] + second.history
  # Both with TensorBoard's purge of orphaned steps and without it: the
  # earlier file itself no longer holds steps 15 and 20 of the first run.
  for purge in (True, False):
    events = _events(tmp_path / "tb", purge=purge)
    _assert_matches(events, [r for r in expected if "loss" in r], TRAIN_TAGS)
    _assert_matches(events, [r for r in expected if "eval_loss" in r], EVAL_TAGS)
    assert sorted(_scalars(events, "train/loss")) == [5, 10, 15, 20, 25, 30]
  in_file = [{k: v for k, v in r.items() if k != "time"}
             for r in read_metrics(str(tmp_path / "m.jsonl")) if "kind" not in r]
  assert in_file == expected  # the metrics file tells the same story


def test_values_reach_the_disk_while_the_writer_is_open(tmp_path):
  """What makes `tensorboard --logdir` show a run live: no close needed."""
  with TensorBoardWriter(str(tmp_path)) as board:
    board.write({"step": 3, "loss": 0.25, "eval_accuracy": 0.5, "time": time.time()})
    deadline = time.time() + 10
    while True:
      events = _events(tmp_path)
      if "train/loss" in events.Tags()["scalars"] or time.time() > deadline:
        break
      time.sleep(0.2)
    assert _scalars(events, "train/loss") == {3: 0.25}
    assert _scalars(events, "eval/accuracy") == {3: 0.5}


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p / "file", "is a file; give a directory"),
    (lambda p: p / "file" / "tb", "is a file, not a directory"),
    (lambda p: "/proc/meshnet-tb", "TensorBoard directory /proc/meshnet-tb"),
])
def test_a_bad_directory_is_one_line_before_training(tmp_path, capsys, make_bad, message):
  (tmp_path / "file").write_text("x")
  bad = str(make_bad(tmp_path))
  assert cli.main(["train", "--tensorboard", bad, "--steps", "2"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("meshnet: error: ") and message in err, err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert "compiled" not in err and "mesh data" not in err  # before any work


def test_meshnet_train_tensorboard_then_plot(tmp_path):
  """The command as a user runs it: events and a metrics file, then a plot."""
  metrics, logdir, picture = tmp_path / "m.jsonl", tmp_path / "tb", tmp_path / "loss.png"
  proc = subprocess.run(
      [sys.executable, "-m", "meshnet", "train", "--devices", "4", "--steps", "20",
       "--log-every", "5", "--eval-every", "10", "--metrics-file", str(metrics),
       "--tensorboard", str(logdir)],
      capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert f"TensorBoard events written to {logdir}" in proc.stderr
  records = read_metrics(str(metrics))
  events = _events(logdir)
  _assert_matches(events, [r for r in records if "loss" in r], TRAIN_TAGS)
  _assert_matches(events, [r for r in records if "eval_loss" in r], EVAL_TAGS)

  proc = subprocess.run([sys.executable, "-m", "meshnet", "plot", str(metrics), "-o",
                         str(picture)], capture_output=True, text=True, env=ENV, timeout=120)
  assert proc.returncode == 0, proc.stderr
  pixels = matplotlib.image.imread(str(picture))
  assert pixels.shape[:2] == (400, 1100) and pixels[..., :3].std() > 0.05


def test_a_tilde_directory_is_under_home_not_a_folder_named_tilde(tmp_path, monkeypatch):
  home, cwd = tmp_path / "home", tmp_path / "cwd"
  home.mkdir()
  cwd.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(cwd)
  with TensorBoardWriter("~/runs/a") as board:
    board.write({"step": 1, "loss": 0.5})
  assert not (cwd / "~").exists()
  assert _scalars(_events(home / "runs" / "a"), "train/loss") == {1: 0.5}


def test_replace_drops_an_earlier_runs_curves_and_a_second_writer_keeps_them(tmp_path):
  with TensorBoardWriter(str(tmp_path)) as board:
    board.write({"step": 1, "loss": 2.0})
    board.write({"step": 2, "loss": 1.0})
    board.text("run/config", "first")
  with TensorBoardWriter(str(tmp_path)) as board:  # default: keeps what is there
    board.write({"step": 3, "eval_loss": 0.9})
  assert _scalars(_events(tmp_path), "train/loss") == {1: 2.0, 2: 1.0}
  (tmp_path / "sub").mkdir()  # another run's directory below: left alone
  with TensorBoardWriter(str(tmp_path / "sub")) as board:
    board.write({"step": 1, "loss": 7.0})
  time.sleep(0.01)
  with TensorBoardWriter(str(tmp_path), replace=True) as board:
    board.write({"step": 1, "loss": 3.0})
    board.text("run/config", "second")
  events = _events(tmp_path)
  assert _scalars(events, "train/loss") == {1: 3.0}
  assert "eval/loss" not in events.Tags()["scalars"]
  assert _text(events, "run/config").strip() == "second"
  assert _scalars(_events(tmp_path / "sub"), "train/loss") == {1: 7.0}
