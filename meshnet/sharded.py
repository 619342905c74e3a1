"""The pieces of a step whose parameters are split over ``fsdp`` and ``tensor``.

:mod:`meshnet.step` runs the sharded step as one ``shard_map`` manual over
``data`` and ``fsdp`` (and ``stage``), with ``tensor`` left to the compiler
(an ``Auto`` axis, see :func:`meshnet.mesh.axis_types`). This module holds
what that step needs besides the model's own math:

* :func:`param_layout`: where each parameter lives (from
  :func:`meshnet.sharding.param_specs`), split into the part the
  ``shard_map`` handles (``fsdp``) and the part the compiler does (``tensor``);
* :func:`state_shardings`: the shardings of a whole train state, the
  optimizer's per-parameter leaves laid out like their parameter;
* :func:`gather_fsdp` and :func:`exchange_gradients`: the ZeRO-3
  collectives (all-gather of weights; reduce-scatter of gradients over
  ``fsdp``, bucketed ``pmean`` over ``data``).

The ``fsdp`` collectives run inside a nested ``shard_map`` manual over
``tensor`` too, on each device's own ``tensor`` block: a manual collective on
an operand the compiler has split over ``tensor`` makes it all-gather the
operand over ``tensor`` first (jax 0.10.2), which would undo tensor
parallelism.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshnet import collectives
from meshnet.mesh import DATA, FSDP, TENSOR, axis_size
from meshnet.model import Model, Params
from meshnet.sharding import Rules, batch_axes, check_param_specs, fsdp_dim, param_specs


class Layout(NamedTuple):
  """Where the leaves of a parameter tree live on a mesh that splits them.

  Attributes:
    shardings: a ``NamedSharding`` per leaf (``fsdp`` and ``tensor``).
    manual: a ``PartitionSpec`` per leaf with only its ``fsdp`` entry: the
      ``in_specs``/``out_specs`` of a ``shard_map`` manual over ``data`` and
      ``fsdp`` (its ``Explicit`` part).
    tensor: a ``PartitionSpec`` per leaf with only its ``tensor`` entries
      (the ``Auto`` part, left to the compiler).
    dims: per leaf, in ``jax.tree.leaves`` order, the dimension split over
      ``fsdp``, or ``None``.
    tensor_split: per leaf, whether it is split over ``tensor``.
  """

  shardings: Any
  manual: Any
  tensor: Any
  dims: tuple[int | None, ...]
  tensor_split: tuple[bool, ...]


def param_layout(model: Model, params: Params, mesh: Mesh, rules: Rules | None = None) -> Layout:
  """The :class:`Layout` of ``params`` (anything with ``.shape`` leaves).

  Raises:
    MeshnetError: a dimension that its mesh axes do not divide (naming the
      parameter, the dimension and the sizes), or a spec the unpipelined
      step cannot run (see :func:`meshnet.sharding.check_param_specs`).
  """
  specs = param_specs(model, params, mesh, rules)
  check_param_specs(specs)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda s: isinstance(s, P))
  dims = tuple(fsdp_dim(spec) for spec in leaves)
  manual = [P(*(FSDP if i == d else None for i in range(len(spec))))
            for spec, d in zip(leaves, dims)]
  tensor = [P(*(TENSOR if entry == TENSOR else None for entry in spec)) for spec in leaves]
  return Layout(
      shardings=jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in leaves]),
      manual=jax.tree.unflatten(treedef, manual),
      tensor=jax.tree.unflatten(treedef, tensor),
      dims=dims,
      tensor_split=tuple(TENSOR in tuple(spec) for spec in tensor))


def constrain(params: Params, layout: Layout, mesh: Mesh) -> Params:
  """``params`` (inside ``jit``) laid out as ``layout`` says: a no-op when
  they already are. ``jax.reshard`` places the ``Explicit`` part (``fsdp``),
  a sharding constraint the ``Auto`` part (``tensor``)."""
  params = jax.tree.map(lambda a, s: jax.reshard(a, NamedSharding(mesh, s)),
                        params, layout.manual)
  if axis_size(mesh, TENSOR) == 1:
    return params
  return jax.tree.map(
      lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, s)),
      params, layout.tensor)


def state_shardings(state_shapes: Any, params_shapes: Params, param_shardings: Any,
                    mesh: Mesh) -> Any:
  """Shardings for a whole train state whose ``params`` are laid out by
  ``param_shardings`` (a ``NamedSharding`` per leaf, e.g. a
  :class:`Layout`'s ``shardings``).

  ``state_shapes`` is the state's ``jax.eval_shape``. A leaf outside
  ``params`` whose path ends with a parameter's path and has its shape (an
  optax state mirrors the parameter tree: ``mu[0]['w']`` for ``[0]['w']``) is
  laid out like that parameter; every other leaf (step counts, the rng) is
  replicated.
  """
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params_shapes),
                                    jax.tree.leaves(param_shardings)):
    by_path[tuple(path)] = (tuple(leaf.shape), sharding)
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    path = tuple(path)
    for start in range(len(path) + 1):
      found = by_path.get(path[start:])
      if found is not None and found[0] == tuple(leaf.shape):
        return found[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, state_shapes)


def vary(tree: Any, axes: Sequence[str]) -> Any:
  """``tree`` made varying over ``axes`` (those it does not vary over yet),
  so that its gradient is each device's own (no implicit reduction)."""
  def one(x):
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(one, tree)


def blockwise(fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
  """``fn`` run on each device's own ``tensor`` block (a nested ``shard_map``
  manual over ``tensor``); ``fn`` itself when ``tensor`` is 1. Call inside
  the step's ``shard_map``."""
  if axis_size(mesh, TENSOR) == 1:
    return fn
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names={TENSOR})


def gather_fsdp(params: Params, layout: Layout, mesh: Mesh) -> Params:
  """Inside ``shard_map``: each ``fsdp``-split leaf all-gathered along its
  split dimension (local ``[.., d / fsdp, ..]`` -> ``[.., d, ..]``); the
  others as they are."""
  def gather(params):
    leaves, treedef = jax.tree.flatten(params)
    leaves = [leaf if d is None else collectives.all_gather(leaf, FSDP, dim=d, tiled=True)
              for leaf, d in zip(leaves, layout.dims)]
    return jax.tree.unflatten(treedef, leaves)

  with jax.named_scope("fsdp_gather"):
    return blockwise(gather, mesh, (layout.tensor,), layout.tensor)(params)


def _pmean_groups(leaves: list[jax.Array], tensor_split: Sequence[bool], axes: tuple[str, ...],
                  bucket_bytes: int, flatten: bool) -> list[jax.Array]:
  """The bucketed ``pmean`` over ``axes`` of ``leaves``, ``tensor``-split
  leaves bucketed apart from the others (a bucket varies over ``tensor`` if
  any of its leaves does)."""
  out: list[Any] = [None] * len(leaves)
  for split in (False, True):
    chosen = [i for i, t in enumerate(tensor_split) if t == split]
    if chosen:
      means = collectives.pmean_bucketed([leaves[i] for i in chosen], axes,
                                         bucket_bytes=bucket_bytes, flatten=flatten)
      for i, g in zip(chosen, means):
        out[i] = g
  return out


def exchange_gradients(loss: jax.Array, grads: Params, layout: Layout, mesh: Mesh, *,
                       bucket_bytes: int = collectives.DEFAULT_BUCKET_BYTES,
                       flatten: bool = True) -> tuple[jax.Array, Params]:
  """Inside ``shard_map``: the mean over ``data`` x ``fsdp`` of every
  device's loss and (whole, local) gradient; each leaf comes back as this
  device's shard.

  ``fsdp``-split leaves are reduce-scattered over ``fsdp`` (``fsdp_scatter``:
  each device keeps the mean of its piece, never all-reduced then sliced) and
  then averaged over ``data`` with the bucketed ``pmean``; the loss and the
  other leaves are averaged over ``data`` x ``fsdp`` with one bucketed
  ``pmean`` (both under ``gradient_exchange``). The two groups are bucketed
  apart: a bucket varies over ``fsdp`` if any of its leaves does.
  """
  def exchange(loss, grads):
    leaves, treedef = jax.tree.flatten(grads)
    split = [i for i, d in enumerate(layout.dims) if d is not None]
    whole = [i for i, d in enumerate(layout.dims) if d is None]
    with jax.named_scope("fsdp_scatter"):
      pieces = [collectives.reduce_scatter(leaves[i], FSDP, dim=layout.dims[i], op="mean")
                for i in split]
    with jax.named_scope("gradient_exchange"):
      pieces = _pmean_groups(pieces, [layout.tensor_split[i] for i in split], (DATA,),
                             bucket_bytes, flatten)
      means = _pmean_groups([loss] + [leaves[i] for i in whole],
                            [False] + [layout.tensor_split[i] for i in whole],
                            batch_axes(mesh), bucket_bytes, flatten)
    out: list[Any] = [None] * len(leaves)
    for i, g in zip(split + whole, pieces + means[1:]):
      out[i] = g
    return means[0], jax.tree.unflatten(treedef, out)

  return blockwise(exchange, mesh, (P(), layout.tensor), (P(), layout.tensor))(loss, grads)


def manual_axes(mesh: Mesh) -> frozenset[str]:
  """The axes the sharded step's ``shard_map`` is manual over: all but
  ``tensor`` (all of them when ``tensor`` is 1)."""
  if axis_size(mesh, TENSOR) == 1:
    return frozenset(mesh.axis_names)
  return frozenset(mesh.axis_names) - {TENSOR}
