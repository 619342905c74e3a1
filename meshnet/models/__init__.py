"""Built-in models, each a :class:`meshnet.Model` built from :mod:`meshnet.nn`.

``build(name, ...)`` is what ``meshnet train --model NAME`` uses; the
functions themselves (``mlp``, ``gpt``) are the Python API.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from meshnet.errors import MeshnetError
from meshnet.model import Model
from meshnet.models.flax_adapter import from_flax, from_nnx
from meshnet.models.gpt import GPT_SIZES, GPTConfig, gpt, gpt_config
from meshnet.models.gpt import from_config as gpt_from_config
from meshnet.models.mlp import mlp


def _build_mlp(
    input_size: int, output_size: int, *, hidden: Sequence[int], activation: str,
    dropout: float, gpt_cfg: GPTConfig | None,
) -> Model:
  del gpt_cfg
  return mlp([input_size, *hidden, output_size], activation=activation, dropout=dropout)


def _build_gpt(
    input_size: int, output_size: int, *, hidden: Sequence[int], activation: str,
    dropout: float, gpt_cfg: GPTConfig | None,
) -> Model:
  """A GPT over ``output_size`` symbols for sequences of ``input_size``
  tokens (at most its context)."""
  del hidden, activation
  if gpt_cfg is None:
    gpt_cfg = gpt_config("tiny", dropout=dropout)
  cfg = dataclasses.replace(gpt_cfg, vocab=output_size)
  if input_size > cfg.context and cfg.positions == "learned":
    raise MeshnetError(
        f"the data's sequences of {input_size} tokens are longer than the gpt context "
        f"{cfg.context}; pass --context {input_size} or shorter windows")
  return gpt_from_config(cfg)


_BUILDERS: dict[str, Callable[..., Model]] = {"mlp": _build_mlp, "gpt": _build_gpt}
MODELS: tuple[str, ...] = tuple(_BUILDERS)


def build(
    name: str, input_size: int, output_size: int, *, hidden: Sequence[int] = (),
    activation: str = "relu", dropout: float = 0.0, gpt_cfg: GPTConfig | None = None,
) -> Model:
  """The built-in model ``name`` for inputs of ``input_size`` features
  (``gpt``: sequences of ``input_size`` tokens) and ``output_size`` outputs
  (``gpt``: the vocabulary).

  Args:
    name: a name in :data:`MODELS`.
    input_size, output_size: from the data set.
    hidden, activation, dropout: ``mlp``'s (``dropout``: ``gpt``'s too,
      unless ``gpt`` is given).
    gpt_cfg: ``gpt``'s shape and options (its ``vocab`` is replaced by
      ``output_size``); ``None``: the ``tiny`` size with ``dropout``.

  Raises:
    MeshnetError: ``name`` is not a built-in model, or the data do not fit it.
  """
  if name not in _BUILDERS:
    raise MeshnetError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
  return _BUILDERS[name](
      input_size, output_size, hidden=hidden, activation=activation, dropout=dropout,
      gpt_cfg=gpt_cfg
  )


__all__ = ["GPTConfig", "GPT_SIZES", "MODELS", "build", "from_flax", "from_nnx", "gpt",
           "gpt_config", "mlp"]
