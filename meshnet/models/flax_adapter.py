"""Adapting a ``flax.linen`` module to meshnet's ``Model(init, apply)``."""

from __future__ import annotations

from typing import Any

import jax

from meshnet.model import Model


def from_flax(module: Any, example_x: jax.Array, *, dropout_rng: str = "dropout") -> Model:
  """Wraps a ``flax.linen.Module`` as a :class:`Model`.

  ``init(key)`` returns the module's ``"params"`` collection (other mutable
  collections such as batch statistics are not supported). ``apply`` passes
  ``key`` as the ``dropout_rng`` stream when training, and a ``train``
  keyword only if the module's ``__call__`` takes one.

  Args:
    module: the linen module.
    example_x: an input of the right trailing shape (``[B, ...]``) for init.
    dropout_rng: name of the rng stream the module uses for dropout.
  """
  import inspect

  takes_train = "train" in inspect.signature(module.__call__).parameters

  def init(key):
    kwargs = {"train": False} if takes_train else {}
    return module.init(key, example_x, **kwargs)["params"]

  def apply(params, x, *, train=False, key=None):
    kwargs = {"train": train} if takes_train else {}
    rngs = {dropout_rng: key} if key is not None else None
    return module.apply({"params": params}, x, rngs=rngs, **kwargs)

  return Model(init, apply)
