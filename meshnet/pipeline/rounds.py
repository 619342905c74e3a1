"""A schedule packed into rounds: what the executor runs in lockstep.

The executor's devices meet once per round (one ``ppermute`` of activations
forward and one of cotangents back), so a round lasts as long as its
busiest device. A table with one op per tick would make a tick holding a
backward next to a forward cost a backward on both devices (1F1B in
lockstep would lose a third of its speed). :func:`pack` therefore gives
every device up to one op of each kind per round, run in the order F, B, W:
each device takes the next ops of its own order (the table's, per device)
while their inputs are ready (from another device: sent in an earlier round;
from itself: an earlier round, or earlier in this one: a last stage's F
then B of the same microbatch), stopping at the first op that is not ready
or whose kind it already runs this round. In steady 1F1B every device then
runs one F and one B per round, and the lockstep costs nothing.

:attr:`Rounds.bubble` times the rounds with F = 1, B = 2 (1 when split), W = 1
per chunk (divided by ``v``): the idle fraction of ``S`` devices over the
sum of the rounds' longest device times. ``S * (1 - bubble)`` is the
speedup the executor can reach over one device running the same ops.
:meth:`Rounds.timed` times them with each stage's own op costs instead (say,
measured: ``benchmarks/scaling.py`` does), so unequal stages count.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from meshnet.errors import MeshnetError
from meshnet.pipeline.schedules import B, F, W, Op, Schedule, _dependencies, op_costs

KINDS = (F, B, W)


@dataclasses.dataclass(frozen=True)
class Rounds:
  """A schedule packed into lockstep rounds.

  Attributes:
    schedule: the schedule packed.
    ops: ``ops[r][d]``: the ops device ``d`` runs in round ``r``, in the
      order F, B, W (at most one of each).
  """

  schedule: Schedule
  ops: tuple[tuple[tuple[Op, ...], ...], ...]

  @property
  def num_rounds(self) -> int:
    return len(self.ops)

  def round_times(self, seconds: Mapping[tuple[str, int], float] | None = None
                  ) -> list[float]:
    """Each round's duration: its busiest device's sum of op costs.

    ``seconds[(kind, k)]``: what op ``kind`` (F, B, W) of virtual stage
    ``k`` costs (device ``d``'s chunk ``c`` is virtual stage ``c * S + d``),
    e.g. measured per stage, so unequal stages count; by default every
    stage costs the same (:func:`~meshnet.pipeline.schedules.op_costs`)."""
    return [max(times) for times in self._device_times(seconds)]

  def timed(self, seconds: Mapping[tuple[str, int], float] | None = None
            ) -> tuple[float, float]:
    """``(duration, busy)``: the rounds' total duration and every device's
    work summed, with op costs ``seconds`` (see :meth:`round_times`)."""
    rows = self._device_times(seconds)
    return sum(max(times) for times in rows), sum(sum(times) for times in rows)

  def _device_times(self, seconds: Mapping[tuple[str, int], float] | None
                    ) -> list[list[float]]:
    S = self.schedule.num_stages
    K = S * self.schedule.virtual_stages
    if seconds is None:
      cost = op_costs(self.schedule)
      seconds = {(kind, k): cost[kind] for kind in KINDS for k in range(K)}
    kinds = {op.kind for row in self.ops for ops in row for op in ops}
    missing = [(kind, k) for kind in sorted(kinds) for k in range(K) if (kind, k) not in seconds]
    if missing:
      split = " (its backward is split: W too)" if W in kinds else ""
      more = " ..." if len(missing) > 8 else ""
      raise MeshnetError(
          f"op costs lack {missing[:8]}{more}: give seconds[(kind, virtual stage)] for "
          f"each of {sorted(kinds)}{split} on each virtual stage 0..{K - 1}")
    return [[sum(seconds[(op.kind, op.chunk * S + d)] for op in ops)
             for d, ops in enumerate(row)] for row in self.ops]

  @property
  def bubble(self) -> float:
    """Idle fraction of the devices' time over the rounds."""
    duration, busy = self.timed()
    return 1.0 - busy / (self.schedule.num_stages * duration)

  @property
  def speedup(self) -> float:
    """``S * (1 - bubble)``: the speedup over one device running the same ops."""
    return self.schedule.num_stages * (1.0 - self.bubble)


def pack(schedule: Schedule) -> Rounds:
  """Packs ``schedule`` into rounds (see the module docstring).

  Raises:
    MeshnetError: the table's orders cannot make progress (a validated
      schedule always can).
  """
  S, v = schedule.num_stages, schedule.virtual_stages
  split = schedule.split_backward
  orders = [[row[d] for row in schedule.table if row[d] is not None] for d in range(S)]
  position = [0] * S
  done: dict[tuple[int, Op], int] = {}  # (device, op) -> round
  rounds: list[tuple[tuple[Op, ...], ...]] = []
  remaining = sum(len(o) for o in orders)
  while remaining:
    r = len(rounds)
    row: list[tuple[Op, ...]] = []
    for d in range(S):
      taken: list[Op] = []
      while position[d] < len(orders[d]):
        op = orders[d][position[d]]
        if any(t.kind == op.kind for t in taken) or not all(
            done.get(dep, r + 1) < r or (dep[0] == d and dep in done and
                                         KINDS.index(dep[1].kind) < KINDS.index(op.kind))
            for dep in _dependencies(op, d, S, v, split)):
          break
        taken.append(op)
        done[(d, op)] = r
        position[d] += 1
      row.append(tuple(sorted(taken, key=lambda op: KINDS.index(op.kind))))
    if not any(row):
      raise MeshnetError(f"schedule {schedule.name!r} cannot be packed into rounds "
                         f"(no device can run an op in round {r})")
    remaining -= sum(len(ops) for ops in row)
    rounds.append(tuple(row))
  return Rounds(schedule, tuple(rounds))
