"""Data sets that need no download, a resumable batch sampler, global batches.

* :func:`load_dataset` gives ``xor``, ``digits`` (scikit-learn's bundled 8x8
  digits), ``mnist`` (the standard IDX files, read from ``--data-dir`` or
  :func:`default_data_dir`, where ``meshnet data fetch mnist`` puts them;
  training never downloads) and ``text`` (byte-level next-token windows of a
  UTF-8 text file, a folder of them, or the embedded corpus: :func:`text`).
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

from meshnet.corpus import SEPARATOR, Corpus, embedded_corpus
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
    x_train: ``[N, F]`` float32 inputs (``[N, T]`` int32 tokens for
      :class:`TextDataset`).
    y_train: ``[N]`` int32 class labels (``loss="cross_entropy"``; ``[N, T]``,
      one per position, for sequence models) or ``[N, O]`` float32 targets
      (``loss="mse"``).
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


@dataclasses.dataclass(frozen=True)
class TextDataset(Dataset):
  """Byte-level next-token windows of a text corpus (:func:`text`).

  ``x_*`` and ``y_*`` are ``[N, context]`` int32 bytes in ``[0, 256)``: row
  ``i`` of split ``s`` is window ``k = s_windows[i]`` of the corpus,
  ``x = data[k*context : k*context + context]`` and ``y`` the same shifted
  by one byte, ``data[k*context + 1 : k*context + context + 1]``.

  Attributes:
    context: tokens per example (``T``).
    corpus_bytes: the corpus's length in bytes.
    corpus_sha256: hex SHA-256 of the corpus.
    source: the corpus in words (a path, or the embedded corpus).
    skipped: files of a ``--data-dir`` folder left out (not UTF-8 text).
    train_windows: ``[N_train]`` window indices of the training rows.
    test_windows: ``[N_test]`` window indices of the held-out rows.
  """

  context: int = 0
  corpus_bytes: int = 0
  corpus_sha256: str = ""
  source: str = ""
  skipped: tuple[str, ...] = ()
  train_windows: np.ndarray | None = None
  test_windows: np.ndarray | None = None


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


TEXT_VOCAB = 256  # byte-level tokens
TEXT_CONTEXT = 128  # tokens per window when the model does not set a context
TEXT_SPLIT_SEED = 0
TEXT_TEST_FRACTION = 0.1


def _decode_problem(data: bytes) -> str | None:
  """Why ``data`` is not UTF-8 text (``None``: it is). A NUL byte counts as
  binary: it decodes, but text files do not hold one."""
  nul = data.find(b"\x00")
  if nul >= 0:
    return f"a NUL byte at offset {nul}"
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    return f"byte 0x{data[e.start]:02x} at offset {e.start} is not UTF-8"
  return None


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise MeshnetError(f"cannot read text file {path}: {e.strerror or e}") from None


def _text_files(folder: str) -> list[str]:
  """Every regular file under ``folder`` (recursively, sorted by relative
  path), hidden files and folders (``.name``) left out."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.join(root, name) for name in sorted(files) if not name.startswith(".")]
  return sorted(found, key=lambda path: os.path.relpath(path, folder).split(os.sep))


def read_text(path: str) -> tuple[Corpus, tuple[str, ...]]:
  """The corpus of a UTF-8 text file, or of every UTF-8 text file in a folder.

  A folder's files (recursively; hidden ``.names`` left out) are read in
  sorted order of their relative paths and joined by
  :data:`meshnet.corpus.SEPARATOR` (a blank line). A file is text when it
  decodes as UTF-8 and holds no NUL byte; in a folder, other files (images,
  archives) and empty files are skipped and named in the second value.

  Returns:
    ``(corpus, skipped)``: the :class:`~meshnet.corpus.Corpus` (its
    ``sources`` are the files read) and the folder's files left out.

  Raises:
    MeshnetError: ``path`` does not exist or cannot be read, a file given
      by name is not UTF-8 text, or a folder holds no text file.
  """
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    data = _read_bytes(path)
    problem = _decode_problem(data)
    if problem:
      raise MeshnetError(f"text file {path} is not UTF-8 text ({problem}); --dataset text "
                         "reads UTF-8 text files")
    return Corpus(data, hashlib.sha256(data).hexdigest(), (path,)), ()
  if not os.path.isdir(path):
    raise MeshnetError(f"text data {path} not found; give --data-dir a UTF-8 text file or a "
                       "folder of them, or leave it out for the embedded corpus")
  texts, sources, skipped = [], [], []
  for file in _text_files(path):
    data = _read_bytes(file)
    if data and _decode_problem(data) is None:
      texts.append(data)
      sources.append(file)
    else:
      skipped.append(file)
  if not texts:
    held = (f"only {len(skipped)} empty or non-UTF-8 file{'s' * (len(skipped) != 1)}, "
            f"e.g. {skipped[0]}" if skipped else "no files")
    raise MeshnetError(f"text folder {path} holds no UTF-8 text file ({held}); put .txt, "
                       ".md, ... files there")
  data = SEPARATOR.join(texts)
  return Corpus(data, hashlib.sha256(data).hexdigest(), tuple(sources)), tuple(skipped)


def text_windows(data: bytes, context: int) -> tuple[np.ndarray, np.ndarray]:
  """Every next-byte window of ``data``: window ``k`` covers bytes
  ``k*context .. k*context + context`` (``context + 1`` bytes, so
  consecutive windows share one byte and every byte after the first is a
  target exactly once).

  Returns:
    ``(x, y)``, each ``[N, context]`` int32 with ``N = (len(data) - 1) //
    context``: ``x = window[:-1]``, ``y = window[1:]``.
  """
  tokens = np.frombuffer(data, np.uint8)
  n = (len(tokens) - 1) // context
  windows = np.lib.stride_tricks.sliding_window_view(tokens, context + 1)[::context][:n]
  return (windows[:, :-1].astype(np.int32), windows[:, 1:].astype(np.int32))


def text(data_dir: str | None = None, *, context: int = TEXT_CONTEXT,
         split_seed: int = TEXT_SPLIT_SEED,
         test_fraction: float = TEXT_TEST_FRACTION) -> TextDataset:
  """Byte-level language modelling on a text file, a folder of them, or the
  embedded corpus.

  Tokens are the corpus's bytes (256 symbols; UTF-8 characters beyond ASCII
  are several tokens). The corpus is cut into :func:`text_windows` of
  ``context + 1`` bytes; example ``x`` is a window's first ``context``
  bytes and ``y`` its last ``context`` (the next byte at every position).
  The held-out split is a fixed, seeded choice of windows: ``round(N *
  test_fraction)`` of the ``N`` windows (at least one when ``N >= 2``) drawn
  by ``numpy.random.default_rng(split_seed)``, the same for every training
  seed and mesh; both splits keep corpus order (the sampler shuffles).
  The windows are held in memory as int32: 8 bytes per corpus byte.

  Args:
    data_dir: a UTF-8 text file or a folder of them (see :func:`read_text`);
      ``None``: the embedded corpus (:func:`meshnet.corpus.embedded_corpus`:
      Python's own help topics and standard-library docstrings, no download).
    context: tokens per example.
    split_seed: seed of the held-out choice.
    test_fraction: share of windows held out.

  Raises:
    MeshnetError: a missing path, a binary file, a folder without text, a
      corpus shorter than one window (``context + 1`` bytes), or a bad
      ``context``.
  """
  if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 1:
    raise MeshnetError(f"text context {context!r} must be an integer >= 1 (tokens per "
                       "example)")
  if data_dir:
    corpus, skipped = read_text(data_dir)
    folder = os.path.isdir(os.path.expanduser(data_dir))
    source = f"{data_dir} ({len(corpus.sources)} files)" if folder else data_dir
  else:
    corpus, skipped = embedded_corpus(), ()
    source = (f"embedded corpus (pydoc_data.topics and the docstrings of "
              f"{len(corpus.sources) - 1} standard-library modules)")
  if corpus.num_bytes < context + 1:
    raise MeshnetError(
        f"text corpus {source} has {corpus.num_bytes} bytes, fewer than context + 1 = "
        f"{context + 1} for one example; use a longer text or a smaller --context")
  x, y = text_windows(corpus.data, context)
  n = len(x)
  n_test = min(max(int(round(n * test_fraction)), 1), n - 1) if n >= 2 else 0
  order = np.random.default_rng(split_seed).permutation(n)
  test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
  return TextDataset(
      "text", x[train], y[train], x[test], y[test], "cross_entropy", TEXT_VOCAB,
      context=int(context), corpus_bytes=corpus.num_bytes, corpus_sha256=corpus.sha256,
      source=source, skipped=skipped, train_windows=train, test_windows=test)


def describe_text(dataset: TextDataset) -> str:
  """One line on a text data set's corpus, for a run's log."""
  line = (f"text corpus: {dataset.source}, {dataset.corpus_bytes:,} bytes (sha256 "
          f"{dataset.corpus_sha256[:12]}); windows of {dataset.context} bytes, "
          f"{len(dataset.x_test)} held out")
  if dataset.skipped:
    line += (f"; skipped {len(dataset.skipped)} file{'s' * (len(dataset.skipped) != 1)} "
             f"that {'are' if len(dataset.skipped) != 1 else 'is'} empty or not UTF-8 "
             f"text: {', '.join(dataset.skipped[:3])}"
             + (", ..." if len(dataset.skipped) > 3 else ""))
  return line


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
      if y.ndim not in (1, 2):
        raise MeshnetError(
            f"dataset {name}: y_{split} has shape {y.shape}; cross_entropy needs "
            "integer class labels [N] (or [N, T], one per position of a sequence)"
        )
      bad = np.argwhere((y < 0) | (y >= n) | (y != np.floor(y)))
      if bad.size:
        where = f"example {bad[0][0]}" + (f", position {bad[0][1]}" if y.ndim == 2 else "")
        raise MeshnetError(
            f"dataset {name}: label {y[tuple(bad[0])]} in y_{split} ({where}) is not a "
            f"class in [0, {n}); labels must be class indices below num_outputs={n}"
        )


DATASETS: tuple[str, ...] = ("xor", "digits", "mnist", "text")


def load_dataset(name: str, data_dir: str | None = None, *,
                 context: int | None = None) -> Dataset:
  """The built-in data set ``name`` (one of :data:`DATASETS`).

  Args:
    name: the data set.
    data_dir: where file-based data sets are read from: ``mnist``'s folder
      (``None``: :func:`default_data_dir`), ``text``'s file or folder
      (``None``: the embedded corpus).
    context: tokens per example for ``text`` (``None``:
      :data:`TEXT_CONTEXT`); ignored by the others.

  Raises:
    MeshnetError: unknown name, or files missing or malformed.
  """
  if name == "xor":
    return xor()
  if name == "digits":
    return digits()
  if name == "mnist":
    return mnist(data_dir)
  if name == "text":
    return text(data_dir, context=TEXT_CONTEXT if context is None else context)
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
  found = {"method": FINGERPRINT_METHOD, "name": dataset.name,
           **{key: _array_fingerprint(getattr(dataset, key)) for key in _ARRAYS}}
  if isinstance(dataset, TextDataset):
    found["corpus"] = {"bytes": dataset.corpus_bytes, "sha256": dataset.corpus_sha256,
                       "context": dataset.context}
  return found


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
  old_corpus, new_corpus = saved.get("corpus"), now.get("corpus")
  if isinstance(old_corpus, dict) and new_corpus and old_corpus != new_corpus:
    parts.append(
        f"text corpus of {old_corpus.get('bytes')} bytes (sha256 "
        f"{str(old_corpus.get('sha256'))[:12]}, context {old_corpus.get('context')}) in "
        f"the checkpoint, {new_corpus['bytes']} bytes (sha256 {new_corpus['sha256'][:12]}, "
        f"context {new_corpus['context']}) now")
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
