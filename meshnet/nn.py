"""Pure layers: each an ``init`` function and an ``apply`` function.

Shapes are global (meshnet shards them); ``B`` is the batch, ``I``/``O`` the
input/output features.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from meshnet.errors import MeshnetError

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


def activation(name: str | None) -> Callable[[jax.Array], jax.Array]:
  """The activation function called ``name`` (``None`` means identity)."""
  if name is None:
    return ACTIVATIONS["linear"]
  if name not in ACTIVATIONS:
    raise MeshnetError(
        f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
    )
  return ACTIVATIONS[name]


def dense_init(
    key: jax.Array, fan_in: int, fan_out: int, *, gain: float = 1.0,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
  """Parameters of a dense layer: ``{"w": [I, O], "b": [O]}``.

  ``w`` is drawn from a truncated normal of variance ``gain / I`` (LeCun with
  a gain: 2 suits ReLU, 1 tanh/sigmoid/linear); ``b`` is zero.
  """
  std = jnp.sqrt(gain / fan_in) / 0.87962566  # stddev of a unit normal truncated at 2
  w = std * jax.random.truncated_normal(key, -2.0, 2.0, (fan_in, fan_out), dtype)
  return {"w": w, "b": jnp.zeros((fan_out,), dtype)}


def dense(params: dict[str, jax.Array], x_BxI: jax.Array) -> jax.Array:
  """``x @ w + b``: ``[B, I] -> [B, O]``."""
  return x_BxI @ params["w"] + params["b"][None, :]


def dropout(x: jax.Array, rate: float, *, key: jax.Array | None, train: bool) -> jax.Array:
  """Inverted dropout: zeroes a ``rate`` fraction of ``x`` when ``train``.

  Kept values are scaled by ``1 / (1 - rate)`` so evaluation needs no change.
  Raises a ``MeshnetError`` if training with ``rate > 0`` and no ``key``.
  """
  if not train or rate == 0.0:
    return x
  if key is None:
    raise MeshnetError(f"dropout rate {rate} needs a key when train=True")
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# Transformer layers (defined in meshnet.nn_transformer, used as meshnet.nn.*).
from meshnet.nn_transformer import (  # noqa: E402
    ATTENTIONS, EMBEDDINGS, NORMS, ONEHOT_MAX_VOCAB, POSITIONS, add_positions,
    attention_init, causal_attention, embedding, embedding_init, layer_norm,
    logical_axes_of, mlp_block, mlp_block_init, norm, norm_init, normal_init,
    positions_init, rms_norm, rotary, stacked, unembed,
)
