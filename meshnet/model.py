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
from typing import Any, Callable

import jax

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
      layer. Pipeline parallelism cuts a model along its layers, so only
      models with ``layers`` can be pipelined. See :func:`sequential`.
  """

  init: InitFn
  apply: ApplyFn
  layers: tuple["Model", ...] | None = None

  def __post_init__(self):
    if not callable(self.init) or not callable(self.apply):
      raise TypeError("Model(init, apply) needs two callables")
    if not _accepts_train_and_key(self.apply):
      plain = self.apply

      @functools.wraps(plain)
      def apply(params, x, *, train=False, key=None):
        del train, key
        return plain(params, x)

      object.__setattr__(self, "apply", apply)


def sequential(layers: Sequence[Model]) -> Model:
  """The layers run one after another, as one :class:`Model`.

  ``params`` is a list with one entry per layer; when training with a key,
  layer ``i`` gets ``jax.random.split(key, len(layers))[i]``.
  """
  layers = tuple(layers)

  def init(key):
    keys = jax.random.split(key, len(layers))
    return [layer.init(k) for layer, k in zip(layers, keys)]

  def apply(params, x, *, train=False, key=None):
    keys = jax.random.split(key, len(layers)) if key is not None else [None] * len(layers)
    for layer, p, k in zip(layers, params, keys):
      x = layer.apply(p, x, train=train, key=k)
    return x

  return Model(init, apply, layers=layers)
