"""Data sets that need no download, a resumable batch sampler, global batches.

* :func:`load_dataset` gives ``xor``, ``digits`` (scikit-learn's bundled 8x8
  digits) and ``mnist`` (the standard IDX files, read from ``--data-dir`` or
  :func:`default_data_dir`, where ``meshnet data fetch mnist`` puts them;
  training never downloads).
* :class:`BatchSampler` decides which examples form global batch ``i``: a
  permutation per epoch drawn from ``(seed, epoch)``, so the sequence depends
  only on the seed, never on the mesh or process count. Its ``position`` is
  all there is to save and restore.
* :func:`global_batch` assembles a global ``jax.Array`` over the mesh; each
  process reads only the rows its own devices hold (the DistributedSampler
  idea without a per-process sampler to keep in sync).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shlex
import struct
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from meshnet.errors import MeshnetError

ENV_DATA_DIR = "MESHNET_DATA_DIR"
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An in-memory supervised data set.

  Attributes:
    name: the data set's name.
    x_train: ``[N, F]`` float32 inputs.
    y_train: ``[N]`` int32 class labels (``loss="cross_entropy"``) or
      ``[N, O]`` float32 targets (``loss="mse"``).
    x_test: ``[N_test, F]`` float32.
    y_test: like ``y_train``.
    loss: ``"cross_entropy"`` or ``"mse"``.
    num_outputs: model output size (classes, or target width).
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  loss: str
  num_outputs: int

  @property
  def input_size(self) -> int:
    return int(np.prod(self.x_train.shape[1:]))


def xor() -> Dataset:
  """The four XOR points; ``y`` is ``[4, 1]`` in {0, 1}, trained with MSE."""
  x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
  y = np.array([[0], [1], [1], [0]], np.float32)
  return Dataset("xor", x, y, x, y, "mse", 1)


def digits() -> Dataset:
  """scikit-learn's 1797 8x8 digits, pixels scaled to [0, 1], 64 features.

  The 80/20 train/test split is fixed (seed ``DIGITS_SPLIT_SEED``), so runs
  with different training seeds are evaluated on the same test images.
  """
  from sklearn.datasets import load_digits

  bunch = load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  y = bunch.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(x))
  n_test = int(round(len(x) * DIGITS_TEST_FRACTION))
  test, train = order[:n_test], order[n_test:]
  return Dataset("digits", x[train], y[train], x[test], y[test], "cross_entropy", 10)


def default_data_dir(dataset: str) -> str:
  """The directory a file-based data set is read from when no ``data_dir``
  (``--data-dir``) is given, and where ``meshnet data fetch`` puts it.

  ``$MESHNET_DATA_DIR/<dataset>`` if that variable is set, else
  ``$XDG_CACHE_HOME/meshnet/<dataset>``, else ``~/.cache/meshnet/<dataset>``.
  Nothing is created here.
  """
  root = os.environ.get(ENV_DATA_DIR)
  if not root:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    root = os.path.join(cache, "meshnet")
  return os.path.join(os.path.expanduser(root), dataset)


def _find_idx_file(data_dir: str, stem: str) -> str | None:
  for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
               stem.replace("-idx", ".idx") + ".gz"):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  return None


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (raw or gzip) as a numpy array of its stored dtype.

  Raises:
    MeshnetError: the file is not a valid IDX file (bad magic, a header
      longer than the file, or a data size that is not the header's).
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise MeshnetError(f"cannot read IDX file {path}: {e}") from None
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
            0x0E: ">f8"}
  if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] not in dtypes:
    raise MeshnetError(f"{path} is not an IDX file (bad magic number)")
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise MeshnetError(
        f"{path} is {len(data)} bytes but its IDX header for {ndim} dimensions needs "
        f"{header}; the file is truncated or not an IDX file"
    )
  shape = struct.unpack(f">{ndim}I", data[4:header])
  dtype = np.dtype(dtypes[data[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise MeshnetError(
        f"{path} holds {len(data) - header} data bytes but its header says "
        f"{expected} (shape {shape}); the file is truncated or corrupt"
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _mnist_images(path: str, array: np.ndarray) -> np.ndarray:
  """``[N, H, W]`` (any dtype) from ``path`` -> ``[N, H*W]`` float32.

  uint8 images (the standard files) are scaled by 1/255 to [0, 1]; images
  stored in another type (e.g. float32) are used as they are.
  """
  if array.ndim < 2:
    raise MeshnetError(
        f"{path} holds an array of shape {array.shape}, not images [N, rows, cols]; "
        "is it a labels file?"
    )
  images = array.reshape(len(array), -1)
  if array.dtype == np.uint8:
    return (images / 255.0).astype(np.float32)
  return images.astype(np.float32)


def _mnist_labels(path: str, array: np.ndarray, num_classes: int) -> np.ndarray:
  """Labels ``[N]`` from ``path`` as int32, each in ``[0, num_classes)``."""
  if array.ndim != 1:
    raise MeshnetError(
        f"{path} holds an array of shape {array.shape}, not labels [N]; is it an "
        "images file?"
    )
  labels = array.astype(np.int32)
  bad = np.flatnonzero((labels != array) | (labels < 0) | (labels >= num_classes))
  if bad.size:
    raise MeshnetError(
        f"{path} has label {array[bad[0]]} (example {bad[0]}); MNIST labels must be "
        f"integers in [0, {num_classes})"
    )
  return labels


def mnist(data_dir: str | None = None) -> Dataset:
  """MNIST from the four standard IDX files (raw or ``.gz``) in ``data_dir``
  (default: :func:`default_data_dir` ``("mnist")``, where
  ``meshnet data fetch mnist`` downloads them; this function never downloads).

  Images become ``[N, rows * cols]`` float32: uint8 images (as in the
  standard files) are scaled by 1/255 to [0, 1]; images stored as floats (or
  another type) are used as they are, unscaled. Labels become int32 in
  [0, 10).

  Raises:
    MeshnetError: a file is missing (the message lists the file names to put
      there and the ``meshnet data fetch mnist`` command that downloads them)
      or malformed: not IDX, no examples, images where labels belong or the
      other way round, labels outside [0, 10), image and label counts that
      differ, or test images of another size than the training images. The
      message names the file.
  """
  names = ", ".join(f"{stem}.gz" for stem in MNIST_FILES.values())
  directory = os.path.expanduser(data_dir) if data_dir else default_data_dir("mnist")
  paths = {key: _find_idx_file(directory, stem) for key, stem in MNIST_FILES.items()}
  missing = [MNIST_FILES[key] for key, path in paths.items() if path is None]
  if missing and data_dir:
    raise MeshnetError(
        f"MNIST file {missing[0]}[.gz] not found in {data_dir}; put {names} there, or "
        f"run `meshnet data fetch mnist --dir {shlex.quote(data_dir)}` to download them "
        "(training never downloads)"
    )
  if missing:
    raise MeshnetError(
        f"MNIST file {missing[0]}[.gz] not found in {directory} (the default data "
        "directory); run `meshnet data fetch mnist` to download the files there "
        f"(training never downloads), or pass --data-dir DIR with {names}"
    )
  arrays = {key: read_idx(path) for key, path in paths.items()}
  for key, array in arrays.items():
    if array.ndim == 0 or len(array) == 0:
      raise MeshnetError(f"{paths[key]} holds no examples (shape {array.shape})")
  x = {key: _mnist_images(paths[key], arrays[key]) for key in ("x_train", "x_test")}
  y = {key: _mnist_labels(paths[key], arrays[key], 10) for key in ("y_train", "y_test")}
  for split in ("train", "test"):
    n_x, n_y = len(x[f"x_{split}"]), len(y[f"y_{split}"])
    if n_x != n_y:
      raise MeshnetError(f"MNIST {split} files disagree: {n_x} images, {n_y} labels")
  train_size, test_size = arrays["x_train"].shape[1:], arrays["x_test"].shape[1:]
  if test_size != train_size:
    raise MeshnetError(
        f"{paths['x_test']} holds images of size {test_size} but {paths['x_train']} "
        f"of size {train_size}; both splits need images of one size"
    )
  return Dataset("mnist", x["x_train"], y["y_train"], x["x_test"], y["y_test"],
                 "cross_entropy", 10)


def check_dataset(dataset: Dataset, *, evaluates: bool = True) -> None:
  """Refuses a data set that cannot be trained on (or evaluated), before any work.

  Checks that each split has as many targets as inputs, that the test split
  has the training split's feature and target shapes, and, for
  ``loss="cross_entropy"``, that every label is a class index in
  ``[0, num_outputs)``.

  Args:
    dataset: the data set.
    evaluates: the run evaluates on the test split, so it needs examples.

  Raises:
    MeshnetError: naming the data set, the split and the bad shape or label.
  """
  name = dataset.name
  splits = {"train": (dataset.x_train, dataset.y_train),
            "test": (dataset.x_test, dataset.y_test)}
  for split, (x, y) in splits.items():
    if np.ndim(x) == 0 or np.ndim(y) == 0 or len(x) != len(y):
      raise MeshnetError(
          f"dataset {name}: x_{split} has shape {np.shape(x)} but y_{split} "
          f"{np.shape(y)}; a split needs one target per input"
      )
  if len(dataset.x_train) == 0:
    raise MeshnetError(f"dataset {name} has no training examples")
  if evaluates and len(dataset.x_test) == 0:
    raise MeshnetError(
        f"dataset {name} has no test examples to evaluate on; set eval_every=0 "
        "(--eval-every 0) to train without evaluation"
    )
  for kind in ("x", "y"):
    train, test = getattr(dataset, f"{kind}_train"), getattr(dataset, f"{kind}_test")
    if len(test) and test.shape[1:] != train.shape[1:]:
      raise MeshnetError(
          f"dataset {name}: {kind}_test has examples of shape {test.shape[1:]} but "
          f"{kind}_train {train.shape[1:]}; both splits need the same shape"
      )
  if dataset.loss == "cross_entropy":
    n = dataset.num_outputs
    for split, (_, y) in splits.items():
      if y.ndim != 1:
        raise MeshnetError(
            f"dataset {name}: y_{split} has shape {y.shape}; cross_entropy needs "
            "integer class labels [N]"
        )
      bad = np.flatnonzero((y < 0) | (y >= n) | (y != np.floor(y)))
      if bad.size:
        raise MeshnetError(
            f"dataset {name}: label {y.flat[bad[0]]} in y_{split} (example "
            f"{bad[0]}) is not a class in [0, {n}); labels must be class indices "
            f"below num_outputs={n}"
        )


DATASETS: tuple[str, ...] = ("xor", "digits", "mnist")


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
  """The built-in data set ``name`` (one of :data:`DATASETS`).

  Args:
    name: the data set.
    data_dir: where file-based data sets (``mnist``) are read from; ``None``:
      :func:`default_data_dir`.

  Raises:
    MeshnetError: unknown name, or mnist files missing.
  """
  if name == "xor":
    return xor()
  if name == "digits":
    return digits()
  if name == "mnist":
    return mnist(data_dir)
  raise MeshnetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


FINGERPRINT_METHOD = "sha256-1"
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_SPLITS = {"train": "training split", "test": "test split"}


def _array_fingerprint(array) -> dict[str, Any]:
  a = np.ascontiguousarray(np.asarray(array))
  if a.dtype.hasobject:  # the bytes would be pointers
    raise MeshnetError(f"cannot fingerprint an array of dtype {a.dtype}; give numeric "
                       "numpy arrays")
  return {"shape": list(a.shape), "dtype": str(a.dtype),
          "sha256": hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()}


def fingerprint(dataset: Dataset) -> dict[str, Any]:
  """What a checkpoint's meta keeps of the data it was trained on.

  SHA-256 of each of the four arrays' bytes, with its shape and dtype, and
  the data set's name: equal fingerprints mean the same examples in the same
  order. About 0.1 s for MNIST's ``[60000, 784]`` float32 training images
  (1.8 GB/s on a CPU with SHA instructions); computed once per run.

  Returns:
    ``{"method": FINGERPRINT_METHOD, "name": str, "x_train": {"shape",
    "dtype", "sha256"}, "y_train": ..., "x_test": ..., "y_test": ...}``.
  """
  return {"method": FINGERPRINT_METHOD, "name": dataset.name,
          **{key: _array_fingerprint(getattr(dataset, key)) for key in _ARRAYS}}


def data_change(saved: Any, now: dict[str, Any]) -> str | None:
  """How the data ``now`` (a :func:`fingerprint`) differs from the one a
  checkpoint kept (``saved``), in words: ``None`` when it is the same, or
  when there is nothing to compare (a checkpoint saved before fingerprints,
  or by another method).

  Example: ``"training split: x_train [1437, 64] float32 in the checkpoint,
  [1000, 64] float32 now; test split: y_test has other contents (same shape
  [360] int32)"``.
  """
  if not isinstance(saved, dict) or saved.get("method") != now.get("method"):
    return None
  parts = []
  if saved.get("name") != now["name"]:
    parts.append(f"data set {saved.get('name')!r} in the checkpoint, {now['name']!r} now")
  for split, words in _SPLITS.items():
    changes = []
    for key in (f"x_{split}", f"y_{split}"):
      old, new = saved.get(key), now[key]
      if not isinstance(old, dict):
        changes.append(f"{key} missing from the checkpoint's fingerprint")
      elif (old.get("shape"), old.get("dtype")) != (new["shape"], new["dtype"]):
        changes.append(f"{key} {old.get('shape')} {old.get('dtype')} in the checkpoint, "
                       f"{new['shape']} {new['dtype']} now")
      elif old.get("sha256") != new["sha256"]:
        changes.append(f"{key} has other contents (same shape {new['shape']} "
                       f"{new['dtype']})")
    if changes:
      parts.append(f"{words}: {', '.join(changes)}")
  return "; ".join(parts) or None


class BatchSampler:
  """Deterministic, epoch-shuffled global batches of example indices.

  Batch ``position`` (counting from 0 over the whole run) is slice
  ``position % steps_per_epoch`` of the permutation for epoch
  ``position // steps_per_epoch``, drawn from ``(seed, epoch)``. The last
  incomplete batch of an epoch is dropped, so every batch is full. Saving
  ``position`` (see :meth:`state`) and building a sampler with it resumes the
  exact sequence.

  Args:
    num_examples: size of the data set.
    batch_size: global batch size (all processes together).
    seed: shuffling seed.
    position: index of the next batch to yield.
    shuffle: if false, every epoch is in order.
  """

  def __init__(self, num_examples: int, batch_size: int, *, seed: int = 0,
               position: int = 0, shuffle: bool = True):
    if batch_size < 1:
      raise MeshnetError(f"batch size {batch_size} must be >= 1")
    if batch_size > num_examples:
      raise MeshnetError(
          f"batch size {batch_size} is larger than the data set ({num_examples} "
          "examples); use a smaller --batch-size"
      )
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.seed = seed
    self.position = position
    self.shuffle = shuffle
    self._epoch_cache: tuple[int, np.ndarray] | None = None

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  @property
  def epoch(self) -> int:
    """The epoch the next batch belongs to."""
    return self.position // self.steps_per_epoch

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._epoch_cache is None or self._epoch_cache[0] != epoch:
      if self.shuffle:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      else:
        perm = np.arange(self.num_examples)
      self._epoch_cache = (epoch, perm)
    return self._epoch_cache[1]

  def indices(self, position: int) -> np.ndarray:
    """Example indices ``[batch_size]`` of global batch ``position``."""
    epoch, i = divmod(position, self.steps_per_epoch)
    return self._permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

  def __iter__(self) -> Iterator[np.ndarray]:
    return self

  def __next__(self) -> np.ndarray:
    batch = self.indices(self.position)
    self.position += 1
    return batch

  def state(self) -> dict[str, int]:
    """What a checkpoint stores to resume this sampler exactly."""
    return {"position": self.position, "seed": self.seed}


def global_batch(
    arrays: Sequence[np.ndarray], indices: np.ndarray, sharding: jax.sharding.Sharding
) -> tuple[jax.Array, ...]:
  """Global arrays of ``arrays[k][indices]``, laid out by ``sharding``.

  Only the rows held by this process's devices are read (the callback runs
  for addressable shards only), so in a multi-process run each process
  touches just its share of the batch, and the global batch is the same
  whatever the number of processes.

  Args:
    arrays: host arrays with a leading example axis.
    indices: ``[B]`` example indices of the global batch.
    sharding: sharding of the batch axis, e.g. ``NamedSharding(mesh, P("data"))``.

  Returns:
    One ``jax.Array`` of global shape ``[B, ...]`` per input array.
  """
  out = []
  for array in arrays:
    shape = (len(indices), *array.shape[1:])

    def rows(index, array=array):
      return array[indices[index[0]]][(slice(None), *index[1:])]

    out.append(jax.make_array_from_callback(shape, sharding, rows))
  return tuple(out)
