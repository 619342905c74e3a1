"""A stage's backward cut in two halves that share their work.

Split schedules (ZB-H1) run a stage's backward as an *input* half (``dx``,
which the previous stage waits for) and, later, a *weight* half
(``dflat``). Run as two pullbacks, the weight half would redo most of the
input half: to reach a layer's weight gradient it needs the cotangent at
that layer's output, which is the chain of input gradients of every layer
after it (on a stage of 4 dense layers: 3 of the input half's 4 matmuls,
measured 133 ms of an 829 ms step).

:func:`split` traces the full backward ``fn(*args) -> (dflat, dx)`` once
and divides its equations: the input half is everything ``dx`` needs; the
weight half is what ``dflat`` needs besides. The values the weight half
reads from the input half and that depend on the cotangent (for a dense
layer: the cotangent of its pre-activation, ``[mb, width]``) are
*carried*: the input half returns them, and the executor keeps them, packed
(:attr:`Split.layout`), from the input half to the weight half. Each
equation on the cotangent runs once, in one of the two halves, so the two
cost what the full backward costs (plus what the weight half recomputes off
the cotangent: unpacking residuals, reshaping weights).

An equation the input half needs runs there whole: a ``scan`` over a long
run of layers, which yields ``dx`` and the run's weight gradient together,
stays in the input half and its weight gradient is carried.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jcore

from meshnet.pipeline import residuals


@dataclasses.dataclass(frozen=True)
class Split:
  """The two halves of a backward ``fn(*args) -> (dflat, dx)``.

  Attributes:
    consts: the traced program's constants (values ``fn`` closes over).
    input_half: ``(*consts, *args) -> (*dx leaves, *carried)``.
    weight_half: ``(*consts, *args, *carried) -> dflat leaves``.
    dflat_tree, dx_tree: the structures of ``dflat`` and ``dx``.
    layout: how the carried values pack into one ``uint32`` vector
      (``layout.size`` words; 0 when nothing is carried).
  """

  consts: tuple[Any, ...]
  input_half: Any
  weight_half: Any
  dflat_tree: Any
  dx_tree: Any
  layout: residuals.Layout

  def run_input(self, *args: Any, width: int,
                each: Callable[[jax.Array], jax.Array] = lambda a: a) -> tuple[Any, jax.Array]:
    """``(dx, carried)``: ``carried`` packed into ``uint32[width]``.

    ``each`` is applied to every carried value before it is packed (the
    executor keeps them whole over ``tensor``: packing a value the compiler
    split there would exchange halos inside a switch branch)."""
    outs = jax.core.eval_jaxpr(self.input_half, self.consts, *jax.tree.leaves(args))
    n_dx = self.dx_tree.num_leaves
    dx = jax.tree.unflatten(self.dx_tree, outs[:n_dx])
    return dx, residuals.pack([each(a) for a in outs[n_dx:]], self.layout, width)

  def run_weight(self, carried: jax.Array, *args: Any,
                 each: Callable[[jax.Array], jax.Array] = lambda a: a) -> Any:
    """``dflat`` from the arguments and the input half's ``carried`` words
    (``each``: applied to every value unpacked from them)."""
    values = [each(a) for a in residuals.unpack(carried, self.layout)]
    outs = jax.core.eval_jaxpr(self.weight_half, self.consts,
                               *jax.tree.leaves(args), *values)
    return jax.tree.unflatten(self.dflat_tree, outs)


def split(fn: Callable, *args: Any, seeds: Sequence[int] = (-1,)) -> Split:
  """Traces ``fn(*args) -> (dflat, dx)`` (``args``: example arrays of the
  types the halves will get) and cuts it in two (see the module docstring).

  ``seeds``: the positions in ``args`` of the cotangents (default: the last).
  Only what depends on them is carried; a value the weight half needs that
  does not (a residual unpacked, a weight reshaped, a forward recomputed
  under remat) is computed again there, so the carried vector holds
  cotangent-sized values, not copies of weights or residuals.
  """
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
  jaxpr = closed.jaxpr
  dflat_tree = jax.tree.structure(shapes[0])
  dx_tree = jax.tree.structure(shapes[1])
  n_w = dflat_tree.num_leaves
  w_outs, x_outs = jaxpr.outvars[:n_w], jaxpr.outvars[n_w:]

  seed_at = {i % len(args) for i in seeds}
  flags = [i in seed_at for i, a in enumerate(args) for _ in jax.tree.leaves(a)]
  on_seed = {v for v, f in zip(jaxpr.invars, flags) if f}
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jcore.Var) and v in on_seed for v in eqn.invars):
      on_seed.update(eqn.outvars)

  input_eqns = _needed(jaxpr.eqns, x_outs, skip=frozenset())
  # The input half's equations on the cotangent: their outputs are carried.
  done = [eqn for eqn in input_eqns if any(v in on_seed for v in eqn.outvars)]
  weight_eqns = _needed(jaxpr.eqns, w_outs, skip=frozenset(map(id, done)))
  made = {v for eqn in done for v in eqn.outvars}
  used_by_weight = [v for eqn in weight_eqns for v in eqn.invars] + list(w_outs)
  carried = list(dict.fromkeys(v for v in used_by_weight
                               if isinstance(v, jcore.Var) and v in made))

  info = jaxpr.debug_info.with_unknown_names()  # names for other in/outputs
  input_half = jcore.Jaxpr(jaxpr.constvars, jaxpr.invars, list(x_outs) + carried,
                           input_eqns, jaxpr.effects, info)
  weight_half = jcore.Jaxpr(jaxpr.constvars, list(jaxpr.invars) + carried, w_outs,
                            weight_eqns, jaxpr.effects, info)
  layout = residuals.values_layout([v.aval for v in carried])
  return Split(tuple(closed.consts), input_half, weight_half, dflat_tree, dx_tree, layout)


def _needed(eqns: Sequence[Any], outs: Sequence[Any], skip: frozenset) -> list:
  """The equations (in program order, none in ``skip``) that computing
  ``outs`` runs, walking back from them; an equation in ``skip`` counts as
  done (its outputs are at hand)."""
  wanted = {v for v in outs if isinstance(v, jcore.Var)}
  picked = []
  for eqn in reversed(eqns):
    if id(eqn) in skip or not any(v in wanted for v in eqn.outvars
                                  if isinstance(v, jcore.Var)):
      continue
    picked.append(eqn)
    wanted.update(v for v in eqn.invars if isinstance(v, jcore.Var))
  return picked[::-1]
