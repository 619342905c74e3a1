"""Bad input stops before any work with one line naming the value and the fix.

One table holds every case: a ``meshnet train`` command line (run in-process
with ``cli.main``, or as a real process where JAX must not have started), or
a Python call. A command must exit 2 with exactly one line on stderr,
``meshnet: error: ...``, and no traceback; a Python call must raise the
:class:`MeshnetError` that the command turns into that line (not a
:class:`NonFiniteLossError`, which exits 1).
"""

import gzip
import os
import struct
import subprocess
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshnet
from meshnet import cli
from meshnet.config import (
    CheckpointConfig, Config, DataConfig, ModelConfig, PipelineConfig, TrainConfig,
)
from meshnet.data import load_dataset
from meshnet.train import run

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C,
             np.dtype(np.float32): 0x0D}


def _write_idx(path, array: np.ndarray) -> None:
  """Writes ``array`` as a real IDX file (gzip if ``path`` ends in .gz)."""
  header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim])
  header += struct.pack(f">{array.ndim}I", *array.shape)
  data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
    f.write(data)


def _mnist_files(directory, **replace: np.ndarray) -> dict[str, np.ndarray]:
  """Writes the four MNIST files (12 train, 5 test examples) to ``directory``.

  ``replace`` swaps in an array by key (``x_train``, ``y_train``, ``x_test``,
  ``y_test``).
  """
  rng = np.random.default_rng(0)
  arrays = {
      "x_train": rng.integers(0, 256, (12, 28, 28), np.uint8),
      "y_train": rng.integers(0, 10, (12,), np.uint8),
      "x_test": rng.integers(0, 256, (5, 28, 28), np.uint8),
      "y_test": rng.integers(0, 10, (5,), np.uint8),
  }
  arrays.update(replace)
  for key, stem in meshnet.data.MNIST_FILES.items():
    _write_idx(directory / (stem + ".gz"), arrays[key])
  return arrays


# Each row's first entry turns tmp_path into what to run: a list (argv of
# `meshnet train`, in-process), a Command (argv, in a fresh process) or a
# callable (a Python call).


class Command(NamedTuple):
  argv: list[str]


def train(*argv: str) -> Callable[[Any], list[str]]:
  return lambda tmp_path: ["train", "--no-progress", "--steps", "2", *argv]


def command(*argv: str) -> Callable[[Any], Command]:
  return lambda tmp_path: Command(["train", "--no-progress", "--steps", "2", *argv])


def python(fn: Callable[[], Any]) -> Callable[[Any], Callable[[], Any]]:
  return lambda tmp_path: fn


def mnist(**replace: np.ndarray) -> Callable[[Any], list[str]]:
  def argv(tmp_path):
    _mnist_files(tmp_path, **replace)
    return ["train", "--no-progress", "--steps", "2", "--batch-size", "8",
            "--dataset", "mnist", "--data-dir", str(tmp_path)]
  return argv


def mnist_bytes(key: str, data: bytes) -> Callable[[Any], list[str]]:
  def argv(tmp_path):
    _mnist_files(tmp_path)
    stem = meshnet.data.MNIST_FILES[key]
    (tmp_path / (stem + ".gz")).unlink()
    (tmp_path / stem).write_bytes(data)
    return ["train", "--no-progress", "--dataset", "mnist", "--data-dir", str(tmp_path)]
  return argv


def _small_dataset(x_test_features=4, label=None) -> meshnet.Dataset:
  rng = np.random.default_rng(0)
  y_train = rng.integers(0, 3, (16,)).astype(np.int32)
  if label is not None:
    y_train[5] = label
  return meshnet.Dataset(
      "small", rng.normal(size=(16, 4)).astype(np.float32), y_train,
      rng.normal(size=(8, x_test_features)).astype(np.float32),
      rng.integers(0, 3, (8,)).astype(np.int32), "cross_entropy", 3)


def _run(dataset=None, model=None):
  config = Config(data=DataConfig(batch_size=8),
                  train=TrainConfig(steps=2, eval_every=2, progress=False))
  return run(config, model=model, dataset=dataset, log=lambda _: None)


def _wrong_input_model() -> meshnet.Model:
  return meshnet.Model(lambda key: {"w": jnp.zeros((784, 10))},
                       lambda params, x: x @ params["w"])


def _devices(*ids: int) -> list[jax.Device]:
  return [jax.devices()[i] for i in ids]


CASES = [
    # Silent mismatches (issue 9, item 5).
    (train("--microbatches", "0"), "pipeline.microbatches=0 must be an integer >= 1"),
    (train("--schedule", "foo"), "unknown schedule 'foo'; choose one of gpipe, 1f1b"),
    (train("--mesh", "data=4,data=8"), "mesh axis data is given twice in 'data=4,data=8'"),
    (train("--checkpoint-every", "-2"), "checkpoint.every=-2 must be an integer >= 0"),
    (train("--momentum", "1.5"), "optim.momentum=1.5 must be a finite number in [0, 1)"),
    (train("--momentum", "-0.5"), "optim.momentum=-0.5 must be a finite number in [0, 1)"),
    (train("--resume"),
     "checkpoint.resume needs checkpoint.dir to resume from; pass --checkpoint-dir"),
    (mnist(y_train=np.array([1, 2, 3, 12, 4, 5, 6, 7, 8, 9, 0, 1], np.uint8)),
     "train-labels-idx1-ubyte.gz has label 12 (example 3); MNIST labels must be "
     "integers in [0, 10)"),
    (python(lambda: _run(dataset=_small_dataset(label=3))),
     "dataset small: label 3 in y_train (example 5) is not a class in [0, 3)"),
    (python(lambda: _run(dataset=_small_dataset(label=-1))),
     "dataset small: label -1 in y_train (example 5) is not a class in [0, 3)"),
    (python(lambda: _run(model=meshnet.models.mlp([64, 5]))),
     "the model maps a batch of shape (1, 64) to (1, 5) but dataset digits "
     "(cross_entropy) needs (1, 10); build the model with 10 outputs"),
    (python(lambda: _run(model=_wrong_input_model())),
     "the model cannot take a batch of shape (1, 64) from dataset digits: dot_general"),
    (python(lambda: meshnet.make_mesh(devices=[])), "make_mesh got devices=[]"),
    (python(lambda: meshnet.make_mesh(devices=_devices(0, 1, 2, 0))),
     "make_mesh got device cpu:0 twice in devices=; pass each device once"),
    # Tracebacks (issue 9, item 12).
    (train("--devices", "0"), "mesh.devices=0 must be an integer >= 1"),
    (train("--devices", "-3"), "mesh.devices=-3 must be an integer >= 1"),
    (command("--devices", "0"), "mesh.devices=0 must be an integer >= 1"),
    (train("--virtual-stages", "0"), "pipeline.virtual_stages=0 must be an integer >= 1"),
    (train("--virtual-stages", "-1"), "pipeline.virtual_stages=-1 must be an integer >= 1"),
    (train("--eval-batch-size", "0"), "train.eval_batch_size=0 must be an integer >= 1"),
    (train("--eval-batch-size", "-4"), "train.eval_batch_size=-4 must be an integer >= 1"),
    (train("--seed", "-1"), "train.seed=-1 must be an integer in [0, 2**63)"),
    (train("--lr", "nan"), "optim.lr=nan must be a finite number > 0"),
    (train("--lr", "inf"), "optim.lr=inf must be a finite number > 0"),
    (train("--clip-norm", "nan"), "optim.clip_norm=nan must be a finite number > 0"),
    (mnist_bytes("x_train", b"\x00\x00\x08\x03\x00\x00"),
     "train-images-idx3-ubyte is 6 bytes but its IDX header for 3 dimensions needs 16"),
    (mnist(x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros((0,), np.uint8)),
     "train-images-idx3-ubyte.gz holds no examples (shape (0, 28, 28))"),
    (mnist(y_test=np.zeros((5, 28, 28), np.uint8)),
     "t10k-labels-idx1-ubyte.gz holds an array of shape (5, 28, 28), not labels [N]"),
    (mnist(x_test=np.zeros((5, 32, 32), np.uint8)),
     "t10k-images-idx3-ubyte.gz holds images of size (32, 32) but"),
    (python(lambda: meshnet.make_mesh(data=None)),
     "mesh axis size data=None must be an integer >= 1, or -1 for the rest"),
    (python(lambda: meshnet.make_mesh(data=2.5)),
     "mesh axis size data=2.5 must be an integer"),
    (python(lambda: meshnet.make_mesh(data=True, devices=_devices(0))),
     "mesh axis size data=True must be an integer"),
    (python(lambda: _run(dataset=_small_dataset(x_test_features=3))),
     "dataset small: x_test has examples of shape (3,) but x_train (4,)"),
    # The other numeric flags.
    (train("--batch-size", "0"), "data.batch_size=0 must be an integer >= 1"),
    (train("--grad-accum", "0"), "optim.grad_accum=0 must be an integer >= 1"),
    (train("--keep", "0"), "checkpoint.keep=0 must be an integer >= 1"),
    (train("--warmup-steps", "-1"), "optim.warmup_steps=-1 must be an integer >= 0"),
    (train("--log-every", "0"), "train.log_every=0 must be an integer >= 1"),
    (train("--eval-every", "-1"), "train.eval_every=-1 must be an integer >= 0"),
    (train("--dropout", "1.5"), "model.dropout=1.5 must be a finite number in [0, 1)"),
    (train("--weight-decay", "-1"), "optim.weight_decay=-1.0 must be a finite number >= 0"),
    (train("--hidden", "0"), "model.hidden=(0,) must be widths >= 1"),
    (train("--steps", "0"), "train.steps=0 must be an integer >= 1"),
    (train("--steps", "none", "--epochs", "0"), "train.epochs=0 must be an integer >= 1"),
    (python(lambda: TrainConfig(steps=0)), "train.steps=0 must be an integer >= 1"),
    (python(lambda: PipelineConfig(microbatches=0)), "pipeline.microbatches=0 must be"),
]


@pytest.mark.parametrize("case, message", CASES,
                         ids=[f"{i}-{m.split()[0]}" for i, (_, m) in enumerate(CASES)])
def test_bad_input_is_one_line_before_any_work(case, message, tmp_path, capsys):
  what = case(tmp_path)
  if callable(what):
    with pytest.raises(meshnet.MeshnetError) as info:
      what()
    assert not isinstance(info.value, FloatingPointError)  # those exit 1
    err = f"meshnet: error: {info.value}\n"
  elif isinstance(what, Command):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "meshnet", *what.argv], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
  else:
    assert cli.main(what) == 2
    err = capsys.readouterr().err
  assert err.startswith("meshnet: error: "), err
  assert message in err, err
  assert err.count("\n") == 1 and "Traceback" not in err, err


def test_float_idx_images_are_used_as_they_are(tmp_path):
  """Only uint8 images are scaled by 1/255; float32 ones are kept as stored."""
  rng = np.random.default_rng(1)
  images = rng.normal(size=(12, 28, 28)).astype(np.float32)
  _mnist_files(tmp_path, x_train=images)
  ds = load_dataset("mnist", str(tmp_path))
  np.testing.assert_array_equal(ds.x_train, images.reshape(12, 784))
  assert ds.x_train.dtype == np.float32
  assert ds.x_test.max() <= 1.0  # the uint8 test images are still scaled


# Checkpoint directories and metrics files: each as a real `meshnet` process.
CHECKPOINT_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("saved")
  config = Config(model=ModelConfig(hidden=(32,)),
                  checkpoint=CheckpointConfig(dir=str(directory), every=1),
                  train=TrainConfig(steps=2, eval_every=0, progress=False))
  run(config, log=lambda _: None)
  return directory


@pytest.mark.parametrize("argv, message", [
    (["train", "--metrics-file", "{tmp}"], "metrics file {tmp} is a directory"),
    (["train", "--metrics-file", "{tmp}/" + "m" * 300], "cannot be opened for writing"),
    (["train", "--metrics-file", "{tmp}/file/m.jsonl"],
     "metrics file {tmp}/file/m.jsonl cannot be created: {tmp}/file is a file"),
    (["train", "--checkpoint-dir", "{saved}", "--hidden", "32"],
     "already holds checkpoints (steps 1, 2)"),
    (["train", "--checkpoint-dir", "{saved}", "--hidden", "32", "--resume", "--optimizer",
      "sgd"], 'optim.optimizer "adam" in the checkpoint, "sgd" now'),
    (["train", "--checkpoint-dir", "{saved}", "--resume", "--overwrite"],
     "exclude each other"),
    (["train", "--checkpoint-dir", "{tmp}/file"], "{tmp}/file is a file"),
    (["inspect", "{tmp}/garbage"], "no readable checkpoint in {tmp}/garbage: meta of step 3"),
    (["train", "--checkpoint-dir", "gs://bucket/x"], "checkpoint directory gs://bucket/x"),
    (["inspect", "gs://bucket/x"], "gs://bucket/x"),
])
def test_bad_checkpoint_input_is_one_line(tmp_path, saved_dir, argv, message):
  if "gs://bucket/x" in argv:  # without a gs:// client the URL fails as a URL
    try:
      import gcsfs  # noqa: F401
      pytest.skip("gcsfs installed: gs:// would be reached")
    except ImportError:
      pass
  (tmp_path / "file").write_text("")
  (tmp_path / "garbage" / "3" / "meta").mkdir(parents=True)
  (tmp_path / "garbage" / "3" / "state").mkdir()
  (tmp_path / "garbage" / "3" / "meta" / "metadata").write_text("{")
  fill = {"tmp": str(tmp_path), "saved": str(saved_dir)}
  argv = [a.format(**fill) for a in argv]
  if argv[0] == "train":
    argv += ["--no-progress", "--eval-every", "0", "--steps", "2"]
  proc = subprocess.run([sys.executable, "-m", "meshnet", *argv], capture_output=True,
                        text=True, env=CHECKPOINT_ENV, timeout=300, cwd=tmp_path)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("meshnet:")]
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert len(errors) == 1 and errors[0] == proc.stderr.splitlines()[-1], proc.stderr
  assert errors[0].startswith("meshnet: error: ") and message.format(**fill) in errors[0]
  assert "Traceback" not in proc.stdout + proc.stderr
  assert not os.path.exists(tmp_path / "gs:")
