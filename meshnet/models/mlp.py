"""Multi-layer perceptron: dense layers with an activation between them."""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

from meshnet import nn
from meshnet.errors import MeshnetError
from meshnet.model import Model, sequential

_GAIN = {"relu": 2.0, "gelu": 2.0, "silu": 2.0}


def layer_logical_axes(i: int, n_layers: int) -> dict[str, P]:
  """Logical names of layer ``i``'s ``{"w": [I, O], "b": [O]}`` in an MLP of
  ``n_layers`` dense layers.

  Hidden layers come in Megatron pairs: an even layer is column-split
  (``w: P("embed", "mlp")``, ``b: P("mlp")``: its outputs split over
  ``tensor``), the odd layer after it row-split (``w: P("mlp", "embed")``,
  ``b: P("embed")``: partial products summed over ``tensor``). The output
  layer is ``w: P("embed", None)``, ``b: P(None)``: the class count is never
  split, and its input width is split over ``fsdp`` like every ``embed``
  width. So ``widths[0]``, the output of each row-split layer and the input
  of the output layer must divide by ``fsdp``; the other hidden widths by
  ``tensor``.
  """
  if i == n_layers - 1:
    return {"w": P("embed", None), "b": P(None)}
  if i % 2 == 0:
    return {"w": P("embed", "mlp"), "b": P("mlp")}
  return {"w": P("mlp", "embed"), "b": P("embed")}


def mlp(
    widths: Sequence[int],
    activation: str = "relu",
    output_activation: str | None = None,
    dropout: float = 0.0,
) -> Model:
  """An MLP ``widths[0] -> widths[1] -> ... -> widths[-1]``.

  Examples: ``mlp([2, 4, 1])`` is the ReLU/linear XOR net;
  ``mlp([4, 3, 1], "sigmoid", "sigmoid")`` the sigmoid net of classic
  backprop; ``mlp([784, 512, 256, 128, 10], dropout=0.2)`` the MNIST MLP.

  Args:
    widths: feature sizes, input first, output last (at least two).
    activation: name of the activation after every hidden layer
      (relu, gelu, tanh, sigmoid, silu, linear).
    output_activation: activation after the last layer; ``None`` gives raw
      outputs (logits for classification).
    dropout: rate of dropout after every hidden activation, when training.

  Returns:
    A :class:`Model` with ``layers`` (one dense layer each, so it can be
    pipelined). ``params`` is a list with one ``{"w": [I, O], "b": [O]}``
    per layer; ``apply`` maps ``x: [B, widths[0]]`` to ``[B, widths[-1]]``.
    ``logical_axes`` (see :func:`layer_logical_axes`) pair the hidden
    layers Megatron-style, column-split then row-split; the input width, each
    row-split layer's output and the output layer's input are ``embed``.
  """
  widths = [int(w) for w in widths]
  if len(widths) < 2 or min(widths) < 1:
    raise MeshnetError(
        f"mlp widths {widths} need an input and an output size, all >= 1"
    )
  if not 0.0 <= dropout < 1.0:
    raise MeshnetError(f"dropout {dropout} must be in [0, 1)")
  hidden_fn = nn.activation(activation)
  output_fn = nn.activation(output_activation)
  gain = _GAIN.get(activation, 1.0)
  n_layers = len(widths) - 1

  def make_layer(i: int, fan_in: int, fan_out: int) -> Model:
    last = i == n_layers - 1

    def init(key: jax.Array) -> dict[str, jax.Array]:
      return nn.dense_init(key, fan_in, fan_out, gain=1.0 if last else gain)

    def apply(params, x_BxI, *, train: bool = False, key: jax.Array | None = None):
      if x_BxI.shape[-1] != fan_in:
        raise MeshnetError(
            f"mlp layer {i} expects inputs of {fan_in} features, got shape {x_BxI.shape}")
      h = nn.dense(params, x_BxI.reshape(x_BxI.shape[0], -1))
      if last:
        return output_fn(h)
      return nn.dropout(hidden_fn(h), dropout, key=key, train=train)

    return Model(init, apply, logical_axes=layer_logical_axes(i, n_layers))

  return sequential(
      [make_layer(i, a, b) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))])
