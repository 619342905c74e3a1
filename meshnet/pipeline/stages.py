"""Layers, and cutting a list of layers into pipeline stages.

A layer is a pair of pure functions like a model (:class:`meshnet.Model`):
``init(key) -> params`` and ``apply(params, x, *, train, key) -> y``. A
pipelined model is a list of layers; stage ``k`` runs layers
``bounds[k]:bounds[k+1]`` one after another.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from meshnet.errors import MeshnetError
from meshnet.model import Model


def layer_param_counts(layers: Sequence[Model]) -> list[int]:
  """Number of parameters of each layer (from shapes only; nothing is run)."""
  counts = []
  for layer in layers:
    shapes = jax.eval_shape(layer.init, jax.random.key(0))
    counts.append(sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)))
  return counts


BALANCES = ("params", "flops")
"""What :func:`~meshnet.pipeline.make_pipeline`'s default cut balances."""


def layer_flops(layers: Sequence[Model], example: Any) -> list[float]:
  """Forward FLOPs of each layer on one example (XLA's cost analysis of the
  lowered layer; nothing is compiled or run). ``example`` is the first
  layer's input, a ``jax.ShapeDtypeStruct`` with a batch dimension of 1.
  Identical layers (same function, parameter and input shapes) are lowered
  once. A layer XLA counts no FLOPs for (an embedding's lookup) costs 0."""
  costs: list[float] = []
  seen: dict[Any, float] = {}
  x = example
  for layer in layers:
    p = jax.eval_shape(layer.init, jax.random.key(0))
    key = (layer.apply, jax.tree.structure(p), tuple((a.shape, a.dtype)
                                                     for a in jax.tree.leaves(p)),
           x.shape, x.dtype)
    apply = lambda p, x, layer=layer: layer.apply(p, x)
    if key not in seen:
      analysis = jax.jit(apply).lower(p, x).cost_analysis()
      analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
      seen[key] = max(0.0, float((analysis or {}).get("flops", 0.0)))
    costs.append(seen[key])
    x = jax.eval_shape(apply, p, x)
  return costs


def balanced_bounds(costs: Sequence[float], num_stages: int) -> list[int]:
  """Contiguous split of ``costs`` into ``num_stages`` non-empty parts that
  minimises the largest part's total (exact, by dynamic programming).

  Returns:
    ``bounds`` of length ``num_stages + 1``: part ``k`` is
    ``costs[bounds[k]:bounds[k+1]]``.

  Raises:
    MeshnetError: more stages than layers.
  """
  n = len(costs)
  if num_stages > n:
    raise MeshnetError(
        f"{num_stages} pipeline stages but the model has only {n} layers; use at "
        f"most {n} stages (stage x virtual stages <= layers)")
  prefix = np.concatenate([[0.0], np.cumsum(costs)])
  inf = float("inf")
  # best[k][i]: minimal max-part cost splitting the first i layers into k parts.
  best = np.full((num_stages + 1, n + 1), inf)
  cut = np.zeros((num_stages + 1, n + 1), int)
  best[0][0] = 0.0
  for k in range(1, num_stages + 1):
    for i in range(k, n - (num_stages - k) + 1):
      for j in range(k - 1, i):
        value = max(best[k - 1][j], prefix[i] - prefix[j])
        if value < best[k][i]:
          best[k][i], cut[k][i] = value, j
  bounds = [n]
  for k in range(num_stages, 0, -1):
    bounds.append(int(cut[k][bounds[-1]]))
  return bounds[::-1]


def default_bounds(layers: Sequence[Model], num_stages: int, balance: str = "params",
                   example: Any = None) -> list[int]:
  """The cut :func:`~meshnet.pipeline.make_pipeline` makes when given no
  ``bounds``: ``num_stages`` contiguous parts balancing ``balance``
  (``params``, or ``flops`` of one example: ``example`` is then the first
  layer's input as a ``jax.ShapeDtypeStruct`` with a batch dimension of 1)."""
  check_balance(balance)
  if balance == "flops" and example is None:
    raise MeshnetError("default_bounds(balance='flops') needs example=, the first layer's "
                       "input as jax.ShapeDtypeStruct((1, ...), dtype)")
  costs = (layer_param_counts(layers) if balance == "params"
           else layer_flops(layers, example))
  return balanced_bounds(costs, num_stages)


def check_balance(balance: str) -> str:
  """``balance`` if it is one of :data:`BALANCES`, else a one-line error."""
  if balance not in BALANCES:
    raise MeshnetError(f"unknown stage balance {balance!r}; choose one of "
                       f"{', '.join(BALANCES)} (--stage-balance)")
  return balance


def check_bounds(bounds: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
  """Validates user-given stage boundaries (``[0, ..., num_layers]``)."""
  bounds = [int(b) for b in bounds]
  if (len(bounds) != num_stages + 1 or bounds[0] != 0 or bounds[-1] != num_layers
      or any(b >= e for b, e in zip(bounds[:-1], bounds[1:]))):
    raise MeshnetError(
        f"stage bounds {bounds} must rise strictly from 0 to {num_layers} with "
        f"{num_stages + 1} entries (one non-empty range of layers per stage)")
  return bounds
