"""What a compiled program's collectives are, read from its HLO text.

A profiler trace names each XLA op it timed (``hlo_op``: ``psum_invariant.7``)
but not what the op does. The optimized HLO of the same program
(``jax.jit(f).lower(...).compile().as_text()``) says it: the opcode
(``all-reduce``), the shapes of its result and operands, and the
``named_scope`` path it was traced under (``metadata={op_name=
"jit(step)/train_step/shard_map/gradient_exchange/pmean_bucketed[data]/..."}``).
:func:`parse_hlo` keeps that for every instruction, so a trace's events can be
sorted into compute and each collective kind, with their bytes.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Collective opcodes -> the kind a report groups them by. Asynchronous pairs
# (``-start``/``-done``) count as their kind; the bytes go with ``-start``.
COLLECTIVE_KINDS = {
    "all-reduce": "all-reduce",
    "all-gather": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all",
    "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-broadcast": "collective-broadcast",
}

# Bytes per element of each HLO element type (``token`` and tuples hold none).
_ITEM_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
}

# `  [ROOT] %name = SHAPE opcode(operands), attributes` (the shape may be a tuple).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+\w*)?)\[([0-9,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


class HloOp(NamedTuple):
  """One instruction of a compiled program.

  Attributes:
    opcode: the HLO opcode (``all-reduce``, ``fusion``, ``collective-permute``).
    kind: the collective kind (a value of :data:`COLLECTIVE_KINDS`), or
      ``None`` for compute.
    bytes: for a collective, the size of the buffer it works on, per device:
      the gathered result of an all-gather, the operands of the others
      (nccl-tests' "size"); 0 for compute and for the ``-done`` half of an
      asynchronous collective.
    op_name: the JAX path it was traced under (``jit(step)/train_step/...``),
      named scopes included; ``""`` if the HLO has none.
  """

  opcode: str
  kind: str | None
  bytes: int
  op_name: str


class HloModule(NamedTuple):
  """``name`` (``jit_step``) and ``ops``: instruction name -> :class:`HloOp`."""

  name: str
  ops: dict[str, HloOp]


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: ``f32[2411]{0}`` -> 9644; a tuple
  ``(f32[1,2080]{1,0}, f32[])`` -> the sum of its arrays."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    size = _ITEM_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
    for dim in filter(None, dims.split(",")):
      size *= int(dim)
    total += size
  return int(total)


def _collective_bytes(opcode: str, result: int, operands: int) -> int:
  if opcode.endswith("-done"):
    return 0
  if opcode.startswith("all-gather"):
    # all-gather-start's result is the tuple (operand, gathered).
    return result - operands if opcode.endswith("-start") else result
  return operands


def parse_hlo(text: str) -> HloModule:
  """Every instruction of an HLO module's text (``compiled.as_text()``).

  Args:
    text: the module, as ``jax.stages.Compiled.as_text()`` prints it.

  Returns:
    The module's name and, for each instruction, its opcode, collective kind,
    bytes and ``op_name``.
  """
  first = text.lstrip().split("\n", 1)[0]
  name = first.split()[1].rstrip(",") if first.startswith("HloModule ") else ""
  shapes: dict[str, str] = {}
  parsed: list[tuple[str, str, str, str]] = []
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    op, shape, opcode, rest = match.groups()
    shapes[op] = shape
    parsed.append((op, shape, opcode, rest))
  ops: dict[str, HloOp] = {}
  for op, shape, opcode, rest in parsed:
    base = opcode.removesuffix("-start").removesuffix("-done")
    kind = COLLECTIVE_KINDS.get(base)
    nbytes = 0
    if kind is not None:
      operands = _OPERAND.findall(rest.split(")", 1)[0])
      operand_bytes = sum(shape_bytes(shapes.get(o, "")) for o in operands)
      nbytes = _collective_bytes(opcode, shape_bytes(shape), operand_bytes)
    op_name = _OP_NAME.search(rest)
    ops[op] = HloOp(opcode, kind, nbytes, op_name.group(1) if op_name else "")
  return HloModule(name, ops)
