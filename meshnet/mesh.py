"""Device meshes with meshnet's four named axes.

Every meshnet mesh has the same four axes, in this order (outermost first):

  ``data``    the batch is split; gradients are averaged with ``pmean``.
  ``fsdp``    parameters, optimizer state and the batch are split (ZeRO-3).
  ``stage``   layers are split into pipeline stages (``ppermute`` between).
  ``tensor``  a layer's matrices are split (Megatron column/row, ``psum``).

An axis of size 1 costs nothing, so code can always name all four. The order
puts ``tensor`` innermost, where devices are closest (fastest links), and
``data`` outermost.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from meshnet.errors import MeshnetError

DATA = "data"
FSDP = "fsdp"
STAGE = "stage"
TENSOR = "tensor"
AXES: tuple[str, ...] = (DATA, FSDP, STAGE, TENSOR)


def set_cpu_device_count(n: int) -> None:
  """Simulates ``n`` CPU devices; must run before JAX starts its backends.

  Only the CPU platform is affected: on a GPU or TPU host the accelerator
  devices are still the default devices. Calling it again with the count JAX
  already has is a no-op, so scripts and tests may both call it.

  Args:
    n: number of CPU devices, >= 1.

  Raises:
    MeshnetError: ``n < 1``, or JAX already started with another CPU count.
  """
  if n < 1:
    raise MeshnetError(f"devices={n} must be >= 1")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    have = len(jax.devices("cpu"))
    if have != n:
      raise MeshnetError(
          f"cannot simulate {n} CPU devices: JAX already started with {have}; "
          "set the device count before any JAX computation (or set XLA_FLAGS="
          f"--xla_force_host_platform_device_count={n} before starting Python)"
      ) from None


def select_devices(n: int | None) -> list[jax.Device]:
  """The devices a run with ``devices=n`` uses.

  ``None``: every device JAX has. On the CPU platform, ``n`` simulated
  devices: JAX is asked for ``n`` if its backends have not started yet, and
  the first ``n`` are used if it already has more (a notebook or test that
  started JAX with 8 can still run on 4). On GPUs and TPUs ``n`` is ignored:
  the accelerators are the devices.

  Raises:
    MeshnetError: ``n`` is not None or an integer >= 1, or JAX already
      started with fewer than ``n`` CPU devices.
  """
  if n is None:
    return list(jax.devices())
  if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
    raise MeshnetError(f"devices={n!r} must be an integer >= 1 (or None for every device)")
  try:
    set_cpu_device_count(n)
  except MeshnetError:
    pass  # already started with another count: use a subset below, if it can be
  devices = list(jax.devices())
  if devices[0].platform != "cpu" or jax.process_count() > 1:
    return devices  # several processes: n was each process's own count
  if len(devices) < n:
    raise MeshnetError(
        f"devices={n} but JAX already started with {len(devices)} CPU devices; set "
        "the device count before any JAX computation (e.g. call "
        f"meshnet.set_cpu_device_count({n}) right after import)"
    )
  return devices[:n]


def check_axis_sizes(**axes: int) -> None:
  """Checks axis names and sizes without a device count.

  Args:
    **axes: sizes by axis name (as for :func:`make_mesh`).

  Raises:
    MeshnetError: an unknown axis, a size that is not an integer (bools,
      floats and ``None`` included), a size < 1 other than -1, or more than
      one -1.
  """
  unknown = [name for name in axes if name not in AXES]
  if unknown:
    raise MeshnetError(
        f"unknown mesh axis {unknown[0]!r}; meshnet's axes are {', '.join(AXES)}"
    )
  for name, size in axes.items():
    if not isinstance(size, numbers.Integral) or isinstance(size, bool):
      raise MeshnetError(
          f"mesh axis size {name}={size!r} must be an integer >= 1, or -1 for the rest"
      )
  bad = [f"{n}={s}" for n, s in axes.items() if s < 1 and s != -1]
  if bad:
    raise MeshnetError(f"mesh axis size {bad[0]} must be >= 1, or -1 for the rest")
  rest = [name for name, size in axes.items() if size == -1]
  if len(rest) > 1:
    raise MeshnetError(
        f"only one mesh axis may be -1, got {', '.join(f'{n}=-1' for n in rest)}"
    )


def resolve_axis_sizes(n_devices: int, **axes: int) -> dict[str, int]:
  """Turns user axis sizes into the full ``{axis: size}`` for ``n_devices``.

  Args:
    n_devices: devices the mesh must cover exactly.
    **axes: sizes by axis name; absent axes are 1, at most one may be -1
      ("the rest of the devices").

  Returns:
    A dict with every axis of :data:`AXES`, in mesh order, whose product is
    ``n_devices``.

  Raises:
    MeshnetError: an unknown axis, a size that is not an integer or < 1
      (other than -1), more than one -1, or sizes whose product is not
      ``n_devices``.
  """
  check_axis_sizes(**axes)
  sizes = {name: int(axes.get(name, 1)) for name in AXES}
  rest = [name for name, size in sizes.items() if size == -1]
  fixed = math.prod(size for size in sizes.values() if size != -1)
  described = ",".join(f"{n}={s}" for n, s in sizes.items() if s != 1)
  if rest:
    if n_devices % fixed:
      raise MeshnetError(
          f"mesh {described} needs a multiple of {fixed} devices but there are "
          f"{n_devices}; choose sizes whose product divides {n_devices}"
      )
    sizes[rest[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise MeshnetError(
        f"mesh {described or 'with all axes 1'} uses {fixed} devices but there are "
        f"{n_devices}; make the sizes multiply to {n_devices}, use -1 for one axis "
        "(e.g. data=-1), or pass devices= / --devices to use exactly that many"
    )
  return sizes


def make_mesh(
    *, devices: Sequence[jax.Device] | None = None, **axes: int
) -> Mesh:
  """Builds a mesh with meshnet's axes ``(data, fsdp, stage, tensor)``.

  Example: ``make_mesh(data=-1)`` is pure data parallelism over every device;
  ``make_mesh(data=2, stage=4)`` on 8 devices is two pipelines of four stages.

  Args:
    devices: the devices to use (default: all of ``jax.devices()``, over all
      processes). Pass a subset, e.g. ``jax.devices()[:1]``, for a smaller mesh.
    **axes: axis sizes by name; absent axes are 1 and one axis may be -1.

  Returns:
    A ``jax.sharding.Mesh`` with all four axes (size-1 axes included):
    ``data``, ``fsdp`` and ``stage`` of type ``Explicit`` (meshnet places
    their collectives itself inside ``shard_map``); ``tensor`` too when its
    size is 1, and ``Auto`` when it is larger: the compiler then splits each
    layer's matmuls over it (Megatron's one all-reduce per column/row pair,
    as MaxText runs under GSPMD), so a model's own ``apply`` needs no
    sharding annotations (see :func:`axis_types`).

  Raises:
    MeshnetError: the sizes don't multiply to the number of devices (the
      message gives both numbers), an axis name or size is invalid, or
      ``devices`` is empty or names a device twice.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise MeshnetError(
        "make_mesh got devices=[]; pass at least one device, or devices=None for all"
    )
  seen: set[jax.Device] = set()
  for device in devices:
    if device in seen:
      raise MeshnetError(
          f"make_mesh got device {device} twice in devices=; pass each device once"
      )
    seen.add(device)
  sizes = resolve_axis_sizes(len(devices), **axes)
  shape = tuple(sizes.values())
  if devices == list(jax.devices()):
    # Topology-aware device order (rings on TPU, NVLink islands on GPU).
    return jax.make_mesh(shape, AXES, axis_types=axis_types(sizes))
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES,
              axis_types=axis_types(sizes))


def axis_types(sizes: dict[str, int]) -> tuple[AxisType, ...]:
  """The type of each of :data:`AXES` in a mesh of these sizes: ``Explicit``,
  but ``tensor`` > 1 is ``Auto``.

  Why ``Auto``: in jax 0.10.2 a ``shard_map`` manual over some axes replicates
  its operands over the ``Explicit`` axes it leaves to the compiler (an
  all-gather over ``tensor`` on the way in), and an ``Explicit``
  row-parallel matmul needs an ``out_sharding=`` in every model; over an
  ``Auto`` axis neither happens. A size-1 ``tensor`` stays ``Explicit`` so
  that data- and pipeline-parallel programs do not change.
  """
  return tuple(AxisType.Auto if name == TENSOR and sizes.get(name, 1) > 1
               else AxisType.Explicit for name in AXES)


def axis_size(mesh: Mesh, axis: str) -> int:
  """Size of ``axis`` in ``mesh`` (1 when the mesh lacks the axis)."""
  return int(mesh.shape.get(axis, 1))


def describe_mesh(mesh: Mesh) -> str:
  """A multi-line, human-readable description of ``mesh`` for logs.

  The first line gives the axis sizes, device kind and process count; then
  one line per device position: its coordinates on the axes larger than 1,
  the device id and the process that owns it. Example::

    mesh data=4 fsdp=1 stage=2 tensor=1: 8 cpu devices, 1 process
      data=0 stage=0 -> device 0 (process 0)
      data=0 stage=1 -> device 1 (process 0)
      ...
  """
  sizes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
  devices = mesh.devices
  flat = list(devices.flat)
  platform = flat[0].platform
  processes = len({d.process_index for d in flat})
  lines = [
      f"mesh {sizes}: {len(flat)} {platform} device{'s' * (len(flat) != 1)}, "
      f"{processes} process{'es' * (processes != 1)}"
  ]
  active = [i for i, size in enumerate(devices.shape) if size > 1]
  for position in np.ndindex(devices.shape):
    device = devices[position]
    where = " ".join(f"{mesh.axis_names[i]}={position[i]}" for i in active)
    lines.append(
        f"  {where or 'all'} -> device {device.id} (process {device.process_index})"
    )
  return "\n".join(lines)
