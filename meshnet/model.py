"""``Model``: a network as a pair of pure functions.

``params = model.init(key)`` builds the parameter pytree; ``y =
model.apply(params, x, train=False, key=None)`` runs it. Nothing else is
needed for meshnet to train a model on any mesh: built-in models and a user's
own pair of functions are used the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from meshnet.errors import MeshnetError

Params = Any  # a pytree of jax.Array
InitFn = Callable[[jax.Array], Params]
ApplyFn = Callable[..., jax.Array]


def _accepts_train_and_key(fn: Callable) -> bool:
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # builtins, some C callables: assume full contract
    return True
  if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
    return True
  return "train" in parameters and "key" in parameters


@dataclasses.dataclass(frozen=True)
class Model:
  """A model as two pure functions.

  Attributes:
    init: ``init(key) -> params``; ``key`` is a ``jax.random.key``. ``params``
      is a pytree of arrays (global shapes; meshnet decides their sharding).
    apply: ``apply(params, x, *, train=False, key=None) -> y`` with ``x`` of
      shape ``[batch, ...]`` and ``y`` of shape ``[batch, ...]``. Each example
      must be computed independently of the others in its batch (as in any
      data-parallel training). ``key`` is given when ``train`` is true, for
      dropout. An ``apply(params, x)`` that takes neither ``train`` nor ``key``
      is accepted too and is called without them.
    layers: for models that are a sequence of layers (each itself a
      ``Model``), the layers; ``params`` is then a list with one entry per
      layer, and ``apply`` must run them in order, layer ``i`` with key
      ``jax.random.split(key, len(layers))[i]``. Pipeline parallelism cuts a
      model along its layers, so only models with ``layers`` can be
      pipelined. See :func:`sequential`.
    logical_axes: what each parameter's dimensions are, for sharding: a
      pytree of ``params``' structure (or a prefix of it) whose leaves are
      ``jax.sharding.PartitionSpec`` s of logical names, one entry per
      dimension (``None`` for an unnamed one), e.g. ``{"w": P("embed",
      "mlp"), "b": P("mlp")}``; a stacked block's leaf ``P("layers",
      "embed", "mlp")``. ``None`` (the whole field, or a subtree) means no
      names: those parameters get the default FSDP rule.
      :mod:`meshnet.sharding` maps names to mesh axes with a rules table.
    to_layers, from_layers: for a model with ``layers`` whose ``params`` is
      not a list (e.g. :func:`meshnet.models.gpt`, whose blocks are stacked
      along a leading ``[L]`` dimension): ``to_layers(params) -> list`` (one
      entry per layer, each what ``layers[i].init`` returns) and its inverse
      ``from_layers(list) -> params``, both pure. A pipeline cuts the model
      through them, so the train state, the optimizer and checkpoints keep
      the model's own tree. ``apply`` must compute what running the layers
      on ``to_layers(params)`` one after another computes, with the same
      per-layer keys. ``None`` (both): ``params`` is the list itself.

  Randomness (dropout) in training is drawn per example: meshnet calls
  ``apply`` on one example at a time (``jax.vmap``) with the key
  ``fold_in(step_key, i)`` of global example ``i`` whenever ``apply`` uses
  its key (see :func:`apply_train`), so every mesh layout, accumulation
  split and pipeline draws the same masks.
  """

  init: InitFn
  apply: ApplyFn
  layers: tuple["Model", ...] | None = None
  logical_axes: Any = None
  to_layers: Callable[[Params], list] | None = None
  from_layers: Callable[[Sequence[Any]], Params] | None = None

  def __post_init__(self):
    if not callable(self.init) or not callable(self.apply):
      raise TypeError("Model(init, apply) needs two callables")
    _check_logical_axes(self.logical_axes)
    if (self.to_layers is None) != (self.from_layers is None):
      raise MeshnetError("Model needs both to_layers and from_layers, or neither")
    if self.to_layers is not None and not self.layers:
      raise MeshnetError("Model.to_layers/from_layers describe layers: give layers too")
    if not _accepts_train_and_key(self.apply):
      plain = self.apply

      @functools.wraps(plain)
      def apply(params, x, *, train=False, key=None):
        del train, key
        return plain(params, x)

      object.__setattr__(self, "apply", apply)


def _check_logical_axes(logical_axes: Any) -> None:
  is_spec = lambda x: x is None or isinstance(x, PartitionSpec)
  for path, leaf in jax.tree_util.tree_leaves_with_path(logical_axes, is_leaf=is_spec):
    if not is_spec(leaf):
      where = jax.tree_util.keystr(path) or "the root"
      raise MeshnetError(
          f"Model.logical_axes has {leaf!r} at {where}; its leaves must be "
          "jax.sharding.PartitionSpec of logical names, e.g. P('embed', 'mlp') (a tuple "
          "of names is a pytree, not a spec), or None for no names")


def layer_params(model: Model, params: Params) -> list:
  """``params`` of a model with ``layers`` as a list, one entry per layer
  (``model.to_layers(params)``, or ``params`` itself)."""
  return list(model.to_layers(params) if model.to_layers is not None else params)


def model_params(model: Model, per_layer: Sequence[Any]) -> Params:
  """Inverse of :func:`layer_params`: the model's own parameter tree."""
  return model.from_layers(list(per_layer)) if model.from_layers is not None else list(
      per_layer)


def run_layers(layers: Sequence[Model], to_layers: Callable[[Params], list] | None = None
               ) -> ApplyFn:
  """``apply`` that runs ``layers`` one after another on ``params`` (a list,
  or ``to_layers(params)``), layer ``i`` with ``jax.random.split(key,
  len(layers))[i]``."""
  layers = tuple(layers)

  def apply(params, x, *, train=False, key=None):
    per_layer = to_layers(params) if to_layers is not None else params
    keys = jax.random.split(key, len(layers)) if key is not None else [None] * len(layers)
    for layer, p, k in zip(layers, per_layer, keys):
      x = layer.apply(p, x, train=train, key=k)
    return x
  return apply


def sequential(layers: Sequence[Model]) -> Model:
  """The layers run one after another, as one :class:`Model`.

  ``params`` is a list with one entry per layer; when training with a key,
  layer ``i`` gets ``jax.random.split(key, len(layers))[i]``. ``logical_axes``
  is the list of the layers' own (``None`` for a layer without names), or
  ``None`` when no layer has names.
  """
  layers = tuple(layers)

  def init(key):
    keys = jax.random.split(key, len(layers))
    return [layer.init(k) for layer, k in zip(layers, keys)]

  names = [layer.logical_axes for layer in layers]
  return Model(init, run_layers(layers), layers=layers,
               logical_axes=names if any(n is not None for n in names) else None)


def uses_key(apply: ApplyFn, params: Params, x: jax.Array) -> bool:
  """Whether the output of ``apply(params, x, train=True, key=k)`` depends
  on ``k`` (traced abstractly from shapes; nothing runs). Work whose result
  is dropped (``sequential`` splits the key even when no layer uses it) does
  not count; a nested program that receives the key counts as using it."""
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
  closed = jax.make_jaxpr(lambda p, x, k: apply(p, x, train=True, key=k))(
      *abstract, jax.random.key(0))
  jaxpr = closed.jaxpr
  live = {id(v) for v in jaxpr.outvars}
  for eqn in reversed(jaxpr.eqns):  # backward: an equation is live if an output is
    if any(id(v) in live for v in eqn.outvars) or eqn.effects:
      live.update(id(v) for v in eqn.invars)
  return id(jaxpr.invars[-1]) in live


def example_keys(key: jax.Array, first_index: jax.Array | int, count: int) -> jax.Array:
  """Keys ``[count]`` of global examples ``first_index .. first_index + count - 1``:
  ``fold_in(key, i)``, so an example's key does not depend on which device
  or micro-step carries it."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(count))


def apply_train(apply: ApplyFn, params: Params, x: jax.Array, key: jax.Array,
                first_index: jax.Array | int = 0) -> jax.Array:
  """The training forward pass of ``x: [b, ...]``, rows ``first_index ..``
  of the global batch, with randomness drawn per example.

  If ``apply`` reads its key, it runs once per example (``jax.vmap`` over a
  batch of one) with that example's key from :func:`example_keys`: dropout
  masks are then a function of (seed, step, global example index, layer),
  the same on every layout. Otherwise it runs on the whole batch.

  Returns:
    ``[b, ...]`` outputs.
  """
  if not uses_key(apply, params, x):
    return apply(params, x, train=True, key=key)
  keys = example_keys(key, first_index, x.shape[0])
  one = lambda x_i, k_i: apply(params, x_i[None], train=True, key=k_i)[0]
  return jax.vmap(one)(x, keys)
