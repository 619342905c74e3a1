"""``meshnet profile DIR``: where the time of traced training steps went.

Reads what ``meshnet train --profile-steps A:B DIR`` wrote
(:mod:`meshnet.profiling`): each process's ``jax.profiler`` trace, read with
``jax.profiler.ProfileData``, and the compiled step's HLO, which says what
each timed op is (:mod:`meshnet.hlo`). Per traced step and process it gives
the step's time, the time in compute and in each collective kind, the bytes
each kind moved, and the collectives by named scope (``gradient_exchange``,
``pipeline_send``, ...).

How the numbers are made, from the trace's op events (each carries
``hlo_op``, ``hlo_module``, ``run_id`` and ``device_ordinal``):

* a step is one execution (``run_id``) of the train step's module;
* on each device, an op's time is its own: the ops nested in it (a
  ``conditional``'s branch, a ``while``'s body) are taken out of it;
* a device's step time runs from its first op's start to its last op's end;
  ``idle`` is what no op of the step covered (waiting for work, launch);
* times and bytes are per device: the mean over the process's devices.

On CPU, a collective's time is from the moment its thread reaches it to the
moment it returns, so it includes waiting for the slowest peer (another
device's thread, or another process) to reach it, not only moving the bytes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections import defaultdict
from typing import Any, Iterable, Sequence

from meshnet.errors import MeshnetError
from meshnet.hlo import COLLECTIVE_KINDS, HloModule, HloOp, parse_hlo
from meshnet.profiling import HLO_FILE, META_FILE, holds_trace

# Named scopes of meshnet's steps (meshnet.step, meshnet.pipeline.executor); a
# collective counts under the innermost of them in its path.
SCOPES = ("train_step", "optimizer_update", "gradient_exchange", "pipeline_rounds",
          "pipeline_forward", "pipeline_backward", "pipeline_weight_gradient",
          "pipeline_send", "pipeline_loss", "stage_gather", "eval_reduce")
KIND_ORDER = tuple(dict.fromkeys(COLLECTIVE_KINDS.values()))
NO_SCOPE = "(none)"
CPU_NOTE = ("on CPU a collective's time includes waiting for the slowest peer (another "
            "device's thread or another process) to reach it, not only moving its bytes")


@dataclasses.dataclass(frozen=True)
class CollectiveTime:
  """One collective kind under one named scope, in one step, per device.

  Attributes:
    kind: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all``,
      ``collective-permute`` or ``collective-broadcast``.
    scope: the innermost of the known named scopes in the op's path
      (``gradient_exchange``), or ``"(none)"``.
    calls: how many times the step ran such ops.
    ms: their time.
    bytes: the bytes they moved (per call: the buffer each device puts in,
      the gathered result for an all-gather; :class:`meshnet.hlo.HloOp`).
  """

  kind: str
  scope: str
  calls: float
  ms: float
  bytes: float


@dataclasses.dataclass(frozen=True)
class StepProfile:
  """One traced step on one process; times in ms, per device (the mean over
  the process's ``devices``).

  Attributes:
    process: the process index.
    step: the step, as the progress line counts them (from 1).
    devices: the process's devices that ran the step.
    time_ms: from the first op's start to the last op's end.
    compute_ms: in ops that are not collectives.
    collectives: by kind and named scope.
    busy_ms: the part of ``time_ms`` in which at least one op ran. Ops on
      different threads of a device can run at once (the CPU runtime runs
      independent ops side by side), so ``compute_ms`` plus ``collective_ms``
      can exceed it; the excess is ``overlap_ms``.
  """

  process: int
  step: int
  devices: int
  time_ms: float
  compute_ms: float
  collectives: tuple[CollectiveTime, ...]
  busy_ms: float

  def kind_ms(self, kind: str) -> float:
    return sum(c.ms for c in self.collectives if c.kind == kind)

  def kind_bytes(self, kind: str) -> float:
    return sum(c.bytes for c in self.collectives if c.kind == kind)

  @property
  def collective_ms(self) -> float:
    return sum(c.ms for c in self.collectives)

  @property
  def idle_ms(self) -> float:
    """The step's time in which no op ran."""
    return max(0.0, self.time_ms - self.busy_ms)

  @property
  def overlap_ms(self) -> float:
    """Op time counted twice because ops ran at once (on other threads):
    ``compute_ms + collective_ms - overlap_ms + idle_ms == time_ms``."""
    return max(0.0, self.compute_ms + self.collective_ms - self.busy_ms)

  def to_dict(self) -> dict[str, Any]:
    kinds = {kind: {"ms": self.kind_ms(kind), "bytes": _exact(self.kind_bytes(kind)),
                    "calls": _exact(sum(c.calls for c in self.collectives if c.kind == kind))}
             for kind in _kinds([self])}
    return {"process": self.process, "step": self.step, "devices": self.devices,
            "time_ms": self.time_ms, "compute_ms": self.compute_ms,
            "collective_ms": self.collective_ms, "idle_ms": self.idle_ms,
            "overlap_ms": self.overlap_ms,
            "collectives": kinds,
            "scopes": [{**dataclasses.asdict(c), "calls": _exact(c.calls),
                        "bytes": _exact(c.bytes)} for c in self.collectives]}


@dataclasses.dataclass(frozen=True)
class ProfileSummary:
  """What :func:`profile_summary` read.

  Attributes:
    directory: the profile directory.
    module: the train step's HLO module (``jit_step``).
    platform: ``cpu``, ``gpu`` or ``tpu``.
    processes: how many processes wrote a trace.
    steps: one entry per traced step and process, by process then step.
    notes: what to know when reading the numbers (the CPU caveat; a process
      whose trace is incomplete).
  """

  directory: str
  module: str
  platform: str
  processes: int
  steps: tuple[StepProfile, ...]
  notes: tuple[str, ...]

  def to_dict(self) -> dict[str, Any]:
    return {"directory": self.directory, "module": self.module,
            "platform": self.platform, "processes": self.processes,
            "units": {"time": "ms per device (mean over the process's devices)",
                      "bytes": "buffer per device per step (nccl-tests' size: an "
                               "all-gather's result, the others' input)"},
            "steps": [s.to_dict() for s in self.steps], "notes": list(self.notes)}


class _Event:
  __slots__ = ("op", "start", "end", "own")

  def __init__(self, op: str, start: float, end: float):
    self.op, self.start, self.end, self.own = op, start, end, end - start


def profile_summary(directory: str, *, scopes: Sequence[str] = SCOPES) -> ProfileSummary:
  """Summarises the traces ``meshnet train --profile-steps A:B DIR`` wrote.

  Args:
    directory: that ``DIR`` (or one process's ``DIR/process_<i>``).
    scopes: the named scopes to group collectives by; an op counts under the
      innermost of them in its ``named_scope`` path.

  Returns:
    Per traced step and process: time, compute, each collective kind's time
    and bytes, by scope.

  Raises:
    MeshnetError: ``directory`` holds no meshnet profile.
  """
  process_dirs = _process_dirs(directory)
  steps: list[StepProfile] = []
  notes: list[str] = []
  modules, platforms = set(), set()
  for path in process_dirs:
    meta = _read_meta(path)
    modules.add(meta.get("module", ""))
    platforms.add(meta.get("platform", ""))
    steps.extend(_process_steps(path, meta, scopes, notes))
  platform = "/".join(sorted(p for p in platforms if p)) or "unknown"
  if "cpu" in platforms:
    notes.insert(0, CPU_NOTE)
  return ProfileSummary(directory, "/".join(sorted(m for m in modules if m)), platform,
                        len(process_dirs), tuple(steps), tuple(notes))


def _process_dirs(directory: str) -> list[str]:
  if os.path.isfile(os.path.join(directory, META_FILE)):
    return [directory]
  found = glob.glob(os.path.join(glob.escape(directory), "process_*", META_FILE))
  dirs = [os.path.dirname(p) for p in found]
  dirs.sort(key=lambda d: int(d.rsplit("_", 1)[-1]) if d.rsplit("_", 1)[-1].isdigit() else -1)
  if not dirs:
    if not os.path.exists(directory):
      what = "does not exist"
    elif not os.path.isdir(directory):
      what = "is a file, not a directory"
    elif holds_trace(directory):
      what = ("holds a jax.profiler trace of another program, without the step's HLO "
              "meshnet profile reads; open its .trace.json.gz in Perfetto instead")
    else:
      what = "holds no meshnet profile"
    raise MeshnetError(
        f"no profile trace in {directory}: it {what} (looked for "
        f"{os.path.join(directory, 'process_*', META_FILE)}); write one with meshnet train "
        f"--profile-steps A:B {directory}")
  return dirs


def _read_meta(path: str) -> dict[str, Any]:
  try:
    with open(os.path.join(path, META_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise MeshnetError(f"cannot read {os.path.join(path, META_FILE)} ({e}); trace the "
                       "steps again with meshnet train --profile-steps A:B DIR") from None


def _trace_file(path: str) -> str | None:
  found = glob.glob(os.path.join(glob.escape(path), "**", "*.xplane.pb"), recursive=True)
  return max(found, key=os.path.getmtime) if found else None


def _process_steps(path: str, meta: dict[str, Any], scopes: Sequence[str],
                   notes: list[str]) -> list[StepProfile]:
  process = int(meta.get("process_index", 0))
  trace = _trace_file(path)
  if trace is None:
    notes.append(f"process {process}: no trace file in {path} (the run stopped before "
                 "writing it)")
    return []
  try:
    with open(os.path.join(path, HLO_FILE)) as f:
      module = parse_hlo(f.read())
  except OSError:
    module = HloModule(meta.get("module", ""), {})
    notes.append(f"process {process}: no {HLO_FILE}: every op counts as compute")
  if not meta.get("complete", True):
    traced = meta.get("steps") or []
    notes.append(f"process {process}: the run stopped before the end of --profile-steps "
                 f"{meta['range'][0]}:{meta['range'][1]}; traced: "
                 f"{', '.join(map(str, traced)) or 'none'}")
  runs = _read_events(trace, module.name or meta.get("module", ""))
  labels = list(meta.get("steps") or [])
  if len(runs) != len(labels):
    notes.append(f"process {process}: the trace holds {len(runs)} executions of "
                 f"{module.name or 'the step'} for {len(labels)} traced steps "
                 f"{labels}; numbered from the first")
    first = labels[0] if labels else 1
    labels = list(range(first, first + len(runs)))
  return [_step_profile(process, step, devices, module, scopes)
          for step, devices in zip(labels, runs)]


def _read_events(trace: str, module: str) -> list[dict[Any, dict[Any, list[_Event]]]]:
  """The op events of ``module``'s executions in ``trace``, in time order:
  per execution, per device, per thread (``(plane, line)``) a list of events."""
  from jax.profiler import ProfileData

  data = ProfileData.from_file(trace)
  runs: dict[Any, dict[Any, dict[Any, list[_Event]]]] = defaultdict(
      lambda: defaultdict(lambda: defaultdict(list)))
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get("hlo_op")
        if op is None or (module and stats.get("hlo_module") != module):
          continue
        device = stats.get("device_ordinal", plane.name)
        runs[stats.get("run_id")][device][(plane.name, line.name)].append(
            _Event(op, event.start_ns, event.end_ns))
  return sorted(runs.values(), key=lambda devices: min(
      e.start for threads in devices.values() for events in threads.values()
      for e in events))


def _own_times(events: list[_Event]) -> None:
  """Takes each event's nested events (on the same thread) out of its time."""
  events.sort(key=lambda e: (e.start, -e.end))
  stack: list[_Event] = []
  for event in events:
    while stack and stack[-1].end <= event.start:
      stack.pop()
    if stack:
      parent = stack[-1]
      parent.own -= min(event.end, parent.end) - event.start
    stack.append(event)


def _scope(op_name: str, scopes: Sequence[str]) -> str:
  parts = [p.strip("()").split(":")[0] for p in op_name.split("/")]
  return next((p for p in reversed(parts) if p in scopes), NO_SCOPE)


def _step_profile(process: int, step: int, devices: dict[Any, dict[Any, list[_Event]]],
                  module: HloModule, scopes: Sequence[str]) -> StepProfile:
  n = len(devices)
  time_ns = compute_ns = busy_ns = 0.0
  by_scope: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
  unknown = HloOp("", None, 0, "")
  for threads in devices.values():
    events = [e for thread in threads.values() for e in thread]
    time_ns += max(e.end for e in events) - min(e.start for e in events)
    busy_ns += _covered(events)
    for thread in threads.values():
      _own_times(thread)
    for event in events:
      op = module.ops.get(event.op, unknown)
      if op.kind is None:
        compute_ns += event.own
        continue
      total = by_scope[(op.kind, _scope(op.op_name, scopes))]
      total[0] += 0 if op.opcode.endswith("-done") else 1
      total[1] += event.own
      total[2] += op.bytes
  order = {kind: i for i, kind in enumerate(KIND_ORDER)}
  collectives = tuple(
      CollectiveTime(kind, scope, calls / n, ns / n / 1e6, nbytes / n)
      for (kind, scope), (calls, ns, nbytes) in sorted(
          by_scope.items(), key=lambda item: (order.get(item[0][0], 99), item[0][1])))
  return StepProfile(process, step, n, time_ns / n / 1e6, compute_ns / n / 1e6, collectives,
                     busy_ns / n / 1e6)


def _covered(events: list[_Event]) -> float:
  """The length of the union of the events' intervals (ns)."""
  covered = 0.0
  end = -math.inf
  for event in sorted(events, key=lambda e: e.start):
    if event.end > end:
      covered += event.end - max(event.start, end)
      end = event.end
  return covered


def _kinds(steps: Iterable[StepProfile]) -> list[str]:
  present = {c.kind for s in steps for c in s.collectives}
  return [kind for kind in KIND_ORDER if kind in present]


def _exact(value: float) -> float | int:
  """``value``, as an int when it is whole (bytes and calls of equal devices)."""
  return int(value) if float(value).is_integer() else value


def _number(value: float) -> str:
  return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _table(header: list[str], rows: list[list[str]], left: int = 0) -> list[str]:
  """Columns padded to their widest cell; the first ``left`` left-aligned."""
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  return ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths))).rstrip()
          for r in [header, *rows]]


def format_profile(summary: ProfileSummary) -> str:
  """The summary as tables: one row per step and process, then the
  collectives by named scope (mean per step), then the notes."""
  steps = summary.steps
  traced = sorted({s.step for s in steps})
  span = (f"step {traced[0]}" if len(traced) == 1
          else f"steps {traced[0]}-{traced[-1]}" if traced else "no steps")
  plural = "es" if summary.processes != 1 else ""
  lines = [f"profile {summary.directory}: {summary.module or 'train step'} on "
           f"{summary.platform}, {summary.processes} process{plural}, {span}",
           "times in ms per device (the mean over each process's devices); idle: no op "
           "of the step running on the device",
           "bytes: each collective's buffer per device per step (nccl-tests' size, as "
           "bench collectives counts it; a ring all-reduce sends 2(n-1)/n of it: the "
           "bytes meshnet plan reports as sent)"]
  kinds = _kinds(steps)
  overlap = any(s.overlap_ms >= 0.0005 for s in steps)
  if overlap:
    lines.append("overlap: op time in which another op of the step ran too (on another "
                 "thread), counted in both; compute + collectives - overlap + idle = step")
  header = (["process", "step", "devices", "step ms", "compute ms"]
            + [f"{k} ms" for k in kinds] + ["overlap ms"] * overlap + ["idle ms"]
            + [f"{k} bytes" for k in kinds])
  rows = [[str(s.process), str(s.step), str(s.devices), f"{s.time_ms:.3f}",
           f"{s.compute_ms:.3f}"] + [f"{s.kind_ms(k):.3f}" for k in kinds]
          + [f"{s.overlap_ms:.3f}"] * overlap
          + [f"{s.idle_ms:.3f}"] + [_number(s.kind_bytes(k)) for k in kinds]
          for s in steps]
  lines += ["", *_table(header, rows)]
  if kinds:
    lines += ["", "collectives by named scope (per step, mean over the traced steps):"]
    totals: dict[tuple[int, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    counts: dict[int, int] = defaultdict(int)
    for s in steps:
      counts[s.process] += 1
      for c in s.collectives:
        total = totals[(s.process, c.scope, c.kind)]
        total[0] += c.calls
        total[1] += c.ms
        total[2] += c.bytes
    rows = [[str(p), scope, kind, _number(calls / counts[p]), f"{ms / counts[p]:.3f}",
             _number(nbytes / counts[p])]
            for (p, scope, kind), (calls, ms, nbytes) in totals.items()]
    lines += _table(["process", "scope", "kind", "calls", "ms", "bytes"], rows, left=3)
  if not steps:
    lines.append("no executions of the train step in the trace")
  if summary.notes:
    lines += ["", *(f"note: {note}" for note in summary.notes)]
  return "\n".join(lines)
