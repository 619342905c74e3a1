"""What a device and its links cost: the figures :mod:`meshnet.planner` uses.

A :class:`DeviceSpec` is a device's sustained matmul rate (FLOP/s), its
memory bandwidth for elementwise work (bytes/s), its memory size and a
:class:`LinkSpec`: per collective, ``time = latency + bus_bytes / bandwidth``,
where ``bus_bytes`` is what one device sends (nccl-tests' bus bandwidth
convention: an all-reduce of ``m`` bytes over ``n`` devices sends
``2 (n - 1) / n * m``, an all-gather of ``m`` bytes in all ``(n - 1) / n * m``,
a ``ppermute`` its whole operand).

Figures come from :data:`DEVICE_KINDS` (nominal, for accelerators), from
this host (``cpu``: a matmul and an elementwise update are timed here,
:func:`measure_cpu`), from flags (``--flops``, ``--bandwidth``,
``--latency``), or from the JSON lines ``meshnet bench collectives`` writes
(:func:`read_link_file`: latency and bandwidth fitted per collective).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Iterable, Mapping, Sequence

import numpy as np

from meshnet.errors import MeshnetError

ALL_REDUCE, ALL_GATHER, PPERMUTE = "all_reduce", "all_gather", "ppermute"
STEP_COLLECTIVES = (ALL_REDUCE, ALL_GATHER, PPERMUTE)
# The bench file's names for the collectives the train step runs
# (`shift` is the ring ppermute of meshnet.collectives).
_BENCH_NAMES = {ALL_REDUCE: ("all_reduce",), ALL_GATHER: ("all_gather",),
                PPERMUTE: ("shift", "ppermute")}


def bus_factor(collective: str, n: int) -> float:
  """Bytes one device sends per byte of the nccl-tests message size ``m``
  (all-reduce ``2 (n-1)/n``; all-gather, reduce-scatter, all-to-all
  ``(n-1)/n``; broadcast, reduce, scatter, gather, shift/ppermute 1)."""
  if n <= 1:
    return 0.0
  if collective == "all_reduce":
    return 2.0 * (n - 1) / n
  if collective in ("all_gather", "reduce_scatter", "all_to_all"):
    return (n - 1) / n
  return 1.0


@dataclasses.dataclass(frozen=True)
class LinkCost:
  """One collective's cost: ``latency_s + bus_bytes / bandwidth_Bps``.

  With measured ``points`` (``(bus_bytes, seconds)``, from a bench file),
  the time is interpolated between them instead (measured links are rarely
  one straight line: gloo changes algorithm with the size), held at the
  smallest one's time below it, and extended past the largest with
  ``bandwidth_Bps``.
  """

  latency_s: float
  bandwidth_Bps: float
  points: tuple[tuple[float, float], ...] = ()

  def time(self, bus_bytes: float) -> float:
    if len(self.points) < 2:
      return self.latency_s + bus_bytes / self.bandwidth_Bps
    xs, ys = zip(*self.points)
    if bus_bytes > xs[-1]:
      return ys[-1] + (bus_bytes - xs[-1]) / self.bandwidth_Bps
    return float(np.interp(bus_bytes, xs, ys))


@dataclasses.dataclass(frozen=True)
class LinkSpec:
  """The links between devices, per collective the train step runs.

  Attributes:
    costs: ``all_reduce``, ``all_gather`` and ``ppermute`` -> :class:`LinkCost`.
    source: where the figures come from (printed with the plan).
  """

  costs: Mapping[str, LinkCost]
  source: str = ""

  def time(self, collective: str, message_bytes: float, n: int) -> float:
    """Seconds for one ``collective`` of ``message_bytes`` (nccl-tests size)
    over ``n`` devices; 0 when ``n == 1`` (no collective runs)."""
    if n <= 1:
      return 0.0
    return self.costs[collective].time(bus_factor(collective, n) * message_bytes)

  def describe(self) -> str:
    parts = [f"{name} {_ms(c.latency_s)} + {c.bandwidth_Bps / 1e9:.3g} GB/s"
             for name, c in self.costs.items()]
    return ", ".join(parts) + (f" ({self.source})" if self.source else "")

  def replace(self, *, latency_s: float | None = None,
              bandwidth_Bps: float | None = None, source: str = "") -> "LinkSpec":
    """Every collective with the given latency and/or bandwidth."""
    costs = {name: LinkCost(latency_s if latency_s is not None else c.latency_s,
                            bandwidth_Bps if bandwidth_Bps is not None else c.bandwidth_Bps)
             for name, c in self.costs.items()}
    return LinkSpec(costs, source or self.source)


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.3g} us"


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """What one device can do.

  Attributes:
    kind: ``cpu``, ``h100``, ... (a key of :data:`DEVICE_KINDS`).
    flops: sustained FLOP/s of the step's float32 matmuls, per device.
    memory_bandwidth: bytes/s of elementwise work (optimizer update,
      gradient packing), per device.
    memory_bytes: the device's memory.
    link: the links' costs.
    source: where ``flops`` and ``memory_bandwidth`` come from.
    flops_by_rows: ``(rows, FLOP/s)`` pairs measured at those batch rows
      (``cpu``: small matmuls run slower); :meth:`rate` picks the nearest.
  """

  kind: str
  flops: float
  memory_bandwidth: float
  memory_bytes: int
  link: LinkSpec
  source: str = "nominal"
  flops_by_rows: tuple[tuple[int, float], ...] = ()

  def rate(self, rows: int) -> float:
    """FLOP/s of matmuls over ``rows`` examples: the measurement at the
    nearest row count (on a log scale), else ``flops``."""
    if not self.flops_by_rows:
      return self.flops
    return min(self.flops_by_rows,
               key=lambda p: abs(math.log(max(p[0], 1)) - math.log(max(rows, 1))))[1]


def _link(all_reduce: tuple[float, float], all_gather: tuple[float, float],
          ppermute: tuple[float, float], source: str) -> LinkSpec:
  return LinkSpec({ALL_REDUCE: LinkCost(*all_reduce), ALL_GATHER: LinkCost(*all_gather),
                   PPERMUTE: LinkCost(*ppermute)}, source)


def _accelerator(kind: str, peak_tflops: float, hbm_GBps: float, hbm_GB: float,
                 link_GBps: float, latency_us: float) -> DeviceSpec:
  """Nominal figures: half the dense peak of the float32 matmul path (TF32
  tensor cores on NVIDIA, bf16 passes on TPU), the HBM bandwidth and size,
  and one link bus bandwidth for every collective."""
  cost = (latency_us * 1e-6, link_GBps * 1e9)
  return DeviceSpec(kind, 0.5 * peak_tflops * 1e12, hbm_GBps * 1e9, int(hbm_GB * 2**30),
                    _link(cost, cost, (0.5 * cost[0], cost[1]), f"{kind} nominal"),
                    source=f"nominal: half of {peak_tflops:g} TFLOP/s peak")


# The gloo figures measured on a CPU host (DESIGN.md, benchmarks/RESULTS.md):
# an all-reduce costs ~2 ms up to ~100k floats and 3.1 ms for 2.27 MB (so
# ~2.4 GB/s beyond the latency); a ppermute 0.4 ms for 64 bytes and ~2 ms
# for 0.5-2 MB.
CPU_LINK = _link((2.0e-3, 2.4e9), (2.0e-3, 2.4e9), (0.4e-3, 1.0e9), "cpu gloo defaults")

# kind -> (dense peak TFLOP/s of the f32 matmul path, HBM GB/s, HBM GiB,
# link bus GB/s, collective latency us); nominal, for planning.
_NOMINAL = {
    "h100": (494.0, 3350.0, 80, 400.0, 15.0),
    "h200": (494.0, 4800.0, 141, 400.0, 15.0),
    "a100": (156.0, 2039.0, 80, 230.0, 15.0),
    "tpu-v4": (275.0, 1228.0, 32, 90.0, 8.0),
    "tpu-v5e": (197.0, 819.0, 16, 90.0, 8.0),
    "tpu-v5p": (459.0, 2765.0, 95, 180.0, 8.0),
    "tpu-v6e": (918.0, 1640.0, 32, 180.0, 8.0),
}
DEVICE_KINDS: tuple[str, ...] = ("cpu", *_NOMINAL)


def _host_memory_bytes() -> int:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 0


def device_spec(kind: str, *, flops: float | None = None,
                memory_bandwidth: float | None = None) -> DeviceSpec:
  """The figures of ``kind`` (see :data:`DEVICE_KINDS`).

  For ``cpu`` the compute figures must be given (see :func:`measure_cpu`);
  for accelerators they default to the nominal ones.

  Raises:
    MeshnetError: unknown kind, or ``cpu`` without ``flops``.
  """
  if kind == "cpu":
    if flops is None or memory_bandwidth is None:
      raise MeshnetError("device kind cpu needs its rates: measure them with "
                         "measure_cpu_flops() and measure_cpu_bandwidth(), or pass --flops")
    return DeviceSpec("cpu", flops, memory_bandwidth, _host_memory_bytes(), CPU_LINK,
                      source="given")
  if kind not in _NOMINAL:
    raise MeshnetError(f"unknown device kind {kind!r}; choose one of "
                       f"{', '.join(DEVICE_KINDS)}")
  spec = _accelerator(kind, *_NOMINAL[kind])
  changes = {}
  if flops is not None:
    changes.update(flops=flops, source="given")
  if memory_bandwidth is not None:
    changes["memory_bandwidth"] = memory_bandwidth
  return dataclasses.replace(spec, **changes)


# Substrings of JAX's device_kind (lower case, spaces removed) -> kind.
_KIND_NAMES = (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("v6", "tpu-v6e"),
               ("v5lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5", "tpu-v5p"), ("v4", "tpu-v4"))


def detect_kind() -> str:
  """The kind of this process's first JAX device (``cpu`` on the CPU
  platform; an unknown GPU plans as ``h100``, an unknown TPU as ``tpu-v5e``)."""
  import jax

  device = jax.devices()[0]
  if device.platform == "cpu":
    return "cpu"
  kind = match_kind(device.device_kind)
  if kind is not None:
    return kind
  return "h100" if device.platform == "gpu" else "tpu-v5e"


def match_kind(device_kind: str) -> str | None:
  """The key of :data:`DEVICE_KINDS` that JAX's ``device_kind`` string names
  (``"NVIDIA H100 80GB HBM3"`` -> ``h100``, ``"TPU v5 lite"`` -> ``tpu-v5e``),
  or ``None`` for a device not in the table."""
  name = device_kind.lower().replace(" ", "")
  for part, kind in _KIND_NAMES:
    if part in name:
      return kind
  return None


MAX_MEASURED_ROWS = 1024


def measure_cpu_flops(widths: Sequence[int] | None, rows: int, *,
                      budget_s: float = 0.25) -> float:
  """FLOP/s of one JAX CPU device training the model's own dense layers
  (``widths``; ReLU between them) at ``rows`` examples (at most
  :data:`MAX_MEASURED_ROWS`): a forward and its weight and input gradients
  (the first layer's input gradient left out, as in a train step), so
  small, cache-missing or transposed matmuls are priced as they run.
  Without widths, two 1024x1024 layers. The best of a few runs within
  about ``budget_s`` seconds."""
  import jax
  import jax.numpy as jnp

  rows = max(1, min(int(rows), MAX_MEASURED_ROWS))
  widths = list(widths) if widths else [1024, 1024, 1024]
  shapes = list(zip(widths[:-1], widths[1:]))
  device = jax.devices("cpu")[0]
  weights = [jax.device_put(jnp.full((i, o), 0.01, jnp.float32), device) for i, o in shapes]
  x = jax.device_put(jnp.ones((rows, widths[0]), jnp.float32), device)

  def loss(weights, x):
    for w in weights:
      x = jnp.maximum(x @ w, 0.0)
    return jnp.sum(x * x)

  step = jax.jit(jax.grad(loss))
  seconds = _best(lambda: step(weights, x)[0], budget_s)
  forward = 2.0 * rows * sum(i * o for i, o in shapes)
  return (3 * forward - 2.0 * rows * widths[0] * widths[1]) / seconds


def measure_cpu_bandwidth(floats: int, *, budget_s: float = 0.25) -> float:
  """Bytes/s of one JAX CPU device on an SGD-like update ``p - 0.1 g`` of
  ``floats`` floats each (read two arrays, write one): what elementwise work
  over ``2 x floats`` floats of state runs at."""
  import jax
  import jax.numpy as jnp

  n = max(int(floats), 2**16)
  device = jax.devices("cpu")[0]
  p = jax.device_put(jnp.ones((n,), jnp.float32), device)
  g = jax.device_put(jnp.ones((n,), jnp.float32), device)
  update = jax.jit(lambda p, g: p - 0.1 * g)
  return 3 * 4 * n / _best(lambda: update(p, g), budget_s)


def _best(run, budget_s: float) -> float:
  """The shortest of several timed calls of ``run`` (after one warm-up)."""
  run().block_until_ready()
  best, began = math.inf, time.perf_counter()
  for i in range(50):
    start = time.perf_counter()
    run().block_until_ready()
    best = min(best, time.perf_counter() - start)
    if i >= 2 and time.perf_counter() - began > budget_s:
      break
  return best


def read_link_file(path: str, base: LinkSpec | None = None) -> LinkSpec:
  """Latency and bandwidth per collective, fitted from ``meshnet bench
  collectives`` JSON lines.

  Each line holds ``collective``, ``devices``, ``bytes`` (the nccl-tests
  message size) and ``median_s``. For each collective the step runs
  (``all_reduce``, ``all_gather``, and ``ppermute`` from the bench's
  ``shift``), a least-squares line ``median_s = latency + bus_bytes /
  bandwidth`` is fitted over its lines (``bus_bytes`` = bytes x
  :func:`bus_factor`); lines of several processes are preferred over
  lines of one (real links over simulated ones). A collective missing from
  the file keeps ``base``'s figures (or the all-reduce fit's).

  Raises:
    MeshnetError: the file is missing, not JSON lines, or holds no usable
      line (naming the file and line).
  """
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise MeshnetError(f"cannot read link file {path}: {e.strerror or e}; write one with "
                       "`meshnet bench collectives --output FILE.jsonl`") from None
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      entry = (str(record["collective"]), int(record["devices"]),
               float(record["bytes"]), float(record["median_s"]),
               int(record.get("processes", 1)))
    except (ValueError, KeyError, TypeError):
      raise MeshnetError(
          f"{path} line {number} is not a `meshnet bench collectives` record (JSON with "
          f"collective, devices, bytes, median_s): {line[:80]!r}") from None
    if entry[1] > 1 and entry[3] > 0 and math.isfinite(entry[3]):
      records.append(entry)
  if not records:
    raise MeshnetError(f"{path} holds no timing of a collective over 2 or more devices; "
                       "run `meshnet bench collectives` on 2 or more devices")
  if any(r[4] > 1 for r in records):
    records = [r for r in records if r[4] > 1]
  fits = {}
  one_size = []
  fallback = base.costs if base is not None else {}
  for collective, names in _BENCH_NAMES.items():
    points = [(bus_factor(name, n) * nbytes, seconds)
              for name, n, nbytes, seconds, _ in records if name in names]
    if not points:
      continue
    if len({x for x, _ in points}) == 1:  # latency and bandwidth cannot be told apart
      one_size.append(collective)
      hint = fallback.get(collective)
      points_fit = _fit_one_size(points, hint.latency_s if hint else None)
    else:
      points_fit = _fit(points)
    fits[collective] = dataclasses.replace(points_fit, points=_medians(points))
  if not fits:
    names = ", ".join(name for names in _BENCH_NAMES.values() for name in names)
    raise MeshnetError(f"{path} times none of {names}: nothing to fit the step's "
                       "collectives to; run `meshnet bench collectives` with them")
  costs = {}
  for collective in STEP_COLLECTIVES:
    costs[collective] = (fits.get(collective) or fallback.get(collective)
                         or next(iter(fits.values())))
  source = f"fitted to {os.path.basename(path)}"
  if one_size:
    source += (f"; {', '.join(one_size)} timed at one size only: latency kept from the "
               "defaults (bench two or more --sizes to measure it)")
  return LinkSpec(costs, source)


def _fit_one_size(points: Sequence[tuple[float, float]],
                  latency_s: float | None) -> LinkCost:
  """A link timed at one message size: the default ``latency_s`` (at most
  half the measured time; half of it without a default) and the bandwidth
  that makes up the rest."""
  x, t = points[0][0], float(np.median([y for _, y in points]))
  latency = min(latency_s if latency_s is not None else t / 2, t / 2)
  return LinkCost(latency, x / (t - latency) if x > 0 else math.inf)


def _medians(points: Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
  """One point per size (the median time of its lines), by size."""
  by_size: dict[float, list[float]] = {}
  for x, y in points:
    by_size.setdefault(x, []).append(y)
  return tuple((x, float(np.median(ys))) for x, ys in sorted(by_size.items()))


def _fit(points: Iterable[tuple[float, float]]) -> LinkCost:
  """``seconds = latency + bus_bytes / bandwidth`` by least squares of the
  relative error (every size counts alike, not only the largest); a fit
  that is not physical (negative latency, no growth with size) falls back
  to the smallest time as latency and the largest message's rate."""
  xs, ys = map(np.asarray, zip(*points))
  smallest = float(ys[np.argmin(xs)])
  if np.ptp(xs) > 0:
    slope, intercept = np.polyfit(xs, ys, 1, w=1.0 / ys)
    if slope > 0 and intercept >= 0:
      return LinkCost(float(intercept), float(1.0 / slope))
  latency = max(0.0, min(smallest, float(ys.min())))
  i = int(np.argmax(xs))
  extra = float(ys[i]) - latency
  bandwidth = float(xs[i]) / extra if extra > 0 and xs[i] > 0 else math.inf
  return LinkCost(latency, bandwidth)
