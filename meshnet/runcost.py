"""What a run costs on each device: the bytes of its parameters, optimizer
state and train-step temporaries, and the parameter table of
``meshnet train --show-sharding``.

Every byte count is measured from the arrays themselves (each leaf's
``addressable_shards``: which device holds which slice), never from what a
mesh is expected to do with them, so it holds for any layout: replicated
(``data``), split (``fsdp``, ``tensor``), pipelined, or one a user built by
hand. With several processes each process sees only its own devices' shards:
the figures are this process's, and "per device" means the most any one of
its devices holds (on an SPMD mesh every process's devices hold about the
same).

The temporaries are XLA's own figure for the compiled step
(``compiled.memory_analysis().temp_size_in_bytes``): what the program
allocates beyond its arguments and outputs, per device.

``meshnet train`` writes :func:`run_record` as the first record of its
metrics file and prints :func:`format_run_record` under its start-of-run
lines::

    memory per device: parameters 25.7 KiB, optimizer state 51.5 KiB, train step
    temporaries 306.6 KiB (the most on one of the 8 devices)

(one line; ``meshnet train --mesh fsdp=8`` on the default MLP).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding

RUN_KIND = "run"  # the ``kind`` of the run record; metrics records have no ``kind``


class ParamRow(NamedTuple):
  """One parameter of :func:`param_table`.

  Attributes:
    path: where the leaf sits in the parameter tree
      (``jax.tree_util.keystr``), e.g. ``[0]['w']``.
    shape: the global shape.
    dtype: the dtype's name, e.g. ``float32``.
    spec: how the array is laid out: its ``PartitionSpec`` as JAX writes it
      (``P('fsdp', 'tensor')``) for a ``NamedSharding``; ``replicated`` or the
      sharding's class name otherwise; ``host`` for a leaf that is not a
      ``jax.Array``.
    bytes_per_device: the most bytes of this leaf any one of this process's
      devices holds.
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  spec: str
  bytes_per_device: int


def _shard_bytes(shape: tuple[int, ...], index: tuple[slice, ...], itemsize: int) -> int:
  """Bytes of the slice ``index`` of an array of ``shape`` (no data touched)."""
  sizes = [len(range(*s.indices(dim))) for s, dim in zip(index, shape)]
  return int(np.prod(sizes, dtype=np.int64)) * itemsize


def device_bytes(tree: Any) -> dict[jax.Device, int]:
  """Bytes each of this process's devices holds of ``tree``'s arrays.

  Counted from each ``jax.Array`` leaf's ``addressable_shards`` (the slice
  each local device holds), so a replicated leaf counts in full on every
  device and a split one only its slice. Leaves that are not ``jax.Array``
  (numpy arrays, Python numbers) live on the host and count nothing.
  Only shapes and shardings are read: it works on arrays already donated.

  Returns:
    ``{device: bytes}`` over the local devices that hold any of the arrays.
  """
  held: dict[jax.Device, int] = defaultdict(int)
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array):
      continue
    itemsize = np.dtype(leaf.dtype).itemsize
    for shard in leaf.addressable_shards:
      held[shard.device] += _shard_bytes(leaf.shape, shard.index, itemsize)
  return dict(held)


def bytes_per_device(tree: Any) -> int:
  """The most bytes of ``tree``'s arrays that any one of this process's
  devices holds (0 for a tree without arrays); see :func:`device_bytes`.

  E.g. an Adam state on ``fsdp=8`` whose widths divide by 8: ``1/8`` of its
  total; on ``data=8``: all of it.
  """
  return max(device_bytes(tree).values(), default=0)


def total_bytes(tree: Any) -> int:
  """Bytes of ``tree``'s arrays counted once each (their global size)."""
  return sum(int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype"))


def spec_text(leaf: Any) -> str:
  """How ``leaf`` is laid out, as :attr:`ParamRow.spec` says."""
  if not isinstance(leaf, jax.Array):
    return "host"
  sharding = leaf.sharding
  if isinstance(sharding, NamedSharding):
    return repr(sharding.spec)
  if sharding.is_fully_replicated:
    return "replicated"
  return type(sharding).__name__


def param_table(params: Any) -> list[ParamRow]:
  """One :class:`ParamRow` per leaf of ``params``, in tree order.

  Args:
    params: a parameter pytree of ``jax.Array`` s (e.g. ``state.params``).
  """
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not hasattr(leaf, "dtype"):  # a Python number
      leaf = np.asarray(leaf)
    rows.append(ParamRow(
        path=jax.tree_util.keystr(path),
        shape=tuple(int(d) for d in leaf.shape),
        dtype=str(np.dtype(leaf.dtype)),
        spec=spec_text(leaf),
        bytes_per_device=bytes_per_device(leaf),
    ))
  return rows


def format_bytes(nbytes: int | float | None) -> str:
  """``nbytes`` in binary units: ``512 B``, ``49.6 KiB``, ``0.98 MiB``,
  ``2.00 GiB``; ``?`` for ``None``."""
  if nbytes is None:
    return "?"
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if nbytes >= scale * 1000 / 1024:  # 0.98 MiB, not 1005.2 KiB
      value = nbytes / scale
      return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
  return f"{int(nbytes)} B"


def format_param_table(params: Any) -> str:
  """The table ``--show-sharding`` prints: each parameter's path, shape,
  dtype, ``PartitionSpec`` and bytes per device, then a total line (the
  parameters' count, their bytes per device, :func:`bytes_per_device`, and
  in all)."""
  rows = param_table(params)
  header = ("parameter", "shape", "dtype", "spec", "bytes per device")
  cells = [(r.path, str(r.shape), r.dtype, r.spec, format_bytes(r.bytes_per_device))
           for r in rows]
  widths = [max(len(c[i]) for c in [header, *cells]) for i in range(4)]

  def line(c: tuple[str, ...]) -> str:
    return "  ".join(text.ljust(w) for text, w in zip(c[:4], widths)) + "  " + c[4]

  count = sum(int(np.prod(r.shape, dtype=np.int64)) for r in rows)
  total = (f"total: {len(rows)} arrays, {count:,} parameters, "
           f"{format_bytes(bytes_per_device(params))} per device "
           f"({format_bytes(total_bytes(params))} in all)")
  return "\n".join([line(header), *map(line, cells), total])


def temp_bytes(compiled: Any) -> int | None:
  """XLA's temporary bytes per device of a compiled program
  (``memory_analysis().temp_size_in_bytes``), or ``None`` when the backend
  does not say.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``).
  """
  try:
    analysis = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  value = getattr(analysis, "temp_size_in_bytes", None)
  return None if value is None else int(value)


def run_record(mesh: jax.sharding.Mesh, state: Any, compiled: Any | None = None
               ) -> dict[str, Any]:
  """What the run costs, as the first record of ``--metrics-file``.

  Args:
    mesh: the run's mesh.
    state: the train state (``params``, ``opt_state``) as the step takes it,
      before the step donates it (only shapes and shardings are read).
    compiled: the compiled train step; ``None`` (nothing was compiled)
      leaves ``temp_bytes_per_device`` ``None``.

  Returns:
    ``kind`` (``"run"``), ``mesh`` (axis sizes), ``devices``, ``processes``,
    ``device_kind``, ``params`` (the parameter count), ``param_bytes`` (in
    all), and per device (the most on one of this process's devices)
    ``param_bytes_per_device``, ``opt_state_bytes_per_device`` and
    ``temp_bytes_per_device`` (the compiled step's temporaries, XLA's figure).
  """
  params = state.params
  return {
      "kind": RUN_KIND,
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "devices": int(mesh.devices.size),
      "processes": len({d.process_index for d in mesh.devices.flat}),
      "device_kind": mesh.devices.flat[0].device_kind,
      "params": sum(int(np.prod(p.shape, dtype=np.int64)) for p in jax.tree.leaves(params)),
      "param_bytes": total_bytes(params),
      "param_bytes_per_device": bytes_per_device(params),
      "opt_state_bytes_per_device": bytes_per_device(state.opt_state),
      "temp_bytes_per_device": temp_bytes(compiled) if compiled is not None else None,
  }


def is_run_record(record: Any) -> bool:
  """Whether a metrics-file record is a run record (not a step's metrics)."""
  return isinstance(record, dict) and record.get("kind") == RUN_KIND


def format_run_record(record: dict[str, Any]) -> str:
  """The line ``meshnet train`` prints for :func:`run_record`."""
  devices, processes = record["devices"], max(record["processes"], 1)
  temp = record["temp_bytes_per_device"]
  temp_text = ("train step not compiled" if temp is None
               else f"train step temporaries {format_bytes(temp)}")
  if processes > 1 and devices // processes > 1:
    where = f"the most on one of this process's {devices // processes} devices"
  elif processes > 1:
    where = "this process's device"
  elif devices > 1:
    where = f"the most on one of the {devices} devices"
  else:
    where = "one device"
  return (f"memory per device: parameters {format_bytes(record['param_bytes_per_device'])}, "
          f"optimizer state {format_bytes(record['opt_state_bytes_per_device'])}, "
          f"{temp_text} ({where})")
