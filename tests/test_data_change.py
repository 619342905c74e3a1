"""The data changing between a save and a resume (issue 12, part 5): each
checkpoint keeps a fingerprint of the data; a resume on other data is refused
unless allowed."""

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import meshnet
from meshnet.config import CheckpointConfig, Config, ModelConfig, TrainConfig
from meshnet.data import data_change, digits, fingerprint
from meshnet.errors import MeshnetError
from meshnet.train import run

ROOT = str(pathlib.Path(meshnet.__file__).resolve().parent.parent)
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, ENV.get("PYTHONPATH")]))
TRAIN = [sys.executable, "-m", "meshnet", "train", "--no-progress", "--eval-every", "0",
         "--devices", "1", "--hidden", "16"]


def test_fingerprint_names_the_split_and_what_changed():
  ds = digits()
  saved = fingerprint(ds)
  assert data_change(saved, fingerprint(digits())) is None  # loaded again: the same
  assert data_change(None, saved) is None  # a checkpoint without one: nothing to compare
  x = ds.x_train.copy()
  x[100, 5] += 1e-6  # one value, one ulp or so
  assert data_change(saved, fingerprint(dataclasses.replace(ds, x_train=x))) == (
      "training split: x_train has other contents (same shape [1438, 64] float32)")
  fewer = dataclasses.replace(ds, x_test=ds.x_test[:-1], y_test=ds.y_test[:-1])
  assert data_change(saved, fingerprint(fewer)) == (
      "test split: x_test [359, 64] float32 in the checkpoint, [358, 64] float32 now, "
      "y_test [359] int32 in the checkpoint, [358] int32 now")
  reordered = dataclasses.replace(ds, y_train=ds.y_train[::-1])  # a view: not contiguous
  assert "y_train has other contents" in data_change(saved, fingerprint(reordered))
  renamed = dataclasses.replace(ds, name="digits2")
  assert data_change(saved, fingerprint(renamed)) == (
      "data set 'digits' in the checkpoint, 'digits2' now")


def test_fingerprint_of_mnist_sized_arrays_is_cheap():
  rng = np.random.default_rng(0)
  ds = meshnet.Dataset("mnist", rng.random((60000, 784), np.float32),
                       rng.integers(0, 10, 60000).astype(np.int32),
                       rng.random((10000, 784), np.float32),
                       rng.integers(0, 10, 10000).astype(np.int32), "cross_entropy", 10)
  began = time.perf_counter()
  fingerprint(ds)
  seconds = time.perf_counter() - began
  # Against hashing the same bytes once, timed here: one pass over each
  # array, no copies, on whatever CPU this is (~0.12 s with SHA instructions).
  began = time.perf_counter()
  for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
    hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()
  once = time.perf_counter() - began
  assert seconds < 3 * once + 0.5, (seconds, once)


def _config(directory, steps, *, resume=False, allow=False):
  return Config(model=ModelConfig(hidden=(16,)),
                checkpoint=CheckpointConfig(dir=str(directory), every=4, resume=resume,
                                            allow_data_change=allow),
                train=TrainConfig(steps=steps, eval_every=0, progress=False))


def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path):
  ds = digits()
  run(_config(tmp_path, 8), dataset=ds, log=lambda _: None)
  meta = json.loads((tmp_path / "8" / "meta" / "metadata").read_text())
  assert meta["data"] == fingerprint(ds)

  x = ds.x_train.copy()
  x[0] = 1.0 - x[0]
  changed = dataclasses.replace(ds, x_train=x)
  with pytest.raises(MeshnetError, match=r"^the data changed since checkpoint 8 in .* was "
                     r"saved \(training split: x_train has other contents .*\); resume on the "
                     r"data it was saved with, or pass --allow-data-change"):
    run(_config(tmp_path, 12, resume=True), dataset=changed, log=lambda _: None)
  assert sorted(p for p in os.listdir(tmp_path) if p[0] != ".") == ["4", "8"]  # nothing moved

  messages = []
  result = run(_config(tmp_path, 12, resume=True, allow=True), dataset=changed,
               log=messages.append)
  said = [m for m in messages if "the data changed" in m]
  assert said == ["the data changed since checkpoint 8 was saved (training split: x_train "
                  "has other contents (same shape [1438, 64] float32)); continuing on this "
                  "data (--allow-data-change)"]
  assert "resumed from step 8" in " ".join(messages)
  assert int(result.state.step) == 12
  # The new checkpoints keep the new data's fingerprint: resuming on it is quiet.
  messages = []
  run(_config(tmp_path, 14, resume=True), dataset=changed, log=messages.append)
  assert not [m for m in messages if "the data changed" in m]


def test_a_checkpoint_without_a_fingerprint_resumes_as_before(tmp_path):
  ds = digits()
  run(_config(tmp_path, 4), dataset=ds, log=lambda _: None)
  path = tmp_path / "4" / "meta" / "metadata"
  meta = json.loads(path.read_text())
  del meta["data"]  # as an older meshnet saved it
  path.write_text(json.dumps(meta))
  changed = dataclasses.replace(ds, y_train=(ds.y_train + 1) % 10)
  messages = []
  result = run(_config(tmp_path, 6, resume=True), dataset=changed, log=messages.append)
  assert "resumed from step 4" in " ".join(messages)
  assert not [m for m in messages if "the data changed" in m]
  assert int(result.state.step) == 6


def _write_mnist(directory, n_train, seed=0):
  """The four IDX files of a small MNIST (uint8 images, 28x28)."""
  train, test = np.random.default_rng(seed), np.random.default_rng(99)  # the same test files
  arrays = {"train-images-idx3-ubyte": train.integers(0, 256, (n_train, 28, 28), np.uint8),
            "train-labels-idx1-ubyte": train.integers(0, 10, (n_train,), np.uint8),
            "t10k-images-idx3-ubyte": test.integers(0, 256, (16, 28, 28), np.uint8),
            "t10k-labels-idx1-ubyte": test.integers(0, 10, (16,), np.uint8)}
  for stem, array in arrays.items():
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(directory / f"{stem}.gz", "wb") as f:
      f.write(header + array.tobytes())


def _train(args):
  return subprocess.run(TRAIN + args, capture_output=True, text=True, env=ENV, timeout=300)


def test_cli_refuses_a_resume_after_the_data_files_changed(tmp_path):
  data, ckpt = tmp_path / "mnist", tmp_path / "ck"
  data.mkdir()
  _write_mnist(data, 64)
  flags = ["--dataset", "mnist", "--data-dir", str(data), "--batch-size", "16",
           "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
  proc = _train(flags + ["--steps", "4"])
  assert proc.returncode == 0, proc.stdout + proc.stderr

  _write_mnist(data, 48)  # the training files replaced by a smaller set
  proc = _train(flags + ["--steps", "6", "--resume"])
  assert proc.returncode == 2, proc.stdout + proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last == (
      f"meshnet: error: the data changed since checkpoint 4 in {ckpt} was saved (training "
      "split: x_train [64, 784] float32 in the checkpoint, [48, 784] float32 now, y_train "
      "[64] int32 in the checkpoint, [48] int32 now); resume on the data it was saved with, "
      "or pass --allow-data-change to continue on this data"), proc.stderr
  assert "Traceback" not in proc.stderr

  proc = _train(flags + ["--steps", "6", "--resume", "--allow-data-change"])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = proc.stdout + proc.stderr
  assert out.count("the data changed since checkpoint 4 was saved") == 1, out
  assert "continuing on this data (--allow-data-change)" in out
  assert "resumed from step 4" in out
