"""Data sets, the resumable sampler and global batch assembly."""

import gzip
import struct

import jax
import numpy as np
import pytest

import meshnet
from meshnet.data import BatchSampler, global_batch, load_dataset, read_idx
from meshnet.sharding import batch_sharding


def test_sampler_epochs_are_permutations_and_differ():
  sampler = BatchSampler(100, 16, seed=7)
  assert sampler.steps_per_epoch == 6
  epochs = [np.concatenate([next(sampler) for _ in range(6)]) for _ in range(3)]
  for epoch in epochs:
    assert len(np.unique(epoch)) == 96  # no example twice, last partial batch dropped
    assert epoch.min() >= 0 and epoch.max() < 100
  assert not np.array_equal(epochs[0], epochs[1])
  assert sampler.epoch == 3


def test_sampler_is_deterministic_and_resumable():
  a = BatchSampler(50, 8, seed=1)
  first = [next(a) for _ in range(20)]
  b = BatchSampler(50, 8, seed=1)
  assert all(np.array_equal(x, next(b)) for x in first)
  resumed = BatchSampler(50, 8, **BatchSampler(50, 8, seed=1, position=13).state())
  assert resumed.position == 13
  for x in first[13:]:
    np.testing.assert_array_equal(x, next(resumed))
  other_seed = BatchSampler(50, 8, seed=2)
  assert not np.array_equal(first[0], next(other_seed))


def test_sampler_errors():
  with pytest.raises(meshnet.MeshnetError, match="batch size 200 is larger than the "
                     r"data set \(100 examples\)"):
    BatchSampler(100, 200)
  with pytest.raises(meshnet.MeshnetError, match="batch size 0 must be >= 1"):
    BatchSampler(100, 0)


@pytest.mark.parametrize("data", [8, 2])
def test_global_batch_is_the_indexed_rows_sharded_over_data(data):
  mesh = meshnet.make_mesh(data=data, devices=jax.devices()[:data])
  x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
  y = np.arange(40, dtype=np.int32)
  indices = np.array([5, 3, 39, 0, 7, 7, 12, 30])
  xb, yb = global_batch((x, y), indices, batch_sharding(mesh))
  np.testing.assert_array_equal(np.asarray(xb), x[indices])
  np.testing.assert_array_equal(np.asarray(yb), y[indices])
  assert xb.sharding == batch_sharding(mesh)
  for shard in xb.addressable_shards:  # each device holds its contiguous slice
    np.testing.assert_array_equal(np.asarray(shard.data), x[indices][shard.index])


def test_xor_and_digits():
  ds = load_dataset("xor")
  assert ds.x_train.shape == (4, 2) and ds.y_train.shape == (4, 1) and ds.loss == "mse"
  a, b = load_dataset("digits"), load_dataset("digits")
  assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
  np.testing.assert_array_equal(a.x_test, b.x_test)  # split fixed by seed
  np.testing.assert_array_equal(a.y_train, b.y_train)
  assert a.x_train.dtype == np.float32 and 0 <= a.x_train.min() and a.x_train.max() <= 1
  assert set(np.unique(a.y_test)) == set(range(10))


def _write_idx(path, array, compress):
  codes = {np.uint8: 0x08, np.int32: 0x0C}
  header = bytes([0, 0, codes[array.dtype.type], array.ndim])
  header += struct.pack(f">{array.ndim}I", *array.shape)
  data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  with (gzip.open if compress else open)(path, "wb") as f:
    f.write(data)


def _write_mnist(directory, n_train=12, n_test=5, compress=True):
  rng = np.random.default_rng(0)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), np.uint8),
      "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), np.uint8),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), np.uint8),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), np.uint8),
  }
  for i, (stem, array) in enumerate(arrays.items()):
    gz = compress and i % 2 == 0  # a mix of raw and gzip files
    _write_idx(directory / (stem + (".gz" if gz else "")), array, gz)
  return arrays


def test_mnist_reads_idx_files(tmp_path):
  arrays = _write_mnist(tmp_path)
  ds = load_dataset("mnist", str(tmp_path))
  assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
  np.testing.assert_allclose(ds.x_train[3], arrays["train-images-idx3-ubyte"][3].ravel() / 255)
  np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
  assert ds.y_train.dtype == np.int32 and ds.num_outputs == 10


def test_mnist_missing_or_bad_files(tmp_path):
  with pytest.raises(meshnet.MeshnetError, match="pass --data-dir DIR with "
                     "train-images-idx3-ubyte.gz"):
    load_dataset("mnist")
  with pytest.raises(meshnet.MeshnetError, match=f"MNIST file train-images-idx3-ubyte"
                     rf"\[.gz\] not found in {tmp_path}; put"):
    load_dataset("mnist", str(tmp_path))
  _write_mnist(tmp_path, compress=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(meshnet.MeshnetError, match="truncated or corrupt"):
    load_dataset("mnist", str(tmp_path))
  path.write_bytes(b"not an idx file")
  with pytest.raises(meshnet.MeshnetError, match="is not an IDX file"):
    read_idx(str(path))


def test_unknown_dataset():
  with pytest.raises(meshnet.MeshnetError, match="unknown dataset 'cifar'; choose one of "
                     "xor, digits, mnist"):
    load_dataset("cifar")
