"""Buffers and per-round tables for the executor, from packed rounds.

Every device keeps three ring buffers per chunk: received activations (a
stage's input, from its arrival to its forward), received cotangents (from
arrival to the backward, or to the weight half when split) and residuals
(what the forward keeps for the backward, from the forward to the last
backward op); split schedules add a fourth, the carried buffer (what a
backward's input half passes to its weight half, from B to W; an idle
input half writes its trash slot). :func:`plan` assigns each (virtual stage, microbatch) a slot in
each buffer by interval colouring over the rounds' phases, and writes the
int32 tables ``[rounds, S]`` that the program indexes at run time. A round
that has nothing to store still stores (so stores need no branch): the
activation and cotangent buffers have one extra slot at the end for it, the
*trash* slot; the residual buffer, the big one, gets a trash slot only when
some idle forward finds no slot free at that moment (an idle forward writes
into a free slot, which a later forward overwrites before any read).

Phases in round ``r``: F at ``4r`` (it writes its residuals right after it
runs, before the round's B and W read), B at ``4r + 1``, W at ``4r + 2``;
what arrives by ``ppermute`` is stored at ``4r + 3``, before the next
round's ops read the buffers. A slot is free for a new value once its last
reader has run.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from meshnet.pipeline.rounds import Rounds
from meshnet.pipeline.schedules import B, F, W

TABLE_NAMES = (
    # forward: branch (0 idle, 1 + group), chunk, microbatch, input slot, first
    # stage?, residual slot it writes (the trash slot when idle)
    "f_branch", "f_chunk", "f_micro", "f_act", "f_first", "f_res",
    # backward (input half when split) and weight half: branch, chunk, microbatch,
    # residual slot, cotangent slot
    "b_branch", "b_chunk", "b_micro", "b_res", "b_cot",
    "w_branch", "w_chunk", "w_micro", "w_res", "w_cot",
    # split backward: the slot of the input half's carried words it writes (the
    # trash slot when idle) and the weight half reads
    "b_carry", "w_carry",
    # stores at the start of the round, of what the previous round received
    "s_act_chunk", "s_act", "s_cot_chunk", "s_cot",
)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Slots and tables for one packed schedule.

  Attributes:
    num_act, num_cot, num_res: slots per chunk in each buffer (the trash
      slot, index ``num_*``, not counted).
    num_carry: slots per chunk of the carried buffer (split schedules:
      what a backward's input half passes to its weight half, from B to W;
      its trash slot not counted).
    tables: ``name -> int32[rounds, S]`` (see :data:`TABLE_NAMES`).
    res_trash: whether the residual buffer needs its trash slot.
  """

  num_act: int
  num_cot: int
  num_res: int
  tables: dict[str, np.ndarray]
  res_trash: bool = True
  num_carry: int = 0

  @property
  def res_slots(self) -> int:
    """Slots per chunk the residual buffer has, its trash slot included."""
    return self.num_res + int(self.res_trash)


def _allocate(intervals: dict[tuple[int, int], tuple[int, int]]) -> tuple[dict, int]:
  """Greedy interval colouring per virtual stage: an entry written at time
  ``w`` and last read at ``r >= w`` may share a slot with entries whose
  intervals do not overlap it."""
  slots: dict[tuple[int, int], int] = {}
  most = 0
  by_stage: dict[int, list] = {}
  for (k, m), (w, r) in intervals.items():
    by_stage.setdefault(k, []).append((w, r, m))
  for k, items in by_stage.items():
    last_read: list[int] = []
    for w, r, m in sorted(items):
      for s, t in enumerate(last_read):
        if t < w:
          last_read[s] = r
          slots[(k, m)] = s
          break
      else:
        last_read.append(r)
        slots[(k, m)] = len(last_read) - 1
    most = max(most, len(last_read))
  return slots, most


def plan(rounds: Rounds, branch_of: Sequence[int]) -> Plan:
  """Slots and tables for ``rounds``; ``branch_of[k]`` is the code branch
  (group) virtual stage ``k`` runs."""
  schedule = rounds.schedule
  S, v, M = schedule.num_stages, schedule.virtual_stages, schedule.num_microbatches
  K = S * v
  split = schedule.split_backward
  when: dict[tuple[str, int, int], int] = {}  # (kind, stage k, m) -> round
  for r, row in enumerate(rounds.ops):
    for d, ops in enumerate(row):
      for op in ops:
        when[(op.kind, op.chunk * S + d, op.microbatch)] = r
  phase = {F: 0, B: 1, W: 2}
  t = lambda kind, k, m: 4 * when[(kind, k, m)] + phase[kind]
  stored = lambda kind, k, m: 4 * when[(kind, k, m)] + 3
  readers = (B, W) if split else (B,)
  act, cot, res, carry = {}, {}, {}, {}
  for m in range(M):
    for k in range(K):
      if k > 0:
        act[(k, m)] = (stored(F, k - 1, m), t(F, k, m))
      if k < K - 1:
        cot[(k, m)] = (stored(B, k + 1, m), max(t(kind, k, m) for kind in readers))
      res[(k, m)] = (t(F, k, m), max(t(kind, k, m) for kind in readers))
      if split:
        carry[(k, m)] = (t(B, k, m), t(W, k, m))
  act_slots, n_act = _allocate(act)
  cot_slots, n_cot = _allocate(cot)
  res_slots, n_res = _allocate(res)
  carry_slots, n_carry = _allocate(carry)

  T = rounds.num_rounds
  tabs = {name: np.zeros((T, S), np.int32) for name in TABLE_NAMES}
  for name, trash in (("f_res", n_res), ("s_act", n_act), ("s_cot", n_cot),
                      ("b_carry", n_carry)):
    tabs[name][:] = trash  # nothing to store: write to the trash slot
  for r, row in enumerate(rounds.ops):
    for d, ops in enumerate(row):
      for op in ops:
        k, c, m = op.chunk * S + d, op.chunk, op.microbatch
        if op.kind == F:
          tabs["f_branch"][r, d] = 1 + branch_of[k]
          tabs["f_chunk"][r, d], tabs["f_micro"][r, d] = c, m
          tabs["f_act"][r, d] = act_slots.get((k, m), n_act)
          tabs["f_first"][r, d] = k == 0
          tabs["f_res"][r, d] = res_slots[(k, m)]
          if k < K - 1 and r + 1 < T:  # the next stage stores what it receives
            d2, c2 = (k + 1) % S, (k + 1) // S
            tabs["s_act_chunk"][r + 1, d2] = c2
            tabs["s_act"][r + 1, d2] = act_slots[(k + 1, m)]
        else:
          p = "b" if op.kind == B else "w"
          tabs[f"{p}_branch"][r, d] = 1 + branch_of[k]
          tabs[f"{p}_chunk"][r, d], tabs[f"{p}_micro"][r, d] = c, m
          tabs[f"{p}_res"][r, d] = res_slots[(k, m)]
          tabs[f"{p}_cot"][r, d] = cot_slots.get((k, m), n_cot)
          tabs[f"{p}_carry"][r, d] = carry_slots.get((k, m), n_carry)
          if op.kind == B and k > 0 and r + 1 < T:  # the previous stage stores it
            d2, c2 = (k - 1) % S, (k - 1) // S
            tabs["s_cot_chunk"][r + 1, d2] = c2
            tabs["s_cot"][r + 1, d2] = cot_slots[(k - 1, m)]
  res_trash = _idle_forwards_into_free_slots(tabs, res, res_slots, n_res, S, v)
  return Plan(n_act, n_cot, n_res, tabs, res_trash, n_carry)


def _idle_forwards_into_free_slots(tabs: dict[str, np.ndarray], res: dict, res_slots: dict,
                                   n_res: int, S: int, v: int) -> bool:
  """Points each idle forward's residual store (round ``r``, phase ``4r``)
  at a slot no live residual holds then (``tabs`` is changed in place).
  Returns whether some idle forward found none and keeps the trash slot."""
  live: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (chunk, slot) -> intervals
  for (k, m), interval in res.items():
    live.setdefault((k // S, res_slots[(k, m)]), []).append((k % S, interval))
  trash = False
  for r, d in zip(*np.nonzero(tabs["f_branch"] == 0)):
    now = 4 * int(r)
    free = next(((c, s) for c in range(v) for s in range(n_res)
                 if all(not (w <= now <= last) for dev, (w, last) in live.get((c, s), ())
                        if dev == d)), None)
    if free is None:
      trash = True
    else:
      tabs["f_chunk"][r, d], tabs["f_res"][r, d] = free
  return trash
