"""``meshnet bench collectives``: time each collective, with nccl-tests' bandwidths.

For every collective of :data:`meshnet.collectives.COLLECTIVES` (the
functions meshnet's own steps call) and every buffer size, one jitted
``shard_map`` program runs the collective ``calls`` times in a
``lax.fori_loop`` whose iterations depend on each other, so XLA can neither
hoist nor merge them: the output is the next input, except that all_gather
and gather pass on the first ``S/n`` chunk of theirs (a copy of ``S/n``) and
reduce_scatter and scatter write theirs over the first chunk of their input
(``S/n``, in place); those copies are timed with the collective. A timed run is one call of that program (a
barrier first, ``block_until_ready`` after; compilation is not timed); the
time of one collective is the run's time over ``calls``, and the result is
the median, quartiles, minimum and maximum over ``iters`` runs after
``warmup`` untimed ones. ``calls`` is chosen, unless given, so one run lasts
about :data:`TARGET_RUN_S` (from the fastest warm-up run; process 0's choice
under several processes), which amortises the launch of small collectives
and keeps large ones at one call a run.

Sizes and bandwidths follow nccl-tests' conventions
(https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md). A
size is a buffer of ``S`` bytes (a shape like 1000x1000 of ``dtype``,
laid out flat); over ``n`` devices:

========================  =======================  =============
collective                per-device buffers       busbw / algbw
========================  =======================  =============
all_reduce                in ``S``, out ``S``      ``2(n-1)/n``
all_gather, gather        in ``S/n``, out ``S``    ``(n-1)/n``
reduce_scatter, scatter   in ``S``, out ``S/n``    ``(n-1)/n``
all_to_all                in ``S``, out ``S``      ``(n-1)/n``
broadcast, reduce, shift  in ``S``, out ``S``      ``1``
========================  =======================  =============

``algbw = S / time`` and ``busbw = algbw x factor``, in GB/s (1e9 bytes):
bus bandwidth is what each link carries with an optimal algorithm, so it
can be compared with the hardware's peak whatever ``n`` is. Where ``S`` does
not split into ``n`` equal chunks (the collectives that split it), it is
rounded down to a multiple of ``n`` elements and the ``bytes`` reported are
the ones moved. The buffers hold zeros (a sum of zeros stays finite over any
number of calls; no transport here looks at values).

Under several processes (``meshnet launch -n 2 -- meshnet bench
collectives``) the mesh spans every process's devices, each timed run starts
after a barrier (a small ``psum`` over all devices) so it measures the
collective and not a late peer, and process 0 reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Iterator, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshnet import collectives
from meshnet.config import MeshConfig
from meshnet.distributed import initialize
from meshnet.errors import MeshnetError
from meshnet.mesh import AXES, DATA, make_mesh, select_devices, set_cpu_device_count

COLLECTIVES: tuple[str, ...] = tuple(collectives.COLLECTIVES)
DEFAULT_SIZES: tuple[tuple[int, ...], ...] = ((100, 100), (1000, 1000), (5000, 5000))
TARGET_RUN_S = 0.05
MAX_CALLS = 1000

# How the buffer of S bytes is laid out per device: "full" (in S, out S),
# "gathered" (in S/n, out S), "split" (in S, out S/n; all_to_all: S in n chunks).
_LAYOUT = {
    "all_reduce": "full", "broadcast": "full", "reduce": "full", "shift": "full",
    "all_gather": "gathered", "gather": "gathered",
    "reduce_scatter": "split", "scatter": "split", "all_to_all": "split",
}


def bus_factor(collective: str, n: int) -> float:
  """busbw / algbw for ``collective`` over ``n`` devices (nccl-tests' factors).

  ``2(n-1)/n`` for all_reduce; ``(n-1)/n`` for all_gather, reduce_scatter,
  all_to_all, gather and scatter; ``1`` for broadcast, reduce and shift.
  """
  if collective == "all_reduce":
    return 2 * (n - 1) / n
  if collective in ("broadcast", "reduce", "shift"):
    return 1.0
  if collective in _LAYOUT:
    return (n - 1) / n
  raise MeshnetError(f"unknown collective {collective!r}; choose from "
                     f"{', '.join(COLLECTIVES)}")


def parse_sizes(text: str) -> tuple[tuple[int, ...], ...]:
  """``"100x100,1000x1000"`` -> ``((100, 100), (1000, 1000))``; a size may
  have any number of dimensions (``4096`` or ``8x512x512``)."""
  sizes = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    try:
      shape = tuple(int(d) for d in part.lower().split("x"))
    except ValueError:
      shape = ()
    if not shape or min(shape) < 1:
      raise MeshnetError(f"bad size {part!r} in --sizes {text!r}; write each size as "
                         "positive integers joined by x, comma-separated (e.g. "
                         "100x100,1000x1000)")
    sizes.append(shape)
  if not sizes:
    raise MeshnetError(f"--sizes {text!r} names no size; give e.g. 100x100,1000x1000")
  return tuple(sizes)


def _names(text: str) -> tuple[str, ...]:
  return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """What ``meshnet bench collectives`` measures.

  Attributes:
    collectives: names from :data:`COLLECTIVES`, run in this order.
    sizes: buffer shapes ``S`` (see the module docstring for what each
      collective does with them), run in this order.
    dtype: element type of the buffers (a JAX dtype name).
    axes: mesh axes the collectives run over, as one axis (row-major in this
      order); the devices along the other axes form independent groups that
      run at the same time.
    iters: timed runs per (collective, size); median and spread are over them.
    warmup: untimed runs before them (at least one is made when ``calls`` is
      ``None``: it sets ``calls``).
    calls: collectives per timed run (in one ``fori_loop``); ``None``: enough
      for a run to last about ``target_run_s``, at most :data:`MAX_CALLS`.
    target_run_s: the duration ``calls=None`` aims a run at.
  """

  collectives: tuple[str, ...] = COLLECTIVES
  sizes: tuple[tuple[int, ...], ...] = DEFAULT_SIZES
  dtype: str = "float32"
  axes: tuple[str, ...] = (DATA,)
  iters: int = 10
  warmup: int = 2
  calls: int | None = None
  target_run_s: float = TARGET_RUN_S

  def __post_init__(self):
    for name in self.collectives:
      if name not in COLLECTIVES:
        raise MeshnetError(f"unknown collective {name!r}; choose from "
                           f"{', '.join(COLLECTIVES)} (or all)")
    if not self.collectives:
      raise MeshnetError("no collective to benchmark; name at least one, e.g. "
                         "--collectives all_reduce")
    if not self.sizes or any(not s or min(s) < 1 for s in self.sizes):
      raise MeshnetError(f"sizes={self.sizes!r} must be shapes of positive integers, "
                         "e.g. ((1000, 1000),)")
    _check_dtype(self.dtype)
    for axis in self.axes:
      if axis not in AXES:
        raise MeshnetError(f"axis {axis!r} in --axes is not a mesh axis; choose from "
                           f"{', '.join(AXES)} (e.g. --axes data or --axes data,stage)")
    if not self.axes or len(set(self.axes)) != len(self.axes):
      raise MeshnetError(f"--axes {','.join(self.axes)!r} must name each mesh axis at "
                         "most once, at least one (e.g. data,stage)")
    for name, value, low in (("iters", self.iters, 1), ("warmup", self.warmup, 0),
                             ("calls", self.calls, 1)):
      if value is not None and (not isinstance(value, int) or value < low):
        raise MeshnetError(f"--{name} {value!r} must be an integer >= {low}")
    if not self.target_run_s > 0:
      raise MeshnetError(f"target_run_s={self.target_run_s!r} must be > 0")

  @classmethod
  def parse(cls, *, collectives: str = "all", sizes: str | None = None,
            axes: str = DATA, **fields) -> "BenchConfig":
    """A config from the command's comma-separated texts (``"all"``: every
    collective; ``sizes=None``: :data:`DEFAULT_SIZES`)."""
    names = COLLECTIVES if collectives.strip() == "all" else _names(collectives)
    return cls(collectives=names,
               sizes=DEFAULT_SIZES if sizes is None else parse_sizes(sizes),
               axes=_names(axes), **fields)


def _check_dtype(name: str) -> np.dtype:
  try:
    dtype = jnp.dtype(name)
  except TypeError:
    raise MeshnetError(f"unknown dtype {name!r}; give a JAX dtype name such as float32, "
                       "bfloat16, float16 or int32") from None
  if not jnp.issubdtype(dtype, jnp.number):
    raise MeshnetError(f"dtype {name!r} is not numeric; give one such as float32, "
                       "bfloat16 or int32")
  if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
    raise MeshnetError(f"dtype {name} needs 64-bit JAX (JAX_ENABLE_X64=1); or use a "
                       "32-bit dtype such as float32")
  return dtype


@dataclasses.dataclass(frozen=True)
class Result:
  """One collective at one size.

  ``devices`` is ``n``, the devices taking part in one collective (the
  product of the ``axes`` sizes); times are per collective call, seconds;
  bandwidths in GB/s (1e9 bytes/s); ``iqr_s`` is the interquartile range.
  """

  collective: str
  axes: tuple[str, ...]
  devices: int
  processes: int
  dtype: str
  shape: tuple[int, ...]
  bytes: int
  median_s: float
  min_s: float
  max_s: float
  iqr_s: float
  algbw_GBps: float
  busbw_GBps: float
  platform: str
  calls: int
  iters: int
  mesh: str

  def to_json(self) -> str:
    """One JSON line (no newline), keys as the fields."""
    record = dataclasses.asdict(self)
    record["axes"], record["shape"] = list(self.axes), list(self.shape)
    return json.dumps(record)


def group_size(mesh: Mesh, axes: Sequence[str]) -> int:
  """Devices in one collective over ``axes`` of ``mesh``."""
  return math.prod(int(mesh.shape[a]) for a in axes)


def _local_elements(collective: str, elements: int, n: int) -> tuple[int, int]:
  """(elements of each device's input, elements of S actually moved)."""
  layout = _LAYOUT[collective]
  if layout == "full":
    return elements, elements
  chunk = elements // n
  if chunk == 0:
    raise MeshnetError(f"a buffer of {elements} elements cannot be split over {n} "
                       f"devices for {collective}; give sizes of at least {n} elements")
  return (chunk if layout == "gathered" else chunk * n), chunk * n


def _as_varying(y: jax.Array, like: jax.Array) -> jax.Array:
  """``y`` typed as varying over the axes ``like`` varies over (a loop carry
  keeps its type; a no-op at run time)."""
  missing = tuple(sorted(set(jax.typeof(like).manual_axis_type.varying)
                         - set(jax.typeof(y).manual_axis_type.varying)))
  return jax.lax.pcast(y, missing, to="varying") if missing else y


def _step(collective: str, axis: tuple[str, ...], chunk: int) -> Callable[[jax.Array], jax.Array]:
  """One call of ``collective`` as a map from the loop carry (each device's
  input) to the next carry, which depends on the call's output."""
  c = collectives
  full = {"all_reduce": c.all_reduce, "broadcast": c.broadcast, "reduce": c.reduce,
          "shift": c.shift, "all_to_all": c.all_to_all}
  if collective in full:
    op = full[collective]
    return lambda x: _as_varying(op(x, axis), x)
  if collective == "all_gather":  # the next input: the first chunk of the output
    return lambda x: _as_varying(c.all_gather(x, axis, tiled=True), x)[:chunk]
  if collective == "gather":
    return lambda x: _as_varying(c.gather(x, axis, tiled=True), x)[:chunk]
  op = c.reduce_scatter if collective == "reduce_scatter" else c.scatter
  return lambda x: x.at[:chunk].set(_as_varying(op(x, axis), x))  # in place: chunk writes


@dataclasses.dataclass
class _Program:
  """A compiled benchmark program and the (donated, re-fed) buffer it runs on."""

  run: Callable[[jax.Array, jax.Array], jax.Array]
  x: jax.Array
  counts: dict[int, jax.Array]

  def __call__(self, calls: int) -> None:
    self.x = self.run(self.x, self.counts[calls])


def _compile(collective: str, mesh: Mesh, axes: tuple[str, ...], elements: int,
             dtype: np.dtype) -> _Program:
  """The program ``x -> x after k calls`` over every device of ``mesh``, for a
  buffer of ``elements`` (``S``); each device's ``x`` is what the collective
  takes (the global array is sharded on all mesh axes)."""
  n = group_size(mesh, axes)
  local, moved = _local_elements(collective, elements, n)
  step = _step(collective, axes, moved // n)
  spec = P(tuple(mesh.axis_names))

  def loop(x_L, k):  # x_L: [local] on each device; k: calls, replicated
    with jax.named_scope(f"bench_{collective}"):
      return jax.lax.fori_loop(0, k, lambda _, x: step(x), x_L)

  sharded = jax.shard_map(loop, mesh=mesh, in_specs=(spec, P()), out_specs=spec)
  sharding = NamedSharding(mesh, spec)
  x = jax.jit(lambda: jnp.zeros((local * mesh.size,), dtype), out_shardings=sharding)()
  k = jax.device_put(np.int32(1), NamedSharding(mesh, P()))
  compiled = jax.jit(sharded, donate_argnums=0).lower(x, k).compile()
  return _Program(compiled, x, {})


def _barrier(mesh: Mesh) -> Callable[[], None]:
  """Returns once every process got there: a tiny ``psum`` over all devices."""
  spec = P(tuple(mesh.axis_names))
  total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, tuple(mesh.axis_names)),
                                mesh=mesh, in_specs=spec, out_specs=P()))
  ones = jax.jit(lambda: jnp.ones((mesh.size,), jnp.int32),
                 out_shardings=NamedSharding(mesh, spec))()
  total(ones).block_until_ready()  # compiled now, not in the first timed run
  return lambda: total(ones).block_until_ready()


def _calls_for(seconds: float, target: float) -> int:
  calls = max(1, min(MAX_CALLS, math.ceil(target / max(seconds, 1e-9))))
  if jax.process_count() > 1:  # every process runs the same loop: process 0's choice
    from jax.experimental import multihost_utils
    calls = int(multihost_utils.broadcast_one_to_all(np.int32(calls)))
  return calls


def _measure(program: _Program, mesh: Mesh, config: BenchConfig,
             barrier: Callable[[], None]) -> tuple[list[float], int]:
  """Per-call times of ``config.iters`` timed runs, and calls per run."""

  def timed(calls: int) -> float:
    if calls not in program.counts:
      program.counts[calls] = jax.device_put(np.int32(calls), NamedSharding(mesh, P()))
    barrier()
    start = time.perf_counter()
    program(calls)
    program.x.block_until_ready()
    return time.perf_counter() - start

  warm = [timed(1) for _ in range(max(config.warmup, 1 if config.calls is None else 0))]
  calls = config.calls or _calls_for(min(warm), config.target_run_s)
  return [timed(calls) / calls for _ in range(config.iters)], calls


def check_bench(config: BenchConfig, mesh: Mesh) -> int:
  """Checks ``config`` against ``mesh`` before anything runs; returns the
  group size ``n`` of ``config.axes``.

  Raises:
    MeshnetError: an axis is not one of ``mesh``'s, the axes span fewer than
      2 devices, or a size has fewer elements than ``n`` for a collective
      that splits it.
  """
  for axis in config.axes:
    if axis not in mesh.shape:
      raise MeshnetError(f"axis {axis!r} in --axes is not in the mesh (axes "
                         f"{', '.join(mesh.axis_names)}); name one of those")
  n = group_size(mesh, config.axes)
  if mesh.size < 2:
    raise MeshnetError(f"the mesh has {mesh.size} device; collectives need at least 2: "
                       "simulate CPU devices with --devices 8, or start processes with "
                       "meshnet launch -n 2 -- meshnet bench collectives")
  if n < 2:
    sizes = ",".join(f"{a}={s}" for a, s in mesh.shape.items())
    raise MeshnetError(f"--axes {','.join(config.axes)} spans {n} device on mesh "
                       f"{sizes}; a collective needs at least 2: give those axes more "
                       f"devices, e.g. --mesh {config.axes[0]}={max(2, mesh.size)}")
  for collective in config.collectives:
    for shape in config.sizes:
      _local_elements(collective, math.prod(shape), n)
  return n


def rounding_notes(config: BenchConfig, n: int) -> list[str]:
  """One line per size that the splitting collectives round down to a
  multiple of ``n`` elements."""
  split = [c for c in config.collectives if _LAYOUT[c] != "full"]
  notes = []
  for shape in config.sizes:
    elements = math.prod(shape)
    if split and elements % n:
      notes.append(f"size {'x'.join(map(str, shape))} ({elements} elements) does not "
                   f"split into {n} equal chunks: {', '.join(split)} move "
                   f"{elements // n * n} (the bytes reported)")
  return notes


def iter_bench(config: BenchConfig, mesh: Mesh) -> Iterator[Result]:
  """Runs the benchmark, yielding each :class:`Result` when it is measured
  (collective-major, sizes in order). One buffer exists at a time: it is
  created sharded and deleted before the next.

  Raises:
    MeshnetError: as :func:`check_bench`.
  """
  n = check_bench(config, mesh)
  dtype = _check_dtype(config.dtype)
  barrier = _barrier(mesh)
  devices = list(mesh.devices.flat)
  processes = len({d.process_index for d in devices})
  described = ",".join(f"{a}={s}" for a, s in mesh.shape.items())
  for collective in config.collectives:
    for shape in config.sizes:
      elements = math.prod(shape)
      program = _compile(collective, mesh, tuple(config.axes), elements, dtype)
      try:
        times, calls = _measure(program, mesh, config, barrier)
      finally:
        program.x.delete()
        del program
      size = _local_elements(collective, elements, n)[1] * dtype.itemsize
      median = float(np.median(times))
      q1, q3 = np.percentile(times, [25, 75])
      algbw = size / median / 1e9
      yield Result(
          collective=collective, axes=tuple(config.axes), devices=n, processes=processes,
          dtype=dtype.name, shape=tuple(shape), bytes=size, median_s=median,
          min_s=float(min(times)), max_s=float(max(times)), iqr_s=float(q3 - q1),
          algbw_GBps=algbw, busbw_GBps=algbw * bus_factor(collective, n),
          platform=devices[0].platform, calls=calls, iters=config.iters, mesh=described)


def make_bench_mesh(config: BenchConfig, mesh: MeshConfig = MeshConfig()) -> Mesh:
  """The mesh the command benchmarks on, joining the other processes first
  when started as one of several (:func:`meshnet.initialize`).

  ``mesh.devices`` simulated CPU devices (per process) are asked for before
  JAX starts, as ``meshnet train`` does. The default mesh (no axis given)
  puts every device on the first of ``config.axes``.

  Raises:
    MeshnetError: the sizes do not fit the devices (as :func:`make_mesh`).
  """
  if mesh.devices is not None:
    try:  # before initialize(): the count of CPU devices this process brings
      set_cpu_device_count(mesh.devices)
    except MeshnetError:
      pass  # JAX already started; select_devices says what can be used
  initialize()
  sizes = {config.axes[0]: -1} if mesh.is_default else mesh.axes()
  return make_mesh(devices=select_devices(mesh.devices), **sizes)


def run_bench(config: BenchConfig, mesh: Mesh) -> list[Result]:
  """Every (collective, size) of ``config`` on ``mesh``; see :func:`iter_bench`."""
  return list(iter_bench(config, mesh))


# ---------------------------------------------------------------- formatting

_COLUMNS = (("collective", 14), ("size", 11), ("bytes", 9), ("calls", 5),
            ("median", 9), ("iqr", 9), ("min", 9), ("max", 9),
            ("algbw GB/s", 10), ("busbw GB/s", 10))


def _seconds(s: float) -> str:
  if s < 1e-3:
    return f"{s * 1e6:.1f} us"
  if s < 1:
    return f"{s * 1e3:.2f} ms"
  return f"{s:.3f} s"


def _bytes(b: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if b >= scale:
      return f"{b / scale:.3g} {unit}"
  return f"{b} B"


def table_header(config: BenchConfig, mesh: Mesh) -> str:
  """The table's title line and column names."""
  devices = list(mesh.devices.flat)
  processes = len({d.process_index for d in devices})
  title = (f"collectives over axes={','.join(config.axes)}: "
           f"devices={group_size(mesh, config.axes)} processes={processes} "
           f"platform={devices[0].platform} dtype={config.dtype} "
           f"mesh={','.join(f'{a}={s}' for a, s in mesh.shape.items())}; "
           f"time per call, median and interquartile range of {config.iters} "
           f"run{'s' if config.iters != 1 else ''}")
  names = "  ".join(f"{name:>{width}}" if i > 1 else f"{name:<{width}}"
                    for i, (name, width) in enumerate(_COLUMNS))
  return f"{title}\n{names}"


def format_row(r: Result) -> str:
  """One table row for ``r``."""
  cells = (r.collective, "x".join(map(str, r.shape)), _bytes(r.bytes), str(r.calls),
           _seconds(r.median_s), _seconds(r.iqr_s), _seconds(r.min_s), _seconds(r.max_s),
           f"{r.algbw_GBps:.3g}", f"{r.busbw_GBps:.3g}")
  return "  ".join(f"{cell:>{width}}" if i > 1 else f"{cell:<{width}}"
                   for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS)))


def format_table(config: BenchConfig, mesh: Mesh, results: Sequence[Result]) -> str:
  """The whole table: :func:`table_header` then one :func:`format_row` each."""
  return "\n".join([table_header(config, mesh), *map(format_row, results)])


def read_results(path: str) -> list[dict]:
  """The records of a JSON-lines file written by ``--output``."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _open_output(path: str) -> TextIO:
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "w")
  except OSError as e:
    raise MeshnetError(f"--output {path} cannot be written ({e.strerror}); give a "
                       "writable file path, e.g. bench.jsonl") from None


def report(config: BenchConfig, mesh: Mesh, *, output: str | None = None,
           as_json: bool = False, out: TextIO | None = None) -> list[Result]:
  """Runs the benchmark and reports each result as it comes: a table row (or,
  with ``as_json``, a JSON line) on ``out`` (default stdout), and a JSON line
  in ``output`` (replaced if it exists). Notes on rounded sizes go to stderr.
  Under several processes only process 0 reports.

  Raises:
    MeshnetError: as :func:`check_bench`, or ``output`` cannot be written.
  """
  out = out or sys.stdout
  reporting = jax.process_index() == 0
  n = check_bench(config, mesh)
  file = _open_output(output) if output and reporting else None
  try:
    if reporting:
      for note in rounding_notes(config, n):
        print(f"note: {note}", file=sys.stderr, flush=True)
      if not as_json:
        print(table_header(config, mesh), file=out, flush=True)
    results = []
    for result in iter_bench(config, mesh):
      results.append(result)
      if not reporting:
        continue
      print(result.to_json() if as_json else format_row(result), file=out, flush=True)
      if file:
        file.write(result.to_json() + "\n")
        file.flush()
  finally:
    if file:
      file.close()
  return results
