"""Shardings of meshnet's arrays over a mesh.

Parameters can carry *logical* axis names, one per dimension, as a
``PartitionSpec`` of names (``P("embed", "mlp")``: the flax convention; see
:attr:`meshnet.Model.logical_axes`). A rules table maps each name to mesh
axes, so a model says what its dimensions are and the table says where they
go::

  embed  -> fsdp      mlp, heads, vocab -> tensor      layers -> stage

:func:`param_specs` applies the table to a model's parameters on a mesh and
checks that every sharded dimension divides; a leaf without names is split
over ``fsdp`` by a default rule (:func:`default_fsdp_spec`). The batch
splits its leading axis over ``data`` (``data`` x ``fsdp`` when ``fsdp`` > 1).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshnet.errors import MeshnetError
from meshnet.mesh import AXES, DATA, FSDP, STAGE, TENSOR
from meshnet.model import Model

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]
"""A logical-axis rules table: ``(logical name, mesh axes)`` pairs, in order of
precedence (flax/MaxText's ``logical_axis_rules``). Mesh axes are one axis
name, a tuple of them (the dimension is split over their product), or
``None`` (never split)."""

DEFAULT_RULES: Rules = (
    ("batch", (DATA, FSDP)),
    ("layers", STAGE),
    ("embed", FSDP),
    ("mlp", TENSOR),
    ("heads", TENSOR),
    ("vocab", TENSOR),
    ("kv", None),
)
"""meshnet's rules: the model width ``embed`` over ``fsdp`` (ZeRO-3), the
Megatron-split widths ``mlp``, ``heads`` and ``vocab`` over ``tensor``,
stacked ``layers`` over ``stage``, a ``batch`` over ``data`` x ``fsdp``; the
per-head width ``kv`` is never split."""

LogicalAxes = Any  # a pytree prefix of params whose leaves are PartitionSpec or None


def batch_axes(mesh: Mesh | None = None) -> tuple[str, ...]:
  """The mesh axes a batch's leading dimension is split over: ``(data,)``,
  or ``(data, fsdp)`` on a mesh with ``fsdp`` > 1 (ZeRO-3 splits the batch
  too; device ``(d, f)`` holds block ``d * fsdp + f``)."""
  if mesh is not None and int(mesh.shape.get(FSDP, 1)) > 1:
    return (DATA, FSDP)
  return (DATA,)


def batch_spec(mesh: Mesh | None = None) -> P:
  """Spec of a batch ``[B, ...]``: ``B`` split over :func:`batch_axes`."""
  axes = batch_axes(mesh)
  return P(axes[0] if len(axes) == 1 else axes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a global batch ``[B, ...]`` on ``mesh``."""
  return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def _as_axes(target: MeshAxes) -> tuple[str, ...]:
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def check_rules(rules: Any) -> Rules:
  """Validates a rules table and returns it as a tuple of pairs.

  Raises:
    MeshnetError: ``rules`` is not a sequence of ``(name, mesh axes)`` pairs,
      or names a mesh axis meshnet does not have, or one axis twice in a rule.
  """
  example = "e.g. (('embed', 'fsdp'), ('mlp', 'tensor'))"
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise MeshnetError(f"rules={rules!r} must be a sequence of (logical name, mesh axes) "
                       f"pairs, {example}")
  checked = []
  for rule in rules:
    if (isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2
        or not isinstance(rule[0], str)):
      raise MeshnetError(f"rule {rule!r} must be a (logical name, mesh axes) pair, {example}")
    name, target = rule
    if not (target is None or isinstance(target, str) or (
        isinstance(target, Sequence) and all(isinstance(a, str) for a in target))):
      raise MeshnetError(f"rule {rule!r}: mesh axes must be an axis name, a tuple of them "
                         f"or None, {example}")
    axes = _as_axes(target)
    for axis in axes:
      if axis not in AXES:
        raise MeshnetError(f"rule {rule!r} names mesh axis {axis!r}; meshnet's axes are "
                           f"{', '.join(AXES)}")
    if len(set(axes)) != len(axes):
      raise MeshnetError(f"rule {rule!r} names a mesh axis twice; name each axis once")
    checked.append((name, target if target is None or isinstance(target, str) else axes))
  return tuple(checked)


def logical_to_mesh(logical_spec: P | Sequence[str | None], rules: Rules | None = None) -> P:
  """Maps a spec of logical names to a spec of mesh axes.

  Rules are taken in order (flax's ``logical_to_mesh_axes``): a rule assigns
  its mesh axes to the dimension with its logical name if that dimension is
  not assigned yet and none of the axes is used by another dimension, so a
  mesh axis appears at most once per spec and a later rule for the same name
  is a fallback. A name no rule assigns is not split, except a name that is
  itself a mesh axis (``P(None, "tensor")``), which stays on that axis if it is
  still free.

  Example: ``logical_to_mesh(P("layers", "embed", "mlp"))`` is
  ``P("stage", "fsdp", "tensor")``.

  Args:
    logical_spec: one logical name (or ``None``) per dimension.
    rules: the rules table; ``None`` is :data:`DEFAULT_RULES`.

  Returns:
    A ``PartitionSpec`` with one entry per dimension: a mesh axis, a tuple of
    them, or ``None``. Axes of size 1 are kept (no mesh is known here).

  Raises:
    MeshnetError: a logical name appears twice, an entry is not a name or
      ``None``, or the rules are malformed.
  """
  rules = DEFAULT_RULES if rules is None else check_rules(rules)
  names = tuple(logical_spec)
  for entry in names:
    if entry is not None and not isinstance(entry, str):
      raise MeshnetError(f"logical spec {P(*names)} has entry {entry!r}; give one logical "
                         "name (or None) per dimension")
  repeated = sorted({n for n in names if n is not None and names.count(n) > 1})
  if repeated:
    raise MeshnetError(f"logical spec {P(*names)} names {repeated[0]!r} twice; give each "
                       "dimension its own name")
  unassigned = object()
  result: list[Any] = [unassigned if n is not None else None for n in names]
  used: set[str] = set()

  def assign(position: int, axes: tuple[str, ...]) -> None:
    result[position] = None if not axes else axes[0] if len(axes) == 1 else axes
    used.update(axes)

  for name, target in rules:
    if name in names:
      position, axes = names.index(name), _as_axes(target)
      if result[position] is unassigned and not used.intersection(axes):
        assign(position, axes)
  for position, name in enumerate(names):
    if result[position] is unassigned:
      assign(position, (name,) if name in AXES and name not in used else ())
  return P(*result)


def default_fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
  """The spec of a parameter without logical names: its largest dimension
  that ``fsdp`` divides is split over ``fsdp`` (the first of equal ones), the
  rest replicated; nothing is split when ``fsdp`` is 1 or divides no
  dimension.

  Example: ``(6, 10)`` on ``fsdp=2`` -> ``P(None, "fsdp")``; on ``fsdp=4``
  -> ``P(None, None)``.
  """
  spec: list[str | None] = [None] * len(shape)
  if fsdp > 1:
    fits = [i for i, size in enumerate(shape) if size % fsdp == 0]
    if fits:
      spec[max(fits, key=lambda i: (shape[i], -i))] = FSDP
  return P(*spec)


def _on_mesh(entry: Any, sizes: dict[str, int]) -> Any:
  """``entry`` without the mesh axes of size 1 (or absent from the mesh)."""
  axes = tuple(a for a in _as_axes(entry) if sizes.get(a, 1) > 1)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _named_leaf_spec(path: str, logical: P, shape: tuple[int, ...], sizes: dict[str, int],
                     rules: Rules) -> P:
  names = tuple(logical)
  if len(names) > len(shape):
    raise MeshnetError(
        f"parameter {path} has shape {shape} but logical axes {logical} name "
        f"{len(names)} dimensions; give at most one name per dimension")
  names += (None,) * (len(shape) - len(names))
  spec = tuple(_on_mesh(entry, sizes) for entry in logical_to_mesh(names, rules))
  for dim, (entry, size) in enumerate(zip(spec, shape)):
    axes = _as_axes(entry)
    split = math.prod(sizes[a] for a in axes)
    if size % split:
      over = " x ".join(f"{a}={sizes[a]}" for a in axes)
      raise MeshnetError(
          f"parameter {path} dimension {dim} (logical {names[dim]!r}) has size {size}, "
          f"which {over} does not divide; make it a multiple of {split}, choose a mesh "
          f"whose {' x '.join(axes)} divides {size}, or pass rules that do not split "
          f"{names[dim]!r} (e.g. ({names[dim]!r}, None))")
  return P(*spec)


def _logical_axes_of(model_or_logical_axes: Model | LogicalAxes) -> LogicalAxes:
  if isinstance(model_or_logical_axes, Model):
    return model_or_logical_axes.logical_axes
  return model_or_logical_axes


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, P)


def _children(node: Any) -> dict[Any, Any]:
  """``node``'s children by key (one level of the pytree)."""
  pairs, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  return {path[0]: child for path, child in pairs if path}


def _names_for(logical: LogicalAxes, path: tuple) -> tuple[P | None, tuple]:
  """The entry of ``logical`` (a prefix of params) that covers the parameter
  at ``path``, and the path of that entry."""
  node = logical
  for depth, key in enumerate(path):
    if node is None:
      return None, path[:depth]
    if isinstance(node, P):
      raise MeshnetError(
          f"logical axes {node} at {jax.tree_util.keystr(path[:depth]) or 'the root'} stand "
          "for a subtree of params, not one array; give each parameter its own "
          "PartitionSpec (or None for no names)")
    children = _children(node)
    if key not in children:
      where = jax.tree_util.keystr(path[:depth]) or "the root"
      have = ", ".join(jax.tree_util.keystr((k,)) for k in children) or "nothing"
      raise MeshnetError(
          f"logical axes have no entry for parameter {jax.tree_util.keystr(path)}: at "
          f"{where} they have {have}; give one PartitionSpec or None per parameter, in a "
          "tree of params' structure")
    node = children[key]
  if not _is_spec_leaf(node):
    raise MeshnetError(
        f"logical axes at {jax.tree_util.keystr(path) or 'the root'} are a subtree where "
        "params have one array; give that parameter one PartitionSpec (or None)")
  return node, path


def _unused_entries(logical: LogicalAxes, used: set[tuple]) -> list[str]:
  entries = jax.tree_util.tree_leaves_with_path(logical, is_leaf=_is_spec_leaf)
  return [jax.tree_util.keystr(path) for path, _ in entries if tuple(path) not in used]


def param_specs(model_or_logical_axes: Model | LogicalAxes, params: Any, mesh: Mesh,
                rules: Rules | None = None) -> Any:
  """Where each parameter lives on ``mesh``: a ``PartitionSpec`` per leaf.

  A leaf with logical names gets them mapped by ``rules``
  (:func:`logical_to_mesh`); a leaf without (its entry, or an entry above it,
  is ``None``) gets :func:`default_fsdp_spec`: split over ``fsdp`` only,
  never over ``tensor``. Mesh axes of size 1 are left out, so a spec says
  what is actually split on this mesh (all ``None`` on one device).

  Args:
    model_or_logical_axes: a :class:`~meshnet.Model` (its ``logical_axes``)
      or such a tree itself: a prefix of ``params`` whose leaves are
      ``PartitionSpec`` s of logical names or ``None`` (no names).
    params: the parameters, or anything of their structure with ``.shape``
      leaves (``jax.eval_shape(model.init, key)``).
    mesh: the mesh.
    rules: the rules table; ``None`` is :data:`DEFAULT_RULES`. To change a
      few names, put your rules first: ``(("mlp", None),) + DEFAULT_RULES``
      (the first rule for a name wins).

  Returns:
    A pytree of ``params``' structure with one ``PartitionSpec`` per leaf,
    one entry per dimension.

  Raises:
    MeshnetError: a named dimension that its mesh axes' size does not divide
      (naming the parameter path, the dimension, its size and the axes), a
      spec with more names than its leaf has dimensions, names whose tree
      does not match ``params``, or malformed rules.
  """
  logical = _logical_axes_of(model_or_logical_axes)
  rules = DEFAULT_RULES if rules is None else check_rules(rules)
  sizes = {name: int(size) for name, size in mesh.shape.items()}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  specs, used = [], set()
  for path, leaf in leaves:
    names, entry_path = _names_for(logical, tuple(path))
    used.add(entry_path)
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
    if names is None:
      specs.append(default_fsdp_spec(shape, sizes.get(FSDP, 1)))
    else:
      specs.append(_named_leaf_spec(jax.tree_util.keystr(path) or "params", names, shape,
                                    sizes, rules))
  unused = _unused_entries(logical, used)
  if unused:
    raise MeshnetError(
        f"logical axes name {unused[0]}, which params do not have; give one PartitionSpec "
        "or None per parameter, in a tree of params' structure")
  return jax.tree_util.tree_unflatten(treedef, specs)


def param_shardings(model_or_logical_axes: Model | LogicalAxes, params: Any, mesh: Mesh,
                    rules: Rules | None = None) -> Any:
  """:func:`param_specs` as ``NamedSharding`` s on ``mesh``, ready for
  ``jax.device_put(params, shardings)`` or a ``jit``'s ``out_shardings``."""
  specs = param_specs(model_or_logical_axes, params, mesh, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def fsdp_dim(spec: P) -> int | None:
  """The dimension ``spec`` splits over ``fsdp`` (``None`` if none)."""
  for dim, entry in enumerate(spec):
    if FSDP in _as_axes(entry):
      return dim
  return None


def check_param_specs(specs: Any, *, allowed: Sequence[str] = (FSDP, TENSOR)) -> None:
  """Refuses parameter specs the unpipelined step cannot run: a parameter
  split over an axis outside ``allowed`` (rules that send a name to ``data``
  or ``stage``), or one dimension split over ``fsdp`` together with another
  axis.

  Raises:
    MeshnetError: naming the parameter, its spec and the fix.
  """
  for path, spec in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, P)):
    where = jax.tree_util.keystr(path) or "params"
    for entry in spec:
      axes = _as_axes(entry)
      outside = [a for a in axes if a not in allowed]
      if outside:
        raise MeshnetError(
            f"parameter {where} would be split over {outside[0]} ({spec}); parameters "
            f"are split over {' and '.join(allowed)} only: pass rules that map its "
            f"names to {' or '.join(allowed)} or None")
      if FSDP in axes and len(axes) > 1:
        raise MeshnetError(
            f"parameter {where} splits one dimension over {' x '.join(axes)} ({spec}); "
            "a dimension split over fsdp must not be split over another axis: pass "
            "rules that map it to fsdp alone")


def with_stage(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Where a pipelined run *stores* a parameter: ``spec`` (its layout by the
  rules) also split over ``stage``, so that the train state holds about
  ``1 / (stage x fsdp x tensor)`` of the model per device.

  The ``fsdp`` dimension becomes ``(stage, fsdp)`` when ``stage x fsdp``
  divides it; otherwise the largest dimension not split yet that ``stage``
  divides takes ``stage``; a leaf that no dimension fits stays replicated
  over ``stage`` (small leaves: biases of odd widths). A spec that already
  uses ``stage`` (a stacked ``layers`` dimension) is kept. The pipelined
  step gathers what each stage needs (see :mod:`meshnet.pipeline.executor`).

  Example: ``P("fsdp", "tensor")`` of a ``(512, 256)`` leaf on
  ``stage=2,fsdp=2,tensor=2`` -> ``P(("stage", "fsdp"), "tensor")``.
  """
  sizes = {name: int(size) for name, size in mesh.shape.items()}
  stage = sizes.get(STAGE, 1)
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if stage == 1 or any(STAGE in _as_axes(e) for e in entries):
    return P(*entries)
  for dim, entry in enumerate(entries):
    if _as_axes(entry) == (FSDP,) and shape[dim] % (stage * sizes.get(FSDP, 1)) == 0:
      entries[dim] = (STAGE, FSDP)
      return P(*entries)
  free = [d for d, e in enumerate(entries) if e is None and shape[d] % stage == 0]
  if free:
    entries[max(free, key=lambda d: (shape[d], -d))] = STAGE
  return P(*entries)


def without_stage(rules: Rules | None = None) -> Rules:
  """``rules`` (``None``: :data:`DEFAULT_RULES`) with ``stage`` taken out of
  every target: the layout of a whole model on each stage (the unpipelined
  evaluation on a mesh with ``stage`` > 1), where a stacked ``layers``
  dimension is not split."""
  checked = DEFAULT_RULES if rules is None else check_rules(rules)
  out = []
  for name, target in checked:
    axes = tuple(a for a in _as_axes(target) if a != STAGE)
    out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def storage_specs(model_or_logical_axes: Model | LogicalAxes, params: Any, mesh: Mesh,
                  rules: Rules | None = None) -> Any:
  """:func:`param_specs`, each also split over ``stage`` by :func:`with_stage`
  (the same as :func:`param_specs` on a mesh with ``stage`` = 1). A stacked
  ``layers`` dimension that ``stage`` does not divide (2 blocks on
  ``stage=4``) is not split; :func:`with_stage` then puts ``stage`` on
  another dimension."""
  rules = DEFAULT_RULES if rules is None else check_rules(rules)
  try:
    specs = param_specs(model_or_logical_axes, params, mesh, rules)
  except MeshnetError:
    if int(dict(mesh.shape).get(STAGE, 1)) == 1:
      raise
    specs = param_specs(model_or_logical_axes, params, mesh, (("layers", None),) + rules)
  return jax.tree.map(lambda spec, leaf: with_stage(spec, np.shape(leaf) if not hasattr(
      leaf, "shape") else tuple(leaf.shape), mesh), specs, params,
                      is_leaf=lambda x: isinstance(x, P))
