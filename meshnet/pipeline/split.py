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
the cotangent: unpacking residuals, reshaping weights, and under remat the
forward).

The cut goes inside the equations that hold a whole layer's backward:

* calls (``jit``, ``jax.checkpoint``, ``closed_call``) are inlined, so a
  rematerialised layer's input and weight gradients fall in their halves
  (as one equation, the layer's whole backward ran in the input half and
  its weight gradient, a copy of the weights' size, was carried); a
  checkpoint's inputs keep the optimization barriers its lowering gives
  them, so its recomputed forward is not merged with another;
* a ``scan`` (a stage's run of identical layers) is cut into two scans:
  the input scan runs the loop-carried chain (``dx``) and emits, per
  iteration, what the weight scan reads from it (``[layers, mb, width]``);
  the weight scan computes the run's weight gradient.

Other equations (``cond``, ``while``, custom rules) go whole into one
half. An equation with side effects that no output needs runs once, in the
weight half.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jcore

from meshnet.pipeline import residuals

_CALLS = ("jit", "pjit", "closed_call", "call", "core_call", "remat2", "checkpoint")
"""Primitives whose program :func:`split` inlines (their params hold it as
``jaxpr``, a ``Jaxpr`` or ``ClosedJaxpr``)."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Node:
  """One equation of a flattened program: values are integer ids.

  ``kind``: ``"bind"`` (the equation's primitive, bound as it is),
  ``"barrier"`` (an optimization barrier on one value, no equation), or
  ``"scan_in"`` or ``"scan_w"`` (the two scans a split scan became; ``cut``
  and ``scan`` say how). ``ins`` are ids or ``Literal`` s."""

  eqn: Any
  ins: tuple
  outs: tuple
  kind: str = "bind"
  body: Any = None  # a scan's body, flattened (_Program)
  cut: Any = None  # scan_in/scan_w: the body's _Cut
  scan: Any = None  # scan_in/scan_w: _ScanParts


@dataclasses.dataclass(frozen=True)
class _Program:
  """A jaxpr with calls inlined: ``consts`` maps const ids to values."""

  invars: tuple
  outvars: tuple
  nodes: tuple
  consts: dict
  avals: dict  # id -> (shape, dtype)


@dataclasses.dataclass(frozen=True)
class _Cut:
  """A program's two halves: ``inputs`` computes the outputs marked for it
  and the ``carried`` ids; ``weights`` the other outputs from the program's
  available inputs and the carried ids."""

  inputs: tuple
  weights: tuple
  carried: tuple


@dataclasses.dataclass(frozen=True)
class _ScanParts:
  """How a scan's inputs and outputs divide between its two scans (indices
  into the original scan's consts, carries, xs and ys)."""

  consts: tuple  # const positions the scan reads
  carries: tuple  # carry positions it runs
  xs: tuple  # xs positions it reads
  ys: tuple  # ys positions it yields
  stacked: tuple  # the body values scan_in yields per iteration and scan_w reads


def _counter() -> Callable[[], int]:
  """Fresh value ids: 0, 1, 2, ..."""
  return functools.partial(next, itertools.count())


def _flatten(jaxpr: Any, consts: Sequence[Any], ids: Callable[[], int]) -> _Program:
  """``jaxpr`` (open) with its calls inlined, scan bodies flattened too."""
  names: dict = {}
  const_values: dict = {}
  avals: dict = {}

  def fresh(var):
    i = ids()
    names[var] = i
    avals[i] = (tuple(var.aval.shape), var.aval.dtype)
    return i

  for var, value in zip(jaxpr.constvars, consts):
    const_values[fresh(var)] = value
  invars = tuple(fresh(v) for v in jaxpr.invars)
  nodes: list = []

  def read(atom, env):
    return atom if isinstance(atom, jcore.Literal) else env[atom]

  def walk(jaxpr, env):
    for eqn in jaxpr.eqns:
      ins = tuple(read(a, env) for a in eqn.invars)
      inner = eqn.params.get("jaxpr") if eqn.primitive.name in _CALLS else None
      if inner is not None:
        open_inner = inner.jaxpr if isinstance(inner, jcore.ClosedJaxpr) else inner
        inner_consts = inner.consts if isinstance(inner, jcore.ClosedJaxpr) else ()
        if (len(open_inner.invars) == len(ins) and len(open_inner.outvars) == len(eqn.outvars)
            and len(open_inner.constvars) == len(inner_consts)):
          sub: dict = {}
          for var, value in zip(open_inner.constvars, inner_consts):
            i = ids()
            const_values[i] = value
            avals[i] = (tuple(var.aval.shape), var.aval.dtype)
            sub[var] = i
          sub.update(zip(open_inner.invars, _barriers(eqn, ins)))
          walk(open_inner, sub)
          for var, atom in zip(eqn.outvars, open_inner.outvars):
            value = read(atom, sub)
            if isinstance(value, jcore.Literal):  # an output that is a constant
              i = ids()
              const_values[i] = value.val
              avals[i] = (tuple(var.aval.shape), var.aval.dtype)
              value = i
            env[var] = value
          continue
      outs = []
      for var in eqn.outvars:
        i = ids()
        avals[i] = (tuple(var.aval.shape), var.aval.dtype)
        env[var] = i
        outs.append(i)
      body = None
      if eqn.primitive.name == "scan":
        program = eqn.params["jaxpr"]
        body = _flatten(program.jaxpr, program.consts, ids)
      nodes.append(_Node(eqn, ins, tuple(outs), body=body))

  def _barriers(eqn, ins):
    """A recomputing checkpoint's inputs, each behind its own optimization
    barrier as the checkpoint's lowering puts them (so the compiler does not
    merge the recomputed forward with another); one barrier per value keeps
    the values on the cotangent apart from the others."""
    prevent = eqn.params.get("prevent_cse", False)
    if eqn.primitive.name not in ("remat2", "checkpoint") or not eqn.params.get(
        "differentiated", False):
      return ins
    prevent = prevent if isinstance(prevent, tuple) else (prevent,) * len(ins)
    out = []
    for atom, var, flag in zip(ins, eqn.invars, prevent):
      if flag and not isinstance(atom, jcore.Literal):
        i = ids()
        avals[i] = avals[atom]
        nodes.append(_Node(None, (atom,), (i,), kind="barrier"))
        atom = i
      out.append(atom)
    return tuple(out)

  walk(jaxpr, names)
  outvars = tuple(read(a, names) for a in jaxpr.outvars)
  return _Program(invars, outvars, tuple(nodes), const_values, avals)


def _ids_in(atoms) -> list:
  return [a for a in atoms if not isinstance(a, jcore.Literal)]


def _needed(nodes: Sequence[_Node], roots: Sequence, skip: frozenset = frozenset(),
            forced: frozenset = frozenset()) -> list:
  """The nodes (in program order, none in ``skip``, by ``id``) that
  computing ``roots`` (ids) and running the nodes ``forced`` runs; a node in
  ``skip`` counts as done."""
  wanted = set(_ids_in(roots))
  picked = []
  for node in reversed(nodes):
    if id(node) in skip or not (id(node) in forced or any(o in wanted for o in node.outs)):
      continue
    picked.append(node)
    wanted.update(_ids_in(node.ins))
  return picked[::-1]


def _cut(program: _Program, seeds: set, hidden: set, for_input: Sequence[bool],
         ids: Callable[[], int]) -> _Cut:
  """Cuts ``program``: ``seeds``, ids of the inputs on the cotangent;
  ``hidden``, ids of inputs the weight half does not get (carried when it
  reads them); ``for_input``, per output, whether the input half computes it."""
  on = set(seeds) | set(hidden)
  for node in program.nodes:
    if any(a in on for a in _ids_in(node.ins)):
      on.update(node.outs)
  outs = program.outvars
  x_roots = [o for o, x in zip(outs, for_input) if x]
  w_roots = [o for o, x in zip(outs, for_input) if not x]

  wanted = set(_ids_in(x_roots))
  rewritten: dict = {}  # node index -> (scan_in, scan_w)
  picked = []
  for index in reversed(range(len(program.nodes))):
    node = program.nodes[index]
    hit = [o in wanted for o in node.outs]
    if not any(hit):
      continue
    ins_on = [not isinstance(a, jcore.Literal) and a in on for a in node.ins]
    if node.body is not None and not all(hit) and any(ins_on):
      rewritten[index] = _cut_scan(node, ins_on, hit, ids, program)
      node = rewritten[index][0]
      on.update(node.outs)
    picked.append(index)
    wanted.update(_ids_in(node.ins))
  picked.reverse()
  inputs = [rewritten[i][0] if i in rewritten else program.nodes[i] for i in picked]
  done = [n for n in inputs if any(o in on for o in n.outs)]
  everything = []
  for index, node in enumerate(program.nodes):
    everything += list(rewritten[index]) if index in rewritten else [node]
  # An equation with effects runs once: in the input half if it needs it,
  # else in the weight half.
  ran = frozenset(map(id, inputs))
  effects = frozenset(id(n) for n in everything
                      if n.kind == "bind" and n.eqn.effects and id(n) not in ran)
  weights = _needed(everything, w_roots, skip=frozenset(map(id, done)), forced=effects)
  made = {o for n in done for o in n.outs} | set(hidden)
  reads = [a for n in weights for a in _ids_in(n.ins)] + _ids_in(w_roots)
  carried = tuple(dict.fromkeys(a for a in reads if a in made))
  return _Cut(tuple(inputs), tuple(weights), carried)


def _cut_scan(node: _Node, ins_on: Sequence[bool], hit: Sequence[bool], ids: Callable[[], int],
              program: _Program) -> tuple[_Node, _Node]:
  """A scan whose outputs ``hit`` the input half needs (some, not all) and
  whose inputs ``ins_on`` are on the cotangent, as two scans: ``scan_in``
  runs the carries those outputs need (and yields the body values the
  other reads, stacked over the iterations); ``scan_w`` the rest."""
  params = node.eqn.params
  nc, ncar, length = params["num_consts"], params["num_carry"], params["length"]
  body = node.body
  n_xs = len(body.invars) - nc - ncar
  n_ys = len(body.outvars) - ncar
  b_consts, b_carry, b_xs = (body.invars[:nc], body.invars[nc:nc + ncar],
                             body.invars[nc + ncar:])
  c_out, y_out = body.outvars[:ncar], body.outvars[ncar:]

  # which carries are on the cotangent: the inits, and what the body makes so
  carry_on = list(ins_on[nc:nc + ncar])
  while True:
    on = {v for v, f in zip(body.invars, list(ins_on[:nc]) + carry_on + list(ins_on[nc + ncar:]))
          if f}
    for n in body.nodes:
      if any(i in on for i in _ids_in(n.ins)):
        on.update(n.outs)
    new = [f or (not isinstance(o, jcore.Literal) and o in on) for f, o in zip(carry_on, c_out)]
    if new == carry_on:
      break
    carry_on = new
  seeds = {v for v, f in zip(body.invars, list(ins_on[:nc]) + carry_on +
                             list(ins_on[nc + ncar:])) if f}

  # the carries the input scan runs: those it yields, and all they read
  runs = {j for j in range(ncar) if hit[j]}
  ys_in = tuple(j for j in range(n_ys) if hit[ncar + j])
  while True:
    roots = [c_out[j] for j in runs] + [y_out[j] for j in ys_in]
    reads = set(_ids_in(roots))
    for n in _needed(body.nodes, roots):
      reads.update(_ids_in(n.ins))
    more = {j for j in range(ncar) if b_carry[j] in reads} - runs
    if not more:
      break
    runs |= more
  runs_in = tuple(sorted(runs))
  runs_w = tuple(j for j in range(ncar) if j not in runs)
  ys_w = tuple(j for j in range(n_ys) if j not in ys_in)
  for_input = [j in runs for j in range(ncar)] + [j in ys_in for j in range(n_ys)]
  cut = _cut(body, seeds, {b_carry[j] for j in runs_in}, for_input, ids)

  def reads_of(nodes, roots, extra=()):
    got = set(_ids_in(roots)) | set(extra)
    for n in nodes:
      got.update(_ids_in(n.ins))
    return got

  in_reads = reads_of(cut.inputs, [c_out[j] for j in runs_in] + [y_out[j] for j in ys_in],
                      cut.carried)
  w_reads = reads_of(cut.weights, [c_out[j] for j in runs_w] + [y_out[j] for j in ys_w])
  stacked_out = []
  for i in cut.carried:
    o = ids()
    shape, dtype = body.avals[i]
    program.avals[o] = ((length,) + shape, dtype)
    stacked_out.append(o)
  parts_in = _ScanParts(tuple(j for j in range(nc) if b_consts[j] in in_reads), runs_in,
                        tuple(j for j in range(n_xs) if b_xs[j] in in_reads), ys_in,
                        cut.carried)
  parts_w = _ScanParts(tuple(j for j in range(nc) if b_consts[j] in w_reads), runs_w,
                       tuple(j for j in range(n_xs) if b_xs[j] in w_reads), ys_w, cut.carried)
  consts, carry, xs = node.ins[:nc], node.ins[nc:nc + ncar], node.ins[nc + ncar:]
  outs_c, outs_y = node.outs[:ncar], node.outs[ncar:]

  def ins_of(parts):
    return tuple([consts[j] for j in parts.consts] + [carry[j] for j in parts.carries] +
                 [xs[j] for j in parts.xs])

  scan_in = _Node(node.eqn, ins_of(parts_in),
                  tuple([outs_c[j] for j in runs_in] + [outs_y[j] for j in ys_in] +
                        stacked_out), "scan_in", body, cut, parts_in)
  scan_w = _Node(node.eqn, ins_of(parts_w) + tuple(stacked_out),
                 tuple([outs_c[j] for j in runs_w] + [outs_y[j] for j in ys_w]), "scan_w",
                 body, cut, parts_w)
  return scan_in, scan_w


def _run(nodes: Sequence[_Node], env: dict, consts: dict) -> None:
  """Runs ``nodes`` on ``env`` (id -> value), which it extends."""
  def read(a):
    if isinstance(a, jcore.Literal):
      return a.val
    return env[a] if a in env else consts[a]

  for node in nodes:
    ins = [read(a) for a in node.ins]
    if node.kind == "barrier":
      outs = [jax.lax.optimization_barrier(ins[0])]
    elif node.kind == "bind":
      eqn = node.eqn
      with eqn.ctx.manager:
        ans = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
      outs = ans if eqn.primitive.multiple_results else [ans]
    else:
      outs = _run_scan(node, ins)
    env.update(zip(node.outs, outs))


def _run_scan(node: _Node, ins: list) -> list:
  """One of the two scans a split scan became, on ``ins`` (``node.ins``'s values)."""
  params, body, cut, parts = node.eqn.params, node.body, node.cut, node.scan
  nc, ncar = params["num_consts"], params["num_carry"]
  b_consts, b_carry, b_xs = (body.invars[:nc], body.invars[nc:nc + ncar],
                             body.invars[nc + ncar:])
  n_c, n_k = len(parts.consts), len(parts.carries)
  consts, init, xs = ins[:n_c], ins[n_c:n_c + n_k], ins[n_c + n_k:]
  const_env = dict(zip([b_consts[j] for j in parts.consts], consts))
  c_out, y_out = body.outvars[:ncar], body.outvars[ncar:]
  first = node.kind == "scan_in"
  xs_ids = [b_xs[j] for j in parts.xs] + ([] if first else list(parts.stacked))

  def step(carry, x):
    env = dict(const_env)
    env.update(zip([b_carry[j] for j in parts.carries], carry))
    env.update(zip(xs_ids, x))
    _run(cut.inputs if first else cut.weights, env, body.consts)

    def read(a):
      if isinstance(a, jcore.Literal):
        return a.val
      return env[a] if a in env else body.consts[a]
    new = [read(c_out[j]) for j in parts.carries]
    ys = [read(y_out[j]) for j in parts.ys]
    if first:
      ys += [read(i) for i in parts.stacked]
    return new, ys

  carry, ys = jax.lax.scan(step, list(init), list(xs), length=params["length"],
                           reverse=params["reverse"], unroll=params["unroll"])
  return list(carry) + list(ys)


@dataclasses.dataclass(frozen=True)
class Split:
  """The two halves of a backward ``fn(*args) -> (dflat, dx)``.

  Attributes:
    program: the traced backward, calls inlined (internal form).
    cut: which of its equations each half runs, and what is carried.
    dflat_tree, dx_tree: the structures of ``dflat`` and ``dx``.
    layout: how the carried values pack into one ``uint32`` vector
      (``layout.size`` words; 0 when nothing is carried).
  """

  program: Any
  cut: Any
  dflat_tree: Any
  dx_tree: Any
  layout: residuals.Layout

  def _env(self, args: Sequence[Any]) -> dict:
    return dict(zip(self.program.invars, jax.tree.leaves(args)))

  def _read(self, env: dict, a: Any) -> Any:
    if isinstance(a, jcore.Literal):
      return a.val
    return env[a] if a in env else self.program.consts[a]

  def run_input(self, *args: Any, width: int,
                each: Callable[[jax.Array], jax.Array] = lambda a: a) -> tuple[Any, jax.Array]:
    """``(dx, carried)``: ``carried`` packed into ``uint32[width]``.

    ``each`` is applied to every carried value before it is packed (the
    executor keeps them whole over ``tensor``: packing a value the compiler
    split there would exchange halos inside a switch branch)."""
    env = self._env(args)
    _run(self.cut.inputs, env, self.program.consts)
    n_w = self.dflat_tree.num_leaves
    dx = jax.tree.unflatten(self.dx_tree,
                            [self._read(env, a) for a in self.program.outvars[n_w:]])
    carried = [each(jax.numpy.asarray(self._read(env, i))) for i in self.cut.carried]
    return dx, residuals.pack(carried, self.layout, width)

  def run_weight(self, carried: jax.Array, *args: Any,
                 each: Callable[[jax.Array], jax.Array] = lambda a: a) -> Any:
    """``dflat`` from the arguments and the input half's ``carried`` words
    (``each``: applied to every value unpacked from them)."""
    env = self._env(args)
    env.update(zip(self.cut.carried,
                   [each(a) for a in residuals.unpack(carried, self.layout)]))
    _run(self.cut.weights, env, self.program.consts)
    n_w = self.dflat_tree.num_leaves
    return jax.tree.unflatten(self.dflat_tree,
                              [self._read(env, a) for a in self.program.outvars[:n_w]])


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
  dflat_tree = jax.tree.structure(shapes[0])
  dx_tree = jax.tree.structure(shapes[1])
  ids = _counter()
  program = _flatten(closed.jaxpr, closed.consts, ids)
  seed_at = {i % len(args) for i in seeds}
  flags = [i in seed_at for i, a in enumerate(args) for _ in jax.tree.leaves(a)]
  n_w = dflat_tree.num_leaves
  for_input = [i >= n_w for i in range(len(program.outvars))]
  cut = _cut(program, {v for v, f in zip(program.invars, flags) if f}, set(), for_input, ids)
  layout = residuals.values_layout(
      [jax.ShapeDtypeStruct(*program.avals[i]) for i in cut.carried])
  return Split(program, cut, dflat_tree, dx_tree, layout)
