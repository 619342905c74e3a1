"""Pipeline schedules as data: a table of ticks x stages.

A schedule for ``S`` devices on the ``stage`` axis, ``v`` virtual stages
(chunks) per device and ``M`` microbatches is a table ``table[tick][device]``
whose entries are ``None`` (idle) or an :class:`Op`:

  ``F``  forward of microbatch ``m`` through chunk ``c`` of this device
  ``B``  backward (input and weight gradients together), or, in schedules
         that split the backward, the input gradient only
  ``W``  weight gradient only (split-backward schedules)

Virtual stage ``c * S + d`` is chunk ``c`` of device ``d``; activations flow
from virtual stage ``k`` to ``k + 1`` (device ``d`` to ``d + 1``, wrapping from
the last device to the first for the next chunk) and cotangents back.

Built-in schedules are first written as the order in which each device runs
its ops; :func:`from_orders` places every op at the earliest tick where its
inputs were produced at least one tick before (the executor's rule: what a
device sends at tick ``t`` arrives for tick ``t + 1``).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple, Sequence

from meshnet.errors import MeshnetError

F, B, W = "F", "B", "W"
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")


class Op(NamedTuple):
  """One unit of work: ``kind`` (F, B or W) of ``microbatch`` on ``chunk``."""

  kind: str
  microbatch: int
  chunk: int = 0

  def __str__(self) -> str:
    return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


Table = tuple[tuple[Op | None, ...], ...]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A validated schedule.

  Attributes:
    name: schedule name (``gpipe``, ``1f1b``, ``interleaved``, ``zb`` or
      ``custom``).
    num_stages: devices on the ``stage`` axis (``S``).
    num_microbatches: ``M``.
    virtual_stages: chunks per device (``v``); the model has ``S * v`` stages.
    split_backward: whether ``B`` is the input gradient only and ``W`` the
      weight gradient (zero-bubble style).
    table: ``table[tick][device]``: an :class:`Op` or ``None`` (idle).
  """

  name: str
  num_stages: int
  num_microbatches: int
  virtual_stages: int
  split_backward: bool
  table: Table

  @property
  def num_ticks(self) -> int:
    return len(self.table)

  @property
  def tick_bubble(self) -> float:
    """Idle fraction of the table's device-ticks (each op one tick)."""
    idle = sum(op is None for row in self.table for op in row)
    return idle / (self.num_ticks * self.num_stages)

  @property
  def bubble(self) -> float:
    """Theoretical bubble: idle fraction of the time when a forward costs 1,
    a full backward 2, and a split backward 1 (input) + 1 (weights), per
    chunk divided by ``v``, each device running its ops in the table's order
    as early as its inputs allow. GPipe and 1F1B give (S-1)/(M+S-1)."""
    return _timed_bubble(self)


def _stage_of(op: Op, device: int, num_stages: int) -> int:
  return op.chunk * num_stages + device


def _device_chunk(stage: int, num_stages: int) -> tuple[int, int]:
  return stage % num_stages, stage // num_stages


def _dependencies(op: Op, device: int, num_stages: int, num_virtual: int,
                  split: bool) -> list[tuple[int, Op]]:
  """(device, op) pairs that must finish before ``op`` on ``device`` starts."""
  stage = _stage_of(op, device, num_stages)
  last = num_stages * num_virtual - 1
  deps: list[tuple[int, Op]] = []
  if op.kind == F and stage > 0:
    d, c = _device_chunk(stage - 1, num_stages)
    deps.append((d, Op(F, op.microbatch, c)))
  if op.kind == B:
    deps.append((device, Op(F, op.microbatch, op.chunk)))
    if stage < last:
      d, c = _device_chunk(stage + 1, num_stages)
      deps.append((d, Op(B, op.microbatch, c)))
  if op.kind == W:
    deps.append((device, Op(B, op.microbatch, op.chunk)))
  return deps


def from_orders(
    name: str, orders: Sequence[Sequence[Op]], num_microbatches: int,
    virtual_stages: int = 1, split_backward: bool = False,
) -> Schedule:
  """Places each device's ops, in its order, at the earliest valid tick.

  Args:
    name: schedule name.
    orders: ``orders[d]`` lists device ``d``'s ops in the order it runs them.
    num_microbatches: ``M``.
    virtual_stages: chunks per device.
    split_backward: ``B`` is input-gradient only and ``W`` exists.

  Raises:
    MeshnetError: the orders deadlock (an op waits on one that never comes).
  """
  num_stages = len(orders)
  done: dict[tuple[int, Op], int] = {}  # (device, op) -> tick it ran
  position = [0] * num_stages
  ticks: list[list[Op | None]] = []
  total = sum(len(o) for o in orders)
  while len(done) < total:
    tick = len(ticks)
    row: list[Op | None] = [None] * num_stages
    for d in range(num_stages):
      if position[d] == len(orders[d]):
        continue
      op = orders[d][position[d]]
      deps = _dependencies(op, d, num_stages, virtual_stages, split_backward)
      if all(done.get(dep, tick) < tick for dep in deps):
        row[d] = op
    if not any(row):
      waiting = [(d, orders[d][position[d]]) for d in range(num_stages)
                 if position[d] < len(orders[d])]
      raise MeshnetError(
          f"schedule {name!r} deadlocks at tick {tick}: device {waiting[0][0]} waits "
          f"to run {waiting[0][1]} whose inputs never come"
      )
    for d, op in enumerate(row):
      if op is not None:
        done[(d, op)] = tick
        position[d] += 1
    ticks.append(row)
  schedule = Schedule(name, num_stages, num_microbatches, virtual_stages, split_backward,
                      tuple(tuple(r) for r in ticks))
  validate(schedule)
  return schedule


def validate(schedule: Schedule) -> None:
  """Checks a schedule's table; raises naming the first tick and stage at fault.

  Rules: every device runs exactly one F and one B (and one W when the
  backward is split) of every microbatch on every chunk; an op's inputs are
  produced at least one tick earlier (F after the previous stage's F; B
  after its own F and the next stage's B; W after its own B).

  Raises:
    MeshnetError: with the first (tick, device) that breaks a rule.
  """
  S, M, v = schedule.num_stages, schedule.num_microbatches, schedule.virtual_stages
  split = schedule.split_backward
  seen: dict[tuple[int, Op], int] = {}
  for tick, row in enumerate(schedule.table):
    if len(row) != S:
      raise MeshnetError(f"schedule tick {tick} has {len(row)} entries for {S} stages")
    for d, op in enumerate(row):
      if op is None:
        continue
      where = f"schedule {schedule.name!r}, tick {tick}, stage {d}: {op}"
      if op.kind not in (F, B, W) or (op.kind == W and not split):
        raise MeshnetError(f"{where} is not a valid op (use F, B{', W' if split else ''})")
      if not (0 <= op.microbatch < M and 0 <= op.chunk < v):
        raise MeshnetError(f"{where} names microbatch/chunk outside M={M}, v={v}")
      if (d, op) in seen:
        raise MeshnetError(f"{where} runs a second time (first at tick {seen[(d, op)]})")
      for dep in _dependencies(op, d, S, v, split):
        if seen.get(dep, tick) >= tick:
          raise MeshnetError(
              f"{where} needs {dep[1]} on stage {dep[0]} at least one tick earlier")
      seen[(d, op)] = tick
  kinds = (F, B, W) if split else (F, B)
  for d in range(S):
    for c in range(v):
      for m in range(M):
        for kind in kinds:
          if (d, Op(kind, m, c)) not in seen:
            raise MeshnetError(
                f"schedule {schedule.name!r}: stage {d} never runs {Op(kind, m, c)}")


def op_costs(schedule: Schedule) -> dict[str, float]:
  """Time units of each op kind: F = 1, B = 2 (1 when the backward is
  split), W = 1, per chunk (divided by ``v``)."""
  v = schedule.virtual_stages
  return {F: 1.0 / v, B: (1.0 if schedule.split_backward else 2.0) / v, W: 1.0 / v}


def _timed_bubble(schedule: Schedule) -> float:
  S, v = schedule.num_stages, schedule.virtual_stages
  cost = op_costs(schedule)
  orders = [[row[d] for row in schedule.table if row[d] is not None] for d in range(S)]
  finish: dict[tuple[int, Op], float] = {}
  free = [0.0] * S
  position = [0] * S
  remaining = sum(len(o) for o in orders)
  while remaining:
    progressed = False
    for d in range(S):
      while position[d] < len(orders[d]):
        op = orders[d][position[d]]
        deps = _dependencies(op, d, S, v, schedule.split_backward)
        if any(dep not in finish for dep in deps):
          break
        start = max([free[d]] + [finish[dep] for dep in deps])
        finish[(d, op)] = free[d] = start + cost[op.kind]
        position[d] += 1
        remaining -= 1
        progressed = True
    if not progressed:  # cannot happen for a validated table
      raise MeshnetError(f"schedule {schedule.name!r} cannot be timed")
  busy = sum(cost[op.kind] for order in orders for op in order)
  return 1.0 - busy / (S * max(free))


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
  """All forwards, then all backwards (in reverse microbatch order)."""
  M = num_microbatches
  orders = [[Op(F, m) for m in range(M)] + [Op(B, m) for m in reversed(range(M))]
            for _ in range(num_stages)]
  return from_orders("gpipe", orders, M)


def _warmup(num_stages: int, device: int, num_microbatches: int) -> int:
  """Forwards device ``d`` runs before its first backward: ``2 (S - d - 1)``.

  meshnet's executor runs in lockstep rounds (:mod:`meshnet.pipeline.rounds`),
  where a microbatch's trip from device ``d`` to the last stage and back
  takes ``2 (S - d - 1)`` rounds; with fewer warm-up forwards (the
  ``S - d - 1`` of an asynchronous 1F1B) device ``d`` would wait idle in
  every round of that trip. Megatron's interleaved schedule warms up the same
  way. In the timed simulation both give the same bubble."""
  return min(2 * (num_stages - device - 1), num_microbatches)


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
  """1F1B: ``2 (S - d - 1)`` warm-up forwards on device ``d`` (see
  :func:`_warmup`), then one forward and one backward in turn, then the
  remaining backwards. At most ``2 (S - d) - 1`` microbatches are in flight
  on device ``d``, whatever ``M`` (GPipe: ``M``)."""
  S, M = num_stages, num_microbatches
  orders = []
  for d in range(S):
    warmup = _warmup(S, d, M)
    order = [Op(F, m) for m in range(warmup)]
    for i in range(M - warmup):
      order += [Op(F, warmup + i), Op(B, i)]
    order += [Op(B, m) for m in range(M - warmup, M)]
    orders.append(order)
  return from_orders("1f1b", orders, M)


def zero_bubble_h1(num_stages: int, num_microbatches: int) -> Schedule:
  """ZB-H1: 1F1B with the backward split into input (B) and weight (W)
  gradients. Device ``d`` keeps up to ``d`` weight gradients pending: the
  later stages, on the critical path of the cotangents, run B first and W
  later, in what would have been their idle ticks. Warm-up as in 1F1B
  (:func:`_warmup`); in-flight microbatches per device stay bounded
  whatever ``M`` (1F1B's plus ``d`` pending Ws); the timed bubble is about
  a third of 1F1B's."""
  S, M = num_stages, num_microbatches
  orders = []
  for d in range(S):
    warmup = _warmup(S, d, M)
    order = [Op(F, m) for m in range(warmup)]
    pending: list[int] = []

    def backward(i):
      pending.append(i)
      ops = [Op(B, i)]
      while len(pending) > d:
        ops.append(Op(W, pending.pop(0)))
      return ops

    for i in range(M - warmup):
      order += [Op(F, warmup + i)] + backward(i)
    for i in range(M - warmup, M):
      order += backward(i)
    order += [Op(W, m) for m in pending]
    orders.append(order)
  return from_orders("zb", orders, M, split_backward=True)


def _rounds(num_stages: int, num_microbatches: int) -> list[range]:
  """Microbatch ids cut into ``max(1, M // S)`` rounds of consecutive ids, sizes
  as equal as possible, the larger first: ``S`` to ``2S - 1`` each when
  ``M >= S``, all exactly ``S`` when ``M % S == 0``."""
  count = max(1, num_microbatches // num_stages)
  size, larger = divmod(num_microbatches, count)
  rounds, start = [], 0
  for r in range(count):
    stop = start + size + (r < larger)
    rounds.append(range(start, stop))
    start = stop
  return rounds


def interleaved(num_stages: int, num_microbatches: int, virtual_stages: int) -> Schedule:
  """Interleaved 1F1B (Megatron), for any ``M >= S``.

  Rule: microbatches go in ``M // S`` rounds of consecutive ids, ``S`` to
  ``2S - 1`` each, the larger first (all ``S`` when ``M % S == 0``: Megatron's
  groups). Each device runs the forwards round by round, within a round chunk
  ``0`` of all the round's microbatches, then chunk ``1``, and so on; the
  backwards the same way with the chunks reversed. Device ``d`` first runs
  ``(v - 1) * G + 2 * (S - d - 1)`` warm-up forwards, ``G`` the first round's
  size (hence the larger rounds first: a smaller first round can deadlock),
  then one forward and one backward in turn, then the remaining backwards.
  Where torch's flexible ``ScheduleInterleaved1F1B`` accepts ``M`` (equal
  rounds) this is its order; unequal rounds extend it to every ``M >= S``.

  Bubble: ``(S - 1) / (v * M + S - 1)`` of the time (``(S - 1) / (v * M)`` of
  the ideal), for every ``M >= S``, multiple of ``S`` or not; 1F1B's is
  ``(S - 1) / (M + S - 1)``. Measured with :attr:`Schedule.bubble` for all
  ``S <= 8``, ``v <= 4``, ``S <= M <= 4S + 3``; e.g. ``S=4, v=2``: ``M=5``
  0.231 (1F1B 0.375), ``M=6`` 0.200 (0.333), ``M=7`` 0.176 (0.300).

  Memory: device 0 holds the most chunk activations in flight (forwards
  whose backward has not run): ``min((v - 1) * G + 2 * S - 1, v * M)``,
  measured from the tables over the same range. As ``G <= 2S - 1`` that is
  at most ``v * (2S - 1)`` chunks, each ``1/v`` of the device's layers:
  under ``2S`` microbatches' worth whatever ``M`` (at most ``S + (S - 1) / v`` when
  ``M % S == 0``; 1F1B: ``S``).
  """
  S, M, v = num_stages, num_microbatches, virtual_stages
  rounds = _rounds(S, M)
  fwd = [Op(F, m, c) for r in rounds for c in range(v) for m in r]
  bwd = [Op(B, m, c) for r in rounds for c in reversed(range(v)) for m in r]
  orders = []
  for d in range(S):
    warmup = min((v - 1) * len(rounds[0]) + 2 * (S - d - 1), len(fwd))
    order = fwd[:warmup]
    rest = fwd[warmup:]
    for i, op in enumerate(rest):
      order += [op, bwd[i]]
    order += bwd[len(rest):]
    orders.append(order)
  return from_orders("interleaved", orders, M, virtual_stages=v)


def make_schedule(name: str, num_stages: int, num_microbatches: int,
                  virtual_stages: int = 1) -> Schedule:
  """The built-in schedule ``name`` (one of :data:`SCHEDULES`).

  Raises:
    MeshnetError: unknown name, fewer microbatches than a schedule needs, or
      ``virtual_stages`` given to a schedule without chunks.
  """
  if num_stages < 1 or num_microbatches < 1:
    raise MeshnetError(
        f"a pipeline needs stages >= 1 and microbatches >= 1, got {num_stages} and "
        f"{num_microbatches}")
  if name not in SCHEDULES:
    raise MeshnetError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
  if name != "interleaved" and virtual_stages != 1:
    raise MeshnetError(
        f"schedule {name} has one chunk per device; virtual_stages={virtual_stages} "
        "needs --schedule interleaved")
  if name in ("1f1b", "interleaved", "zb") and num_microbatches < num_stages:
    raise MeshnetError(
        f"schedule {name} needs microbatches >= stages, got {num_microbatches} < "
        f"{num_stages}; use --microbatches {num_stages} or more (or gpipe)")
  if name == "gpipe":
    return gpipe(num_stages, num_microbatches)
  if name == "1f1b":
    return one_f_one_b(num_stages, num_microbatches)
  if name == "zb":
    return zero_bubble_h1(num_stages, num_microbatches)
  return interleaved(num_stages, num_microbatches, virtual_stages)


def custom(table: Iterable[Iterable[Op | tuple | None]], num_microbatches: int,
           virtual_stages: int = 1, split_backward: bool = False) -> Schedule:
  """A user's table (``table[tick][stage]`` of ``Op``/``(kind, m[, chunk])``/
  ``None``), validated.

  Raises:
    MeshnetError: naming the first tick and stage that break a rule.
  """
  rows = tuple(tuple(None if op is None else Op(*op) for op in row) for row in table)
  if not rows:
    raise MeshnetError("schedule table is empty")
  schedule = Schedule("custom", len(rows[0]), num_microbatches, virtual_stages,
                      split_backward, rows)
  validate(schedule)
  return schedule
