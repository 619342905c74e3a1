"""Checkpoints with Orbax, in a mesh-independent (logical) layout.

A checkpoint step directory holds two items:

  ``state``  the training state as ``{"step", "rng", "params", "opt_state"}``
             with parameters (and the optimizer's state) in the model's own
             tree, one entry per layer, whatever the mesh or pipeline.
  ``meta``   JSON: format tag, step, data-sampler position, the parameter
             tree (paths, shapes, dtypes), the mesh and the config.

Saving is asynchronous (the step loop only waits for the device-to-host
copy); Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames when the
step is complete, so a killed save leaves the previous steps intact and the
partial directory is ignored. A step that fails to restore (a truncated or
missing file) is reported and the next older one is tried.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from meshnet.errors import MeshnetError

FORMAT = "meshnet-checkpoint-1"


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


@dataclasses.dataclass
class Restored:
  """A restored checkpoint: its step, logical state tree and metadata."""

  step: int
  tree: dict[str, Any]
  meta: dict[str, Any]


class Checkpointer:
  """Saves and restores meshnet checkpoints under ``directory``.

  Args:
    directory: where step directories live (created if missing).
    keep: how many newest checkpoints to keep.
    async_save: write in the background (the step loop waits only for the
      copy of the arrays off the devices).
    log: where to report skipped partial or corrupt checkpoints.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               log: Callable[[str], None] = print):
    if keep < 1:
      raise MeshnetError(f"keep={keep} must be >= 1")
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise MeshnetError(f"checkpoint directory {directory} is a file; choose a directory")
    if os.path.isdir(self.directory) and not os.access(self.directory, os.R_OK | os.W_OK):
      raise MeshnetError(f"checkpoint directory {directory} is not readable and writable")
    self.log = log
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def partial_steps(self) -> list[str]:
    """Names of step directories a killed save left unfinished."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(name for name in os.listdir(self.directory) if "tmp" in name)

  def save(self, step: int, tree: dict[str, Any], meta: dict[str, Any],
           force: bool = False) -> bool:
    """Starts saving ``tree`` (logical layout) as ``step``; returns whether it did."""
    meta = {"format": FORMAT, "step": int(step), "params": tree_summary(tree["params"]),
            **meta}
    return self.manager.save(
        int(step), force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    """Blocks until the last asynchronous save is on disk."""
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return meta["meta"]

  def restore_latest(self, target: dict[str, Any]) -> Restored | None:
    """The newest step that restores, laid out like ``target``, or ``None``.

    ``target`` is the logical tree of the current run (its arrays' shapes,
    dtypes and shardings say how to lay out what is read). Unfinished steps
    are ignored; a step that fails to read is reported and skipped.

    Raises:
      MeshnetError: the saved parameter tree differs from ``target``'s
        (naming the leaves), or the directory holds no meshnet checkpoint
        but other step directories.
    """
    partial = self.partial_steps()
    if partial:
      self.log(f"ignoring unfinished checkpoint {', '.join(partial)} in {self.directory}")
    expected = tree_summary(target["params"])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
    for step in reversed(self.all_steps()):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # noqa: BLE001 - report any unreadable step, try older
        self.log(f"checkpoint step {step} in {self.directory} is unreadable "
                 f"({type(e).__name__}); trying an older one")
        continue
      if meta.get("format") != FORMAT:
        raise MeshnetError(f"{self.directory} step {step} is not a meshnet checkpoint")
      mismatch = _describe_mismatch(meta["params"], expected)
      if mismatch:
        raise MeshnetError(f"checkpoint in {self.directory} does not fit this model: "
                           f"{mismatch}")
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
      except Exception as e:  # noqa: BLE001
        self.log(f"checkpoint step {step} in {self.directory} is corrupt "
                 f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); trying an "
                 "older one")
        continue
      return Restored(step, restored["state"], meta)
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def list_checkpoints(directory: str) -> list[dict[str, Any]]:
  """``[{"step", "time", "bytes"}]`` of the finished checkpoints in ``directory``.

  Raises:
    MeshnetError: the directory is missing, unreadable, or holds no meshnet
      checkpoint.
  """
  if not os.path.isdir(directory):
    raise MeshnetError(f"{directory} is not a directory")
  if not os.access(directory, os.R_OK | os.X_OK):
    raise MeshnetError(f"{directory} is not readable")
  rows = []
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if not (name.isdigit() and os.path.isdir(path)):
      continue
    if not os.path.isdir(os.path.join(path, "meta")):
      continue
    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)
    rows.append({"step": int(name), "time": os.path.getmtime(path), "bytes": size})
  if not rows:
    raise MeshnetError(f"{directory} holds no meshnet checkpoint (no <step>/meta)")
  return sorted(rows, key=lambda r: r["step"])


def load_params(directory: str, step: int) -> Any:
  """The parameters (logical layout) of checkpoint ``step``, on one device."""
  path = os.path.join(os.path.abspath(directory), str(step), "state")
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
    return checkpointer.restore(path, abstract)["params"]
  except Exception as e:  # noqa: BLE001 - one line, whatever Orbax raised
    raise MeshnetError(f"cannot read checkpoint {step} in {directory}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
  finally:
    checkpointer.close()
    absl_logger.setLevel(level)


def describe(directory: str, *, with_digest: bool = False, step: int | None = None) -> str:
  """What ``meshnet inspect`` prints: the checkpoints, then the parameter
  tree of ``step`` (default: the newest) and, optionally, its digest."""
  import datetime

  rows = list_checkpoints(directory)
  lines = [f"{len(rows)} checkpoint{'s' * (len(rows) != 1)} in {os.path.abspath(directory)}:"]
  for row in rows:
    when = datetime.datetime.fromtimestamp(row["time"]).strftime("%Y-%m-%d %H:%M:%S")
    lines.append(f"  step {row['step']:>8}  {when}  {row['bytes'] / 2**20:8.2f} MiB")
  step = rows[-1]["step"] if step is None else step
  if step not in {row["step"] for row in rows}:
    raise MeshnetError(f"no checkpoint {step} in {directory}; steps: "
                       f"{', '.join(str(r['step']) for r in rows)}")
  with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
    import json
    meta = json.load(f)
  lines.append(f"parameters of step {step} (mesh {meta.get('mesh')}):")
  total = 0
  for leaf in meta["params"]:
    total += int(np.prod(leaf["shape"]))
    lines.append(f"  {leaf['path']:<24} {str(tuple(leaf['shape'])):<16} {leaf['dtype']}")
  lines.append(f"  {total:,} parameters")
  if with_digest:
    lines.append(f"digest {digest(load_params(directory, step))}")
  return "\n".join(lines)
