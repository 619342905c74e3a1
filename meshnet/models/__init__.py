"""Built-in models, each a :class:`meshnet.Model` built from :mod:`meshnet.nn`.

``build(name, ...)`` is what ``meshnet train --model NAME`` uses; the
functions themselves (``mlp``) are the Python API.
"""

from __future__ import annotations

from typing import Callable, Sequence

from meshnet.errors import MeshnetError
from meshnet.model import Model
from meshnet.models.flax_adapter import from_flax, from_nnx
from meshnet.models.mlp import mlp


def _build_mlp(
    input_size: int, output_size: int, *, hidden: Sequence[int], activation: str,
    dropout: float,
) -> Model:
  return mlp([input_size, *hidden, output_size], activation=activation, dropout=dropout)


_BUILDERS: dict[str, Callable[..., Model]] = {"mlp": _build_mlp}
MODELS: tuple[str, ...] = tuple(_BUILDERS)


def build(
    name: str, input_size: int, output_size: int, *, hidden: Sequence[int] = (),
    activation: str = "relu", dropout: float = 0.0,
) -> Model:
  """The built-in model ``name`` for inputs of ``input_size`` features.

  Raises:
    MeshnetError: ``name`` is not a built-in model.
  """
  if name not in _BUILDERS:
    raise MeshnetError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
  return _BUILDERS[name](
      input_size, output_size, hidden=hidden, activation=activation, dropout=dropout
  )


__all__ = ["MODELS", "build", "from_flax", "from_nnx", "mlp"]
