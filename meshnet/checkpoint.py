"""Checkpoints with Orbax, in a mesh-independent (logical) layout.

A checkpoint step directory holds two items:

  ``state``  the training state as ``{"step", "rng", "params", "opt_state"}``
             with parameters (and the optimizer's state) in the model's own
             tree, one entry per layer, whatever the mesh or pipeline.
  ``meta``   JSON: format tag, step, data-sampler position, the parameter
             and optimizer-state trees (paths, shapes, dtypes), the mesh,
             the config, a digest of the state's values
             (:func:`state_digest`) and a fingerprint of the data
             (:func:`meshnet.data.fingerprint`: a resume on changed data is
             refused unless allowed).

The digest is computed at save time from the host copies of the arrays
(each process adds up the shards it holds; Orbax writes the meta in the same
save, so a step is committed with its digest or not at all) and checked
after every restore: a step whose values Orbax reads without error but
wrongly (a flipped bit in an OCDBT data file) is set aside like a truncated
one. ``meshnet inspect DIR --verify`` checks every step.

Saving is asynchronous (the step loop only waits for the device-to-host
copy); Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames when the
step is complete, so a killed save leaves the previous steps intact and the
partial directory is ignored. A save that fills the disk (its error comes
back at the next save, wait or close) raises
:class:`~meshnet.errors.DiskFullError` naming the directory and its free
space, after removing the unfinished step (:mod:`meshnet.diskfull`).

Nothing a run saved is deleted except by rotation (``keep``) of the same run
or by an explicit ``overwrite``: a step that fails to restore (truncated
file, garbage meta) or a junk step directory (e.g. an empty ``7/``) is
renamed ``<step>.corrupt`` and reported, so it neither counts toward
``keep`` nor hides a good older step. One run writes a directory at a time:
process 0 holds an ``fcntl.flock`` on ``<dir>/.meshnet.lock`` while the
:class:`Checkpointer` is open (the kernel drops it when the process dies).
Remote directories (``gs://``, ``s3://``, ... through etils ``epath``, as
Orbax itself) are passed to Orbax untouched; they cannot be locked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from meshnet.data import data_change
from meshnet.diskfull import (disk_full_error, is_disk_full, quiet_abandoned_writes,
                              quiet_disk_full_logs)
from meshnet.errors import MeshnetError
from meshnet.metrics import Ticker
from meshnet.noise import verbose_from_env

FORMAT = "meshnet-checkpoint-1"
LOCK_FILE = ".meshnet.lock"
CORRUPT_SUFFIX = ".corrupt"
REPLACED_SUFFIX = ".replaced"

# Config fields that define what a saved state is (its structure or its
# meaning); a resume must match them. Everything else may change on resume:
# the mesh, devices and pipeline (schedule, microbatches, virtual stages), the
# run length, learning rate and schedule, the values of weight decay, momentum
# and clipping (not turning them on or off where that changes the optimizer
# state, which is compared leaf by leaf), grad_accum, deterministic, the
# evaluation, logging and checkpoint settings, and data_dir.
STATE_FIELDS = ("model.name", "model.hidden", "model.activation", "model.dropout",
                "optim.optimizer", "train.seed", "data.dataset", "data.batch_size")
_META_FIELDS = ("format", "step", "params", "sampler")


def to_logical(state) -> dict[str, Any]:
  """The state as the dict a checkpoint stores (its parameters are already in
  the model's own per-layer layout, pipelined or not)."""
  return {"step": state.step, "rng": state.rng, "params": state.params,
          "opt_state": state.opt_state}


def from_logical(tree: dict[str, Any], state_like):
  """Inverse of :func:`to_logical`, into the type of ``state_like``."""
  return type(state_like)(step=tree["step"], params=tree["params"],
                          opt_state=tree["opt_state"], rng=tree["rng"])


def tree_summary(tree: Any) -> list[dict[str, Any]]:
  """``[{"path", "shape", "dtype"}]`` for every leaf, in tree order."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [{"path": jax.tree_util.keystr(path), "shape": list(np.shape(leaf)),
           "dtype": str(np.dtype(getattr(leaf, "dtype", np.float32)))}
          for path, leaf in leaves]


def digest(tree: Any) -> str:
  """SHA-256 of every leaf's bytes (with its path, shape and dtype), in tree
  order: equal digests mean bit-identical trees."""
  h = hashlib.sha256()
  for (path, leaf) in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
    array = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype}".encode())
    h.update(array.tobytes())
  return h.hexdigest()


DIGEST_METHOD = "sum64-1"
_MASK64 = (1 << 64) - 1
_CHUNK_WORDS = 1 << 22  # words hashed at a time (bounds the uint64 temporaries: 32 MB)


def _words(array: np.ndarray) -> np.ndarray:
  """``array``'s bits as uint32 words, shape ``array.shape + (k,)``: ``k``
  words per element (elements narrower than 32 bits zero-extended to one)."""
  shape = np.shape(array)
  array = np.ascontiguousarray(array)  # (0-d arrays come back 1-d)
  size = array.dtype.itemsize
  if size % 4 == 0:
    return array.view(np.uint32).reshape(shape + (size // 4,))
  return array.view(f"u{size}").astype(np.uint32).reshape(shape + (1,))


def _block_sums(words: np.ndarray, start: tuple[int, ...],
                shape: tuple[int, ...]) -> tuple[int, int]:
  """``(sum w, sum (i + 1) w) mod 2**64`` over a block of uint32 words.

  ``words`` is the block at offset ``start`` of an array of words of global
  shape ``shape``; ``i`` is a word's flat (row-major) index in that array.
  Both sums add over blocks, so any split of an array into blocks (shards,
  chunks) gives the array's sums.
  """
  u = words.astype(np.uint64)
  s0 = int(u.sum(dtype=np.uint64))
  s1 = s0
  stride = 1
  for axis in reversed(range(u.ndim)):
    others = tuple(a for a in range(u.ndim) if a != axis)
    along = u.sum(axis=others, dtype=np.uint64) if others else u
    index = np.arange(start[axis], start[axis] + u.shape[axis], dtype=np.uint64)
    s1 += stride * int(np.dot(index, along))  # uint64 wraps; Python ints are masked below
    stride *= shape[axis]
  return s0 & _MASK64, s1 & _MASK64


def _local_sums(leaf: Any) -> tuple[int, int]:
  """This process's part of a leaf's sums: its shards of replica 0 (every
  element is in exactly one such shard over all processes)."""
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if isinstance(leaf, jax.Array):
    blocks = [(np.asarray(shard.data), shard.index) for shard in leaf.addressable_shards
              if shard.replica_id == 0]
  else:
    array = np.asarray(leaf)
    blocks = [(array, tuple(slice(None) for _ in array.shape))]
  s0 = s1 = 0
  for array, index in blocks:
    words = _words(array)
    shape = tuple(np.shape(leaf)) + words.shape[-1:]
    start = tuple(sl.start or 0 for sl in index) + (0,)
    rows = max(1, _CHUNK_WORDS // max(1, words[0].size)) if words.ndim > 1 else 1
    for first in range(0, max(words.shape[0], 1), rows):  # chunks of the first axis
      chunk = words[first:first + rows]
      a, b = _block_sums(chunk, (start[0] + first,) + start[1:], shape)
      s0, s1 = (s0 + a) & _MASK64, (s1 + b) & _MASK64
  return s0, s1


def state_digest(tree: Any) -> dict[str, Any]:
  """The digest a checkpoint's meta keeps of its state, the same on any mesh.

  Per leaf, two sums mod 2**64 over the leaf's bits as uint32 words ``w_i``
  (``i`` the word's row-major index): ``sum w_i`` and ``sum (i + 1) w_i``
  (Fletcher's checksum, 64 bits wide). Any changed word changes the first;
  words moved or swapped change the second. The sums add over shards, so each
  process adds up the shards it holds (host copies: free on CPU) and the
  processes add their parts; the result does not depend on the mesh, so a
  state restored on another mesh verifies too. Call it on every process
  (with several it is a collective).

  Returns:
    ``{"method": DIGEST_METHOD, "value": hex SHA-256 of every leaf's path,
    shape, dtype and sums, "leaves": {path: "<32 hex digits>"}}``, paths as
    Orbax names them (``params.0.w``), sorted.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  sums = np.array([_local_sums(leaf) for _, leaf in leaves], dtype=np.uint64).reshape(-1, 2)
  if jax.process_count() > 1:  # add the processes' parts (uint32 halves: x64 may be off)
    from jax.experimental import multihost_utils
    parts = np.asarray(multihost_utils.process_allgather(sums.view(np.uint32)))
    sums = np.ascontiguousarray(parts.reshape(-1, len(leaves), 4)).view(np.uint64).sum(axis=0, dtype=np.uint64)
  rows = sorted((_plain_path(path), f"{np.shape(leaf)}:{getattr(leaf, 'dtype', '')}",
                  f"{s0:016x}{s1:016x}") for (path, leaf), (s0, s1) in zip(leaves, sums.tolist()))
  h = hashlib.sha256()
  for key, kind, value in rows:
    h.update(f"{key}:{kind}:{value};".encode())
  return {"method": DIGEST_METHOD, "value": h.hexdigest(),
          "leaves": {key: value for key, _, value in rows}}


def _plain_path(path: tuple) -> str:
  """A leaf's path as Orbax names it (``opt_state.0.mu.0.w``): the same
  whether the tree holds optax's named tuples or, read without a target,
  dicts."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def digest_problem(saved: Any, tree: Any) -> str | None:
  """How ``tree`` (a restored state) differs from the digest ``saved`` in its
  meta: ``None`` when it matches, or when there is no digest to check (a
  checkpoint saved before digests, or by another method)."""
  if not isinstance(saved, dict) or saved.get("method") != DIGEST_METHOD:
    return None
  now = state_digest(tree)
  if now["value"] == saved.get("value"):
    return None
  expected = saved.get("leaves") if isinstance(saved.get("leaves"), dict) else {}
  differ = [path for path, value in now["leaves"].items() if expected.get(path) != value]
  named = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
  return f"does not match its digest ({named or 'the digest itself'} differ{'s' * (len(differ) == 1)})"


def _describe_mismatch(saved: list[dict], expected: list[dict]) -> str | None:
  saved_by_path = {leaf["path"]: leaf for leaf in saved}
  expected_by_path = {leaf["path"]: leaf for leaf in expected}
  problems = []
  for path, leaf in expected_by_path.items():
    old = saved_by_path.get(path)
    if old is None:
      problems.append(f"{path} missing from the checkpoint (expected {leaf['shape']})")
    elif old["shape"] != leaf["shape"] or old["dtype"] != leaf["dtype"]:
      problems.append(f"{path} saved {old['shape']} {old['dtype']}, expected "
                      f"{leaf['shape']} {leaf['dtype']}")
  for path, leaf in saved_by_path.items():
    if path not in expected_by_path:
      problems.append(f"{path} saved {leaf['shape']} but the model has no such leaf")
  if not problems:
    return None
  more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
  return "; ".join(problems[:3]) + more


def checkpoint_path(directory: str | os.PathLike) -> epath.Path:
  """``directory`` as Orbax gets it: a URL (``gs://bucket/x``) untouched, a
  local path made absolute.

  Raises:
    MeshnetError: a URL scheme ``epath`` cannot open.
  """
  text = os.fspath(directory)
  if "://" not in text:
    return epath.Path(os.path.abspath(text))
  try:
    return epath.Path(text)
  except KeyError:
    raise MeshnetError(f"checkpoint directory {text}: unsupported URL scheme; use a local "
                       "path or gs://, s3://, az://") from None


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _first_line(e: BaseException, width: int = 160) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:width]}" if text else type(e).__name__


def _meta_problem(meta: Any) -> str | None:
  """Why ``meta`` cannot describe a step (``None``: it can)."""
  if not isinstance(meta, dict):
    return "is not a JSON object"
  missing = [field for field in _META_FIELDS if field not in meta]
  if missing:
    return f"lacks {', '.join(missing)}"
  leaves = meta["params"]
  if not (isinstance(leaves, list) and all(
      isinstance(leaf, dict) and {"path", "shape", "dtype"} <= leaf.keys() for leaf in leaves)):
    return "has a malformed params tree"
  if not isinstance(meta["sampler"], dict) or not isinstance(
      meta["sampler"].get("position"), int):
    return "lacks sampler.position"
  return None


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
  """The meta JSON of one step directory, checked.

  Raises:
    MeshnetError: the file is missing, not JSON, lacks a field meshnet needs
      (message ``meta of step N ...``), or belongs to another program
      (``... is not a meshnet checkpoint``).
  """
  step_dir = epath.Path(step_dir)
  try:
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
  except (OSError, ValueError) as e:  # missing, unreadable, not UTF-8, not JSON
    raise MeshnetError(f"meta of step {step_dir.name} is unreadable ({_first_line(e, 60)})"
                       ) from None
  if isinstance(meta, dict) and meta.get("format", FORMAT) != FORMAT:
    raise MeshnetError(f"{step_dir} is not a meshnet checkpoint (format "
                       f"{meta.get('format')!r}); choose a meshnet checkpoint directory")
  problem = _meta_problem(meta)
  if problem:
    raise MeshnetError(f"meta of step {step_dir.name} {problem}")
  return meta


def config_mismatch(saved: dict[str, Any], current: dict[str, Any],
                    fields: tuple[str, ...] = STATE_FIELDS) -> list[str]:
  """``"section.field <saved> in the checkpoint, <current> now"`` for each of
  ``fields`` that differs between two ``Config.to_dict()`` trees."""
  def value(tree, field):
    section, name = field.split(".")
    return json.loads(json.dumps(tree.get(section, {}).get(name)))  # tuples as lists

  return [f"{field} {json.dumps(value(saved, field))} in the checkpoint, "
          f"{json.dumps(value(current, field))} now"
          for field in fields if value(saved, field) != value(current, field)]


def _fit_problem(meta: dict[str, Any], target: dict[str, Any],
                 config: dict[str, Any] | None) -> str | None:
  """Why a checkpoint with ``meta`` cannot continue this run (``None``: it can)."""
  saved_config = meta.get("config") if config is not None else None
  differing = config_mismatch(saved_config, config) if isinstance(saved_config, dict) else []
  mismatch = _describe_mismatch(meta["params"], tree_summary(target["params"]))
  if mismatch:
    return (f"does not fit this model: {mismatch}"
            + (f" (config: {'; '.join(differing)})" if differing else ""))
  if differing:
    return f"was saved by a different run: {'; '.join(differing)}"
  if "opt_state" in meta and _describe_mismatch(meta["opt_state"],
                                                tree_summary(target["opt_state"])):
    saved_optim = saved_config.get("optim", {}) if isinstance(saved_config, dict) else {}
    # Turning a setting on or off changes the optimizer state; its value does not.
    toggled = tuple(f"optim.{f}" for f in sorted(config["optim"])
                    if f in saved_optim and bool(saved_optim[f]) != bool(config["optim"][f]))
    changed = config_mismatch(saved_config, config, toggled) if toggled else []
    return ("holds an optimizer state of another structure"
            + (f" ({'; '.join(changed)})" if changed else ""))
  return None


def _is_closed_loop_error(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _raised_in_orbax(exc: BaseException | None) -> bool:
  """Whether ``exc``'s traceback passes through Orbax's code (its reads)."""
  tb = exc.__traceback__ if exc is not None else None
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _UnretrievedReadFilter(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" records for Orbax
  reads. When a restore fails, the first failed read is raised (and meshnet
  reports the step); the other reads that failed are left unretrieved and,
  when collected, asyncio logs each with a traceback, possibly long after
  the restore. Records for anything else pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not ("exception was never retrieved" in record.getMessage()
                and _raised_in_orbax(error))


_FILTER_INSTALLED = False


@contextlib.contextmanager
def _quiet_closed_event_loop() -> Iterator[None]:
  """Silences ``RuntimeError: Event loop is closed`` around Orbax restores.

  When one read of a restore fails (a truncated file), Orbax closes its event
  loop while TensorStore still completes the other reads; each completion
  then calls back into the closed loop, and Python prints that error, as an
  "unraisable" exception or through ``sys.excepthook`` (TensorStore's
  callbacks), possibly after the restore has returned (dozens of
  tracebacks). The filter is installed once, for the process, and drops only
  that exact error; everything else goes to the previous hooks. The reads
  that failed after the first are kept off the log too
  (:class:`_UnretrievedReadFilter`).
  """
  global _FILTER_INSTALLED
  if not _FILTER_INSTALLED:
    _FILTER_INSTALLED = True
    logging.getLogger("asyncio").addFilter(_UnretrievedReadFilter())
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable_hook(unraisable):
      if not _is_closed_loop_error(unraisable.exc_value):
        previous_unraisable(unraisable)

    def except_hook(kind, value, traceback):
      if not _is_closed_loop_error(value):
        previous_except(kind, value, traceback)

    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  yield


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
  """Holds SIGINT and SIGTERM back while a checkpoint is read, then delivers
  them. An interrupt raised inside Orbax's reads comes out wrapped in a
  plain ``Exception`` that looks like a corrupt step: a good step would be
  set aside and the run would carry on from an older one."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received: list[int] = []
  previous = {signum: signal.signal(signum, lambda signum, _: received.append(signum))
              for signum in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    for signum in dict.fromkeys(received):
      signal.raise_signal(signum)


def _restore_problem(e: Exception) -> str | None:
  """How a failed restore reads: ``None`` when it is not the step's fault
  (memory), else the reason to set the step aside."""
  text = _first_line(e, 120)
  if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text:
    return None
  return f"is corrupt ({text})"


def _sync(name: str) -> None:
  """Waits for every process (a no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@dataclasses.dataclass
class Restored:
  """A restored checkpoint: its step, logical state tree and metadata."""

  step: int
  tree: dict[str, Any]
  meta: dict[str, Any]


class Checkpointer:
  """Saves and restores meshnet checkpoints under ``directory``.

  Opening takes the directory for this run (process 0 locks it) and sets
  aside junk step directories. A directory that already holds checkpoints is
  refused unless ``resume`` (continue them) or ``overwrite`` (replace them:
  the old steps are deleted when this run saves its first step, so a run
  that fails before saving anything loses nothing). Use it as a context
  manager, or call :meth:`close`: closing waits for the save in flight.

  Args:
    directory: where step directories live (created if missing); a local
      path or a URL Orbax can write (``gs://bucket/run``).
    keep: how many newest checkpoints to keep.
    async_save: write in the background (the step loop waits only for the
      copy of the arrays off the devices).
    log: where to report skipped, set aside or replaced checkpoints.
    resume: the run continues the checkpoints in ``directory``.
    overwrite: the run replaces the checkpoints in ``directory``.
    progress: on a terminal, count the seconds of a restore (process 0).

  Raises:
    MeshnetError: bad ``keep``, a file or unreachable directory, one that
      another run holds, or one with checkpoints and neither ``resume`` nor
      ``overwrite``.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
               async_save: bool = True, log: Callable[[str], None] = print,
               resume: bool = False, overwrite: bool = False, progress: bool = True):
    if keep < 1:
      raise MeshnetError(f"keep={keep} must be >= 1")
    if resume and overwrite:
      raise MeshnetError(f"resume and overwrite of {directory} exclude each other; use "
                         "--resume to continue the checkpoints or --overwrite to replace them")
    self.directory = checkpoint_path(directory)
    self.log = log
    self.progress = progress
    self.manager = None
    self._saving: int | None = None  # the step of the save in flight
    self._lock_fd: int | None = None
    self._replace: list[int] = []
    self._main = jax.process_index() == 0
    try:
      self._open(keep, async_save, refuse_used=not (resume or overwrite))
      self._refuse_or_replace(resume, overwrite)
    except BaseException:
      self.close()
      raise

  def _open(self, keep: int, async_save: bool, refuse_used: bool) -> None:
    try:
      if self.directory.exists() and not self.directory.is_dir():
        raise MeshnetError(f"checkpoint directory {self.directory} is a file; choose a "
                           "directory")
      if self._main:
        self.directory.mkdir(parents=True, exist_ok=True)
    except (OSError, ImportError) as e:  # ImportError: gcsfs missing for gs://
      raise MeshnetError(f"cannot open checkpoint directory {self.directory}: "
                         f"{_first_line(e)}") from None
    _sync("meshnet-checkpoint-created")  # the others look only once process 0 made it
    if _is_local(self.directory) and not os.access(self.directory, os.R_OK | os.W_OK):
      raise MeshnetError(f"checkpoint directory {self.directory} is not readable and "
                         "writable")
    if self._main:
      self._lock()
    _sync("meshnet-checkpoint-locked")
    junk = self._junk_steps()
    if refuse_used:  # before anything is moved
      self._refuse_used([int(p.name) for p in self.directory.iterdir()
                         if p.name.isdigit() and p.name not in junk])
    if self._main:
      for name in junk:
        self._set_aside(name, "is not a complete checkpoint")
    _sync("meshnet-checkpoint-open")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    if not verbose_from_env():
      quiet_disk_full_logs()  # Orbax logs a full disk thrice; meshnet says it once

  def _lock(self) -> None:
    """Takes ``<dir>/.meshnet.lock`` (local directories only)."""
    if not _is_local(self.directory):
      return
    fd = os.open(os.path.join(self.directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise MeshnetError(f"checkpoint directory {self.directory} is in use by another run "
                         f"({owner}); wait for it to end or choose another "
                         "--checkpoint-dir") from None
    except OSError as e:  # a file system without locks: run unlocked, say so
      os.close(fd)
      self.log(f"cannot lock {self.directory} ({_first_line(e, 80)}); a second run on it "
               "would not be detected")
      return
    self._lock_fd = fd
    os.ftruncate(fd, 0)
    try:
      os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    except OSError as e:
      if is_disk_full(e):  # refused now rather than at the first save
        raise disk_full_error(self.directory, None) from None
      raise

  def _junk_steps(self) -> list[str]:
    """Step directories without a ``meta/metadata`` file or ``state`` item.

    Raises:
      MeshnetError: a step-named directory holds other files (not Orbax's):
        the directory is not only meshnet's.
    """
    junk = []
    if not self.directory.is_dir():
      return junk
    for path in self.directory.iterdir():
      if not (path.name.isdigit() and path.is_dir()):
        continue
      if _is_step_dir(path):
        continue
      contents = {child.name for child in path.iterdir()}
      if contents and not contents & {"meta", "state", "_CHECKPOINT_METADATA"}:
        raise MeshnetError(f"{path} is not a meshnet checkpoint; use a directory that only "
                           "meshnet writes to")
      junk.append(path.name)
    return junk

  def _set_aside(self, name: str, why: str) -> None:
    """Renames step directory ``name`` to ``<name>.corrupt`` (process 0)."""
    target = self.directory / f"{name}{CORRUPT_SUFFIX}"
    n = 1
    while target.exists():
      n += 1
      target = self.directory / f"{name}{CORRUPT_SUFFIX}-{n}"
    try:
      (self.directory / name).rename(target)
    except OSError as e:
      self.log(f"checkpoint step {name} in {self.directory} {why} but could not be set "
               f"aside ({_first_line(e, 80)})")
      return
    self.log(f"checkpoint step {name} in {self.directory} {why}; moved to {target.name}")

  def _refuse_used(self, steps: list[int]) -> None:
    if steps:
      raise MeshnetError(f"checkpoint directory {self.directory} already holds checkpoints "
                         f"(steps {', '.join(map(str, sorted(steps)))}); continue them with "
                         "--resume, choose another --checkpoint-dir, or replace them with "
                         "--overwrite")

  def _refuse_or_replace(self, resume: bool, overwrite: bool) -> None:
    steps = self.all_steps()
    if not steps or resume:
      return
    if not overwrite:
      self._refuse_used(steps)
    listed = ", ".join(map(str, steps))
    self._replace = steps
    self.log(f"--overwrite: checkpoints {listed} in {self.directory} will be deleted when "
             "this run saves its first step")

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def partial_steps(self) -> list[str]:
    """Names of step directories a killed save left unfinished."""
    if not self.directory.is_dir():
      return []
    return sorted(p.name for p in self.directory.iterdir() if "orbax-checkpoint-tmp" in p.name)

  def _move_replaced(self) -> list[epath.Path]:
    """Renames the steps ``overwrite`` replaces to ``<step>.replaced`` (and
    deletes unfinished saves); returns the renamed directories."""
    moved = []
    if self._main:
      for step in self._replace:
        target = self.directory / f"{step}{REPLACED_SUFFIX}"
        if target.exists():
          target.rmtree()
        (self.directory / str(step)).rename(target)
        moved.append(target)
      for name in self.partial_steps():
        (self.directory / name).rmtree()
    _sync("meshnet-checkpoint-replaced")
    self.manager.reload()
    return moved

  def save(self, step: int, tree: dict[str, Any], meta: dict[str, Any],
           force: bool = False) -> bool:
    """Starts saving ``tree`` (logical layout) as ``step``; returns whether it did.

    With ``overwrite``, the first save renames the old steps to
    ``<step>.replaced``, waits until the new step is on disk, and only then
    deletes them: a run killed in between leaves them there.
    """
    meta = {"format": FORMAT, "step": int(step), "params": tree_summary(tree["params"]),
            "opt_state": tree_summary(tree["opt_state"]), "digest": state_digest(tree), **meta}
    self.wait()  # the previous save's error (a full disk) surfaces here, named for its step
    replaced = self._move_replaced() if self._replace else None
    with self._reporting_disk_full(int(step)), _quiet_closed_event_loop():
      saved = self.manager.save(
          int(step), force=force,
          args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                  meta=ocp.args.JsonSave(meta)))
    if saved:
      self._saving = int(step)
    if replaced is not None:
      self.wait()
      for path in replaced:
        path.rmtree()
      _sync("meshnet-checkpoint-replaced-deleted")
      self.log(f"deleted the earlier checkpoints {', '.join(map(str, self._replace))} in "
               f"{self.directory} (--overwrite), after step {step} was saved")
      self._replace = []
    return saved

  def wait(self) -> None:
    """Blocks until the last asynchronous save is on disk.

    Raises:
      DiskFullError: that save ran out of space (its unfinished step is
        removed; the earlier steps are intact).
    """
    with self._reporting_disk_full(self._saving):
      self.manager.wait_until_finished()
    self._saving = None

  @contextlib.contextmanager
  def _reporting_disk_full(self, step: int | None) -> Iterator[None]:
    """Turns a full-disk error of the save of ``step`` into a
    :class:`~meshnet.errors.DiskFullError`; other errors pass."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - Orbax wraps the OSError in its own types
      if step is None or not is_disk_full(e):
        raise
      self._saving = None
      quiet_abandoned_writes()
      raise self._disk_full(step) from None

  def _disk_full(self, step: int):
    """The error for ``step``'s failed save, once its unfinished directory is
    removed (process 0; it holds nothing usable and takes the space) and the
    steps ``overwrite`` was replacing are back in place."""
    if self._main:
      for name in self.partial_steps():
        if name.split(".")[0] == str(step):
          with contextlib.suppress(OSError):
            (self.directory / name).rmtree()
      for old in self._replace:  # renamed <step>.replaced, deleted only once a step is saved
        with contextlib.suppress(OSError):
          (self.directory / f"{old}{REPLACED_SUFFIX}").rename(self.directory / str(old))
    with contextlib.suppress(Exception):
      self.manager.reload()
    kept = [int(p.name) for p in _step_dirs(self.directory)]
    return disk_full_error(self.directory, step, max(kept) if kept else None,
                           replacing=bool(self._replace))

  def read_meta(self, step: int) -> dict[str, Any]:
    """The checked meta JSON of ``step`` (see :func:`read_meta`)."""
    return read_meta(self.directory / str(step))

  def restore_latest(self, target: dict[str, Any], config: dict[str, Any] | None = None, *,
                     data: dict[str, Any] | None = None,
                     allow_data_change: bool = False) -> Restored | None:
    """The newest step that restores, laid out like ``target``, or ``None``.

    ``target`` is the logical tree of the current run (its arrays' shapes,
    dtypes and shardings say how to lay out what is read). Unfinished steps
    are ignored; a step whose meta or arrays fail to read is reported, moved
    to ``<step>.corrupt`` and the next older one is tried. A step whose values
    do not match the digest in its meta (silent corruption: a flipped bit
    that Orbax reads without error) is treated the same; a step saved before
    meta kept a digest restores unverified.

    Args:
      target: the run's state in the logical layout.
      config: the run's ``Config.to_dict()``; the fields in
        :data:`STATE_FIELDS` must equal the checkpoint's.
      data: the run's :func:`meshnet.data.fingerprint`; compared with the
        one in the step's meta (a step saved before meta kept one is not
        checked).
      allow_data_change: restore even when ``data`` differs (logged once).

    Raises:
      MeshnetError: the checkpoint was saved by another model or run (naming
        the leaves or the config fields with both values), or on other data
        (naming the split and what changed) without ``allow_data_change``;
        nothing is moved.
    """
    partial = self.partial_steps()
    if partial:
      self.log(f"ignoring unfinished checkpoint {', '.join(partial)} in {self.directory}")
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
    bad: list[tuple[int, str]] = []
    try:
      for step in reversed(self.all_steps()):
        try:
          meta = self.read_meta(step)
        except MeshnetError as e:
          if "is not a meshnet checkpoint" in str(e):
            raise
          bad.append((step, f"is unreadable: {e}"))
          continue
        problem = _fit_problem(meta, target, config)
        if problem:
          raise MeshnetError(f"checkpoint {step} in {self.directory} {problem}; resume with "
                             "the same settings, or start afresh with another "
                             "--checkpoint-dir or --overwrite")
        changed = data_change(meta.get("data"), data) if data is not None else None
        if changed and not allow_data_change:
          raise MeshnetError(f"the data changed since checkpoint {step} in {self.directory} "
                             f"was saved ({changed}); resume on the data it was saved with, "
                             "or pass --allow-data-change to continue on this data")
        try:
          restored = self._timed_restore(step, abstract)
        except Exception as e:  # noqa: BLE001 - whatever Orbax raised: report, try older
          if "tree structures do not match" in str(e):  # a valid step of another run
            raise MeshnetError(f"checkpoint {step} in {self.directory} holds a state of "
                               "another structure (another optimizer or model); resume "
                               "with the same settings") from None
          problem = _restore_problem(e)
          if problem is None:
            raise MeshnetError(f"cannot restore checkpoint {step} in {self.directory}: "
                               f"{_first_line(e)}; the step is kept") from None
          bad.append((step, problem))
          continue
        problem = digest_problem(meta.get("digest"), restored["state"])
        if problem:
          bad.append((step, problem))
          continue
        if changed:
          self.log(f"the data changed since checkpoint {step} was saved ({changed}); "
                   "continuing on this data (--allow-data-change)")
        return Restored(step, restored["state"], meta)
      return None
    finally:
      self._set_aside_failed(bad)

  def _timed_restore(self, step: int, abstract: Any) -> dict[str, Any]:
    """:meth:`_restore`, saying what it reads before and how long it took after
    (a large state takes a while)."""
    nbytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                 for a in jax.tree.leaves(abstract))
    self.log(f"restoring checkpoint {step} ({_megabytes(nbytes)}) from {self.directory}")
    began = time.perf_counter()
    with Ticker(f"restoring checkpoint {step}", enabled=self.progress and self._main):
      restored = self._restore(step, abstract)
    seconds = time.perf_counter() - began
    self.log(f"restored checkpoint {step} in {seconds:.1f}s "
             f"({nbytes / 1e6 / max(seconds, 1e-9):,.0f} MB/s)")
    return restored

  def _restore(self, step: int, abstract: Any) -> dict[str, Any]:
    """Orbax's restore of ``step``'s state, with signals held back, tried a
    second time before a failure counts (a transient read error must not
    set a good step aside)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    with _deferred_signals(), _quiet_closed_event_loop():
      try:
        return self.manager.restore(step, args=args)
      except Exception as e:  # noqa: BLE001
        if "tree structures do not match" in str(e):
          raise
        return self.manager.restore(step, args=args)

  def _set_aside_failed(self, bad: list[tuple[int, str]]) -> None:
    if not bad:
      return
    if self._main:
      for step, why in bad:
        self._set_aside(str(step), why)
    _sync("meshnet-checkpoint-set-aside")
    self.manager.reload()

  def close(self) -> None:
    """Waits for the save in flight, closes Orbax's manager, drops the lock."""
    try:
      if self.manager is not None:
        try:
          self.wait()
        finally:
          manager, self.manager = self.manager, None
          manager.close()
    finally:
      if self._lock_fd is not None:
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = None

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """Finishes the save in flight on every exit. It holds a good state (the
    loop checks the loss before every save). When the run is already failing,
    a failure of that save is logged in one line, not raised over the
    run's own error."""
    if exc_type is None:
      self.close()
      return
    try:
      self.close()
    except Exception as e:  # noqa: BLE001 - keep the run's own exception
      self.log(f"the checkpoint save in flight in {self.directory} failed: {_first_line(e)}")


def _megabytes(nbytes: int) -> str:
  return f"{nbytes / 1e6:,.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:,.1f} kB"


def _is_step_dir(path: epath.Path) -> bool:
  """A directory that holds a whole step: ``<step>/meta/metadata`` and
  ``<step>/state`` (whether their contents read is another question)."""
  return (path.name.isdigit() and path.is_dir() and (path / "meta" / "metadata").exists()
          and (path / "state").is_dir())


def _step_dirs(directory: epath.Path) -> list[epath.Path]:
  return [p for p in directory.iterdir() if _is_step_dir(p)]


def list_checkpoints(directory: str | os.PathLike) -> list[dict[str, Any]]:
  """``[{"step", "time", "bytes"}]`` of the finished checkpoints in ``directory``.

  Raises:
    MeshnetError: the directory is missing, unreadable, or holds no meshnet
      checkpoint.
  """
  path = checkpoint_path(directory)
  try:
    if not path.is_dir():
      raise MeshnetError(f"{directory} is not a directory")
    if _is_local(path) and not os.access(path, os.R_OK | os.X_OK):
      raise MeshnetError(f"{directory} is not readable")
    rows = []
    for step_dir in _step_dirs(path):
      size = sum(file.stat().length for root, _, files in step_dir.walk()
                 for file in (root / name for name in files))
      rows.append({"step": int(step_dir.name), "time": step_dir.stat().mtime, "bytes": size})
  except (OSError, ImportError) as e:
    raise MeshnetError(f"cannot read {directory}: {_first_line(e)}") from None
  if not rows:
    raise MeshnetError(f"{directory} holds no meshnet checkpoint (no <step>/meta)")
  return sorted(rows, key=lambda r: r["step"])


def saved_config(directory: str | os.PathLike) -> dict[str, Any] | None:
  """``Config.to_dict()`` of the newest step in ``directory`` whose meta reads;
  ``None`` when there is none (no directory, no checkpoint, unreadable
  metas: resuming reports those). Cheap: reads JSON only."""
  try:
    path = checkpoint_path(directory)
    if not path.is_dir():
      return None
    steps = sorted((int(p.name) for p in _step_dirs(path)), reverse=True)
  except (OSError, ImportError, MeshnetError):
    return None
  for step in steps:
    try:
      config = read_meta(path / str(step)).get("config")
    except MeshnetError:
      continue
    return config if isinstance(config, dict) else None
  return None


def load_params(directory: str | os.PathLike, step: int) -> Any:
  """The parameters (logical layout) of checkpoint ``step``, on one device."""
  return load_state(directory, step)["params"]


def load_state(directory: str | os.PathLike, step: int) -> dict[str, Any]:
  """The whole logical state of checkpoint ``step`` (``{"step", "rng",
  "params", "opt_state"}``), on one device.

  Raises:
    MeshnetError: the arrays do not read (one line).
  """
  path = checkpoint_path(directory) / str(step) / "state"
  checkpointer = ocp.StandardCheckpointer()
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # item-level reads warn of step-level metadata
  try:
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    device = jax.devices()[0]
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(device)),
        tree)
    with _quiet_closed_event_loop():
      return checkpointer.restore(path, abstract)
  except Exception as e:  # noqa: BLE001 - one line, whatever Orbax raised
    raise MeshnetError(f"cannot read checkpoint {step} in {directory}: "
                       f"{_first_line(e)}") from None
  finally:
    checkpointer.close()
    absl_logger.setLevel(level)


def _readable_meta(directory: str | os.PathLike, steps: list[int],
                   step: int | None) -> tuple[int, dict[str, Any], list[str]]:
  """The step to describe (``step``, or the newest whose meta reads), its
  meta, and one note per newer step skipped.

  Raises:
    MeshnetError: ``step`` is not there or unreadable, or no meta reads.
  """
  path = checkpoint_path(directory)
  if step is not None:
    if step not in steps:
      raise MeshnetError(f"no checkpoint {step} in {directory}; steps: "
                         f"{', '.join(map(str, steps))}")
    try:
      return step, read_meta(path / str(step)), []
    except MeshnetError as e:
      raise MeshnetError(f"checkpoint {step} in {directory}: {e}") from None
  notes = []
  for candidate in reversed(steps):
    try:
      meta = read_meta(path / str(candidate))
    except MeshnetError as e:
      if "is not a meshnet checkpoint" in str(e):
        raise
      notes.append(str(e))
      continue
    if notes:
      notes = [f"skipping {'; '.join(notes)}; showing step {candidate}"]
    return candidate, meta, notes
  raise MeshnetError(f"no readable checkpoint in {directory}: {'; '.join(notes)}")


def newest_meta(directory: str | os.PathLike, step: int | None = None
                ) -> tuple[int, dict[str, Any]]:
  """``(step, meta)`` of checkpoint ``step`` in ``directory``, or of the
  newest one whose meta reads (what ``meshnet inspect`` and ``meshnet
  sample`` show).

  Raises:
    MeshnetError: no checkpoint there, ``step`` missing or unreadable, or no
      meta reads.
  """
  rows = list_checkpoints(directory)
  step, meta, _ = _readable_meta(directory, [row["step"] for row in rows], step)
  return step, meta


def describe(directory: str | os.PathLike, *, with_digest: bool = False,
             step: int | None = None) -> str:
  """What ``meshnet inspect`` prints: the checkpoints, then the parameter
  tree of ``step`` (default: the newest whose meta reads, with a line for
  each newer one skipped) and, optionally, its digest."""
  import datetime

  rows = list_checkpoints(directory)
  lines = [f"{len(rows)} checkpoint{'s' * (len(rows) != 1)} in "
           f"{checkpoint_path(directory)}:"]
  for row in rows:
    when = datetime.datetime.fromtimestamp(row["time"]).strftime("%Y-%m-%d %H:%M:%S")
    lines.append(f"  step {row['step']:>8}  {when}  {row['bytes'] / 2**20:8.2f} MiB")
  step, meta, notes = _readable_meta(directory, [row["step"] for row in rows], step)
  lines += notes
  lines.append(f"parameters of step {step} (mesh {meta.get('mesh')}):")
  total = 0
  for leaf in meta["params"]:
    total += int(np.prod(leaf["shape"]))
    lines.append(f"  {leaf['path']:<24} {str(tuple(leaf['shape'])):<16} {leaf['dtype']}")
  lines.append(f"  {total:,} parameters")
  if with_digest:
    lines.append(f"digest {digest(load_params(directory, step))}")
  return "\n".join(lines)


def verify_step(directory: str | os.PathLike, step: int) -> tuple[str, str]:
  """``(verdict, detail)`` for checkpoint ``step``: ``"ok"`` (values match
  the digest in its meta), ``"unverified"`` (its meta has no digest: saved
  before meshnet kept one; its arrays read), ``"mismatch"`` or
  ``"unreadable"`` (meta or arrays)."""
  try:
    meta = read_meta(checkpoint_path(directory) / str(step))
    state = load_state(directory, step)
  except MeshnetError as e:
    return "unreadable", str(e)
  saved = meta.get("digest")
  if not isinstance(saved, dict) or saved.get("method") != DIGEST_METHOD:
    return "unverified", "no digest in its meta (saved by an older meshnet); its arrays read"
  problem = digest_problem(saved, state)
  if problem:
    return "mismatch", problem
  return "ok", f"digest {saved.get('value', '')[:16]}"


def verify(directory: str | os.PathLike, *, step: int | None = None) -> tuple[str, bool]:
  """What ``meshnet inspect DIR --verify`` prints (one line per step, then a
  summary) and whether every step (or ``step``) is good: each step's arrays
  are read and compared with the digest its meta keeps.

  Raises:
    MeshnetError: no checkpoint in ``directory``, or no ``step`` there.
  """
  steps = [row["step"] for row in list_checkpoints(directory)]
  if step is not None:
    if step not in steps:
      raise MeshnetError(f"no checkpoint {step} in {directory}; steps: "
                         f"{', '.join(map(str, steps))}")
    steps = [step]
  lines, bad = [], []
  for number in steps:
    verdict, detail = verify_step(directory, number)
    lines.append(f"step {number:>8}  {verdict:<10}  {detail}")
    if verdict in ("mismatch", "unreadable"):
      bad.append(number)
  where = checkpoint_path(directory)
  if bad:
    lines.append(f"{len(bad)} of {len(steps)} checkpoint{'s' * (len(steps) != 1)} in {where} "
                 f"bad: step {', '.join(map(str, bad))}")
  else:
    lines.append(f"{len(steps)} checkpoint{'s' * (len(steps) != 1)} in {where} verified")
  return "\n".join(lines), not bad
