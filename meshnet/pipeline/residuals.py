"""What a stage's backward keeps from its forward: the vjp residuals.

``jax.vjp(fn, flat, x)`` returns a pullback whose pytree leaves are the
residuals of the forward pass: activations, masks, and values computed from
the parameters alone (weights reshaped from the flat vector, constants).
Only the first kind depends on the microbatch. :func:`layout` finds, by
following the forward program's dataflow, which leaves depend on the
microbatch (its input ``x``, labels ``y`` or dropout keys); those are packed
into one ``uint32`` vector per microbatch (:func:`pack`, exact for any dtype)
that the executor keeps in a ring buffer from a stage's forward to its
backward. The other leaves are recomputed in the backward from the
parameters (:func:`leaves_fn` on zero inputs: the compiler drops the forward
work they do not need), so a stash never holds a copy of the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a stage's residual leaves come from.

  Attributes:
    treedef: pytree structure of the pullback (``jax.vjp``'s second result).
    stored: indices of the leaves kept per microbatch, packed in this order.
    shapes: shapes of the stored leaves.
    dtypes: dtypes of the stored leaves.
    offsets: start of each stored leaf in the packed ``uint32`` vector.
    size: words of the packed vector.
  """

  treedef: Any
  stored: tuple[int, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[Any, ...]
  offsets: tuple[int, ...]
  size: int


def leaves_fn(fn: Callable) -> Callable:
  """``(flat, x, *data) -> (out, residual leaves)`` of ``jax.vjp`` of
  ``fn(flat, x, *data)`` with respect to ``flat`` and ``x``."""
  def run(flat, x, *data):
    out, pullback = jax.vjp(lambda f, a: fn(f, a, *data), flat, x)
    return out, jax.tree.leaves(pullback)
  return run


def layout(fn: Callable, flat: Any, x: Any, *data: Any) -> Layout:
  """The residual layout of ``fn(flat, x, *data)`` (abstract arguments).

  ``x`` and ``data`` (labels, keys) vary per microbatch; ``flat`` does not.
  """
  treedef_box = []

  def leaves(flat, x, *data):
    out, pullback = jax.vjp(lambda f, a: fn(f, a, *data), flat, x)
    flat_leaves, treedef = jax.tree.flatten(pullback)
    treedef_box.append(treedef)
    return flat_leaves

  closed = jax.make_jaxpr(leaves)(flat, x, *data)
  varying = [False] * len(jax.tree.leaves(flat)) + [True] * len(jax.tree.leaves((x, data)))
  depends = _dependence(closed.jaxpr, varying)
  stored = tuple(i for i, d in enumerate(depends) if d)
  return values_layout([closed.out_avals[i] for i in stored], treedef_box[-1], stored)


def values_layout(avals: Sequence[Any], treedef: Any = None,
                  stored: Sequence[int] | None = None) -> Layout:
  """The packing of values of ``avals`` (shapes and dtypes), one after the
  other; ``stored``: their indices among a pullback's leaves (default: all)."""
  shapes = tuple(tuple(a.shape) for a in avals)
  dtypes = tuple(a.dtype for a in avals)
  offsets, size = [], 0
  for shape, dtype in zip(shapes, dtypes):
    offsets.append(size)
    size += _words(shape, dtype)
  stored = tuple(range(len(avals))) if stored is None else tuple(stored)
  return Layout(treedef, stored, shapes, dtypes, tuple(offsets), size)


def pack(leaves: Sequence[jax.Array], lay: Layout, width: int) -> jax.Array:
  """The stored leaves, bit-exact, as ``uint32[width]`` (``width >= lay.size``)."""
  out = jnp.zeros((width,), jnp.uint32)
  for i, offset in zip(lay.stored, lay.offsets):
    out = jax.lax.dynamic_update_slice(out, _encode(leaves[i]), (offset,))
  return out


def unpack(vector: jax.Array, lay: Layout) -> list[jax.Array]:
  """Inverse of :func:`pack`: the stored leaves."""
  return [_decode(vector[o:o + _words(s, d)], s, d)
          for o, s, d in zip(lay.offsets, lay.shapes, lay.dtypes)]


def pullback(lay: Layout, stored: Sequence[jax.Array],
             recomputed: Sequence[jax.Array]) -> Callable:
  """The vjp function rebuilt from stored leaves and the others recomputed
  (``recomputed``: all leaves of a :func:`leaves_fn` run; only the indices
  not stored are used)."""
  leaves = list(recomputed)
  for i, value in zip(lay.stored, stored):
    leaves[i] = value
  return jax.tree.unflatten(lay.treedef, leaves)


def encode(x: jax.Array) -> jax.Array:
  """``x`` as a flat ``uint32`` vector, bit-exact (one word per element of
  4 bytes or less)."""
  return _encode(x)


def decode(words: jax.Array, shape: Sequence[int], dtype: Any) -> jax.Array:
  """Inverse of :func:`encode`."""
  return _decode(words[:_words(shape, dtype)], shape, dtype)


def _words(shape: Sequence[int], dtype: Any) -> int:
  dtype = np.dtype(dtype)
  n = int(np.prod(shape, dtype=np.int64))
  return n * (dtype.itemsize // 4) if dtype.itemsize > 4 else n


def _encode(x: jax.Array) -> jax.Array:
  """Any array as a flat ``uint32`` vector, bit-exact."""
  if x.dtype == jnp.bool_:
    return x.reshape(-1).astype(jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size >= 4:  # 8-byte types become [..., 2] words
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  small = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, small).reshape(-1).astype(jnp.uint32)


def _decode(words: jax.Array, shape: Sequence[int], dtype: Any) -> jax.Array:
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return words.reshape(shape).astype(jnp.bool_)
  if dtype.itemsize == 4:
    return jax.lax.bitcast_convert_type(words, dtype).reshape(shape)
  if dtype.itemsize > 4:
    return jax.lax.bitcast_convert_type(
        words.reshape(*shape, dtype.itemsize // 4), dtype)
  small = {1: jnp.uint8, 2: jnp.uint16}[dtype.itemsize]
  return jax.lax.bitcast_convert_type(words.astype(small), dtype).reshape(shape)


def _dependence(jaxpr: Any, varying: Sequence[bool]) -> list[bool]:
  """For each output of ``jaxpr``: does it depend on an input marked varying?

  Follows the dataflow through equations; nested programs (``jit``,
  ``scan``, ``while``, ``cond``, custom derivatives, remat) are followed
  inside, loops to a fixed point. Anything else is taken to depend on all
  its inputs, so the answer errs only towards keeping more.
  """
  flags: dict[Any, bool] = {v: False for v in jaxpr.constvars}
  for v, f in zip(jaxpr.invars, varying):
    flags[v] = bool(f)

  def flag(v):
    return False if isinstance(v, jcore.Literal) else flags.get(v, True)

  for eqn in jaxpr.eqns:
    ins = [flag(v) for v in eqn.invars]
    outs = _eqn_dependence(eqn, ins)
    for v, f in zip(eqn.outvars, outs):
      flags[v] = f
  return [flag(v) for v in jaxpr.outvars]


def _open(program: Any) -> Any:
  return program.jaxpr if isinstance(program, jcore.ClosedJaxpr) else program


def _run(program: Any, ins: Sequence[bool]) -> list[bool]:
  return _dependence(_open(program), ins)


def _eqn_dependence(eqn: Any, ins: list[bool]) -> list[bool]:
  name, params = eqn.primitive.name, eqn.params
  n_out = len(eqn.outvars)
  anything = any(ins)
  if not anything:
    return [False] * n_out
  try:
    if name == "scan":
      nc, ncarry = params["num_consts"], params["num_carry"]
      consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
      while True:
        outs = _run(params["jaxpr"], consts + carry + xs)
        new = [a or b for a, b in zip(carry, outs[:ncarry])]
        if new == carry:
          return outs
        carry = new
    if name == "while":
      cn, bn = params["cond_nconsts"], params["body_nconsts"]
      cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
      while True:
        pred = _run(params["cond_jaxpr"], cconsts + carry)[0]
        outs = _run(params["body_jaxpr"], bconsts + carry)
        new = [a or b or pred for a, b in zip(carry, outs)]
        if new == carry:
          return carry
        carry = new
    if name == "cond":
      index, operands = ins[0], ins[1:]
      outs = [False] * n_out
      for branch in params["branches"]:
        outs = [a or b for a, b in zip(outs, _run(branch, operands))]
      return [o or index for o in outs]
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
      program = params.get(key)
      if program is None:
        continue
      inner = _open(program)
      if len(inner.invars) == len(ins) and len(inner.outvars) == n_out:
        return _run(program, ins)
  except (KeyError, TypeError, ValueError):
    pass
  return [True] * n_out
