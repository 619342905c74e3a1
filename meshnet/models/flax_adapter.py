"""Adapting Flax modules to meshnet's ``Model(init, apply)``.

:func:`from_flax` takes a ``flax.linen`` module, :func:`from_nnx` a Flax NNX
module. Both return plain arrays from ``init`` and read the logical axis
names the module gives its parameters (linen's
``nn.with_logical_partitioning``, NNX's ``sharding`` metadata) into the
model's ``logical_axes``, which :mod:`meshnet.sharding`'s rules table maps to
mesh axes.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from meshnet.errors import MeshnetError
from meshnet.model import Model


def _call_parameters(fn: Callable) -> set[str]:
  try:
    return set(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return set()


def _as_logical_spec(names: Any) -> P | None:
  """A PartitionSpec of logical names from a Flax annotation (a tuple of
  names, a ``PartitionSpec`` or a ``NamedSharding``); ``None`` if empty."""
  if names is None:
    return None
  if isinstance(names, NamedSharding):
    names = names.spec
  names = tuple(n if isinstance(n, (str, tuple)) else None for n in names)
  return P(*names) if names else None


def _none_if_unnamed(tree: Any) -> Any:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P))
  return tree if leaves else None


# ----------------------------------------------------------------------------
# flax.linen


def _linen_logical_axes(boxed_params: Any) -> Any:
  """``P(*names)`` for each ``nn.Partitioned`` / ``nn.LogicallyPartitioned``
  box, ``None`` for a plain array; ``None`` overall if nothing is named."""
  from flax.core import meta

  def names(leaf):
    return _as_logical_spec(leaf.names) if isinstance(leaf, meta.Partitioned) else None

  tree = jax.tree.map(names, boxed_params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
  return _none_if_unnamed(tree)


def from_flax(module: Any, example_x: jax.Array, *, dropout_rng: str = "dropout") -> Model:
  """Wraps a ``flax.linen.Module`` as a :class:`Model`.

  ``init(key)`` returns the module's ``"params"`` collection as plain arrays
  (boxes such as ``nn.with_logical_partitioning``'s are removed; other
  mutable collections such as batch statistics are not supported). Names
  given with ``nn.with_logical_partitioning(init, ("embed", "mlp"))`` (or
  ``nn.with_partitioning``) become the model's ``logical_axes``: meshnet's
  rules table, not flax's, maps them to mesh axes. ``apply`` passes ``key``
  as the ``dropout_rng`` stream when training, and a ``train`` keyword only
  if the module's ``__call__`` takes one.

  Args:
    module: the linen module.
    example_x: an input of the right trailing shape (``[B, ...]``) for init.
    dropout_rng: name of the rng stream the module uses for dropout.
  """
  from flax.core import meta

  takes_train = "train" in _call_parameters(module.__call__)

  def boxed_params(key):
    kwargs = {"train": False} if takes_train else {}
    return module.init(key, example_x, **kwargs)["params"]

  def init(key):
    return meta.unbox(boxed_params(key))

  def apply(params, x, *, train=False, key=None):
    kwargs = {"train": train} if takes_train else {}
    rngs = {dropout_rng: key} if key is not None else None
    return module.apply({"params": params}, x, rngs=rngs, **kwargs)

  logical_axes = _linen_logical_axes(jax.eval_shape(boxed_params, jax.random.key(0)))
  return Model(init, apply, logical_axes=logical_axes)


# ----------------------------------------------------------------------------
# Flax NNX


def _path_keys(path: tuple) -> tuple[str, ...]:
  return tuple(str(k) for k in path)


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def _lookup(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _nnx_logical_spec(variable: Any) -> P | None:
  metadata = variable.get_metadata()
  for field in ("out_sharding", "sharding_names", "sharding"):
    if metadata.get(field):
      return _as_logical_spec(metadata[field])
  return None


def _fresh_rng_state(abstract_rest: Any, key: jax.Array | None) -> Any:
  """Concrete values for the module's RNG-stream variables: stream ``i``'s
  key is ``fold_in(key, i)`` (``key(0)`` when there is none: evaluation),
  its counter 0."""
  from flax import nnx

  key = jax.random.key(0) if key is None else key
  flat = []
  for i, (path, var) in enumerate(nnx.to_flat_state(abstract_rest)):
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      stream = jax.random.fold_in(key, i)
      value = stream if shape == () else jax.random.split(stream, shape)
    else:
      value = jnp.zeros(shape, dtype)
    flat.append((path, var.replace(value)))
  return nnx.from_flat_state(flat)


def from_nnx(make_module: Callable[[Any], Any]) -> Model:
  """Wraps a Flax NNX module as a :class:`Model`.

  ``make_module(rngs)`` builds the module from an ``nnx.Rngs``, as NNX
  modules are written (``lambda rngs: MLP(784, 256, 10, rngs=rngs)``), so
  ``init(key)`` is pure: it builds the module from ``nnx.Rngs(key)`` and
  returns its ``nnx.Param`` state as nested dicts of arrays (keys are the
  attribute names, list indices as strings). ``apply(params, x, train=,
  key=)`` merges them into the module (``nnx.split``/``nnx.merge``), sets it
  to ``train()`` or ``eval()`` mode, gives its RNG streams (dropout) keys
  drawn from ``key``, and calls it on ``x``; it also passes ``train=``,
  ``deterministic=`` or ``rngs=nnx.Rngs(key)`` to a ``__call__`` that takes
  them.

  Parameter names: ``nnx.with_partitioning(init, ("embed", "mlp"))`` (or a
  ``sharding``/``out_sharding`` metadata entry) on a parameter becomes its
  ``logical_axes`` entry; meshnet's rules table maps the names to mesh axes.
  The module is built with eager sharding off, so no mesh is needed to
  create it.

  Args:
    make_module: ``rngs -> nnx.Module``.

  Raises:
    MeshnetError: ``make_module`` is a module instance rather than a function
      that builds one, or the module has state other than ``nnx.Param`` and
      RNG streams (``nnx.BatchNorm`` statistics, other variables).
  """
  from flax import nnx

  if isinstance(make_module, nnx.Module):
    raise MeshnetError(
        f"from_nnx got a built {type(make_module).__name__} module; pass the function "
        f"that builds it from rngs, e.g. from_nnx(lambda rngs: "
        f"{type(make_module).__name__}(..., rngs=rngs)), so init(key) makes fresh parameters")

  def build(key):
    with nnx.use_eager_sharding(False):
      return make_module(nnx.Rngs(key))

  abstract_module = nnx.eval_shape(lambda: build(jax.random.key(0)))
  graphdef, abstract_params, abstract_rngs, abstract_other = nnx.split(
      abstract_module, nnx.Param, nnx.RngState, ...)
  other = nnx.to_flat_state(abstract_other)
  if len(other):
    path, var = list(other)[0]
    raise MeshnetError(
        f"from_nnx supports modules whose state is nnx.Param and RNG streams; "
        f"{'.'.join(_path_keys(path))} is an nnx.{type(var).__name__} (keep such state out "
        "of the module or use a layer without it, e.g. LayerNorm for BatchNorm)")
  param_paths = [(_path_keys(path), path, var)
                 for path, var in nnx.to_flat_state(abstract_params)]
  takes = _call_parameters(type(abstract_module).__call__)

  def init(key):
    _, params, _ = nnx.split(build(key), nnx.Param, ...)
    return _nest({_path_keys(path): var.get_value()
                  for path, var in nnx.to_flat_state(params)})

  def apply(params, x, *, train=False, key=None):
    state = nnx.from_flat_state(
        [(path, var.replace(_lookup(params, keys))) for keys, path, var in param_paths])
    module = nnx.merge(graphdef, state, _fresh_rng_state(abstract_rngs, key))
    if train:
      module.train()
    else:
      module.eval()
    kwargs: dict[str, Any] = {}
    if "train" in takes:
      kwargs["train"] = train
    if "deterministic" in takes:
      kwargs["deterministic"] = not train
    if "rngs" in takes and key is not None:
      kwargs["rngs"] = nnx.Rngs(key)
    return module(x, **kwargs)

  logical_axes = _none_if_unnamed(
      _nest({keys: _nnx_logical_spec(var) for keys, _, var in param_paths}))
  return Model(init, apply, logical_axes=logical_axes)
