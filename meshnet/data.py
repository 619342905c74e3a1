"""Data sets that need no download, a resumable batch sampler, global batches.

* :func:`load_dataset` gives ``xor``, ``digits`` (scikit-learn's bundled 8x8
  digits) and ``mnist`` (standard IDX files in a directory you point to;
  meshnet never downloads at run time).
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
import os
import struct
from typing import Iterator, Sequence

import jax
import numpy as np

from meshnet.errors import MeshnetError

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
    MeshnetError: the file is not a valid IDX file (bad magic or size).
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
  shape = struct.unpack(f">{ndim}I", data[4:header])
  dtype = np.dtype(dtypes[data[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise MeshnetError(
        f"{path} holds {len(data) - header} data bytes but its header says "
        f"{expected} (shape {shape}); the file is truncated or corrupt"
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape)


def mnist(data_dir: str | None) -> Dataset:
  """MNIST from the four standard IDX files (raw or ``.gz``) in ``data_dir``.

  Images become ``[N, 784]`` float32 in [0, 1]; labels int32.

  Raises:
    MeshnetError: no ``data_dir``, or a file is missing (the message lists
      the file names to put there) or malformed.
  """
  names = ", ".join(f"{stem}.gz" for stem in MNIST_FILES.values())
  if not data_dir:
    raise MeshnetError(
        f"dataset mnist reads local files: pass --data-dir DIR with {names} "
        "(meshnet never downloads)"
    )
  paths = {key: _find_idx_file(data_dir, stem) for key, stem in MNIST_FILES.items()}
  missing = [MNIST_FILES[key] for key, path in paths.items() if path is None]
  if missing:
    raise MeshnetError(
        f"MNIST file {missing[0]}[.gz] not found in {data_dir}; put {names} "
        "there (meshnet never downloads)"
    )
  arrays = {key: read_idx(path) for key, path in paths.items()}
  for split in ("train", "test"):
    n_x, n_y = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
    if n_x != n_y:
      raise MeshnetError(f"MNIST {split} files disagree: {n_x} images, {n_y} labels")
  prep = lambda images: (images.reshape(len(images), -1) / 255.0).astype(np.float32)
  return Dataset(
      "mnist", prep(arrays["x_train"]), arrays["y_train"].astype(np.int32),
      prep(arrays["x_test"]), arrays["y_test"].astype(np.int32), "cross_entropy", 10,
  )


DATASETS: tuple[str, ...] = ("xor", "digits", "mnist")


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
  """The built-in data set ``name`` (one of :data:`DATASETS`).

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
