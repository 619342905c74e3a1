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


@jax.custom_jvp
def matmul(x_BxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """``x @ w``: ``[..., I] @ [I, O] -> [..., O]``, whose weight gradient runs
  on XLA:CPU's fast matmul.

  Under autodiff the weight gradient is ``x^T @ dy``, a contraction over the
  batch. XLA:CPU hands a matmul to YNNPACK only when its left operand is
  row-major and contracted on its last dimension; ``x^T`` read in place is
  neither, so that matmul falls back to a kernel 1.1-2x slower (one core,
  ``x: [256, 1024]``: 8.8 against 6.7 ms with the transpose; ``[2048,
  1024]``: 107 against 54 ms; ``benchmarks/matmul_grad.py``), and it is a
  third of a dense network's training FLOPs. On a CPU backend this rule
  keeps ``x`` transposed once, behind an optimization barrier so that the
  compiler does not fold the transpose back into the matmul; the transpose
  of the tangent's ``x @ dw`` is then ``x^T @ dy`` on a row-major ``x^T``.
  Values are those of ``x @ w`` (a sum may run in another order); on other
  backends it is ``x @ w`` unchanged. Forward mode, ``vmap`` and higher
  derivatives work as for ``x @ w``.
  """
  return x_BxI @ w_IxO


def _matmul_jvp(primals, tangents):
  x, w = primals
  dx, dw = tangents
  y = matmul(x, w)
  terms = []
  if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
    terms.append(dx @ w)
  if not isinstance(dw, jax.custom_derivatives.SymbolicZero):
    if jax.default_backend() == "cpu" and x.ndim >= 2:
      x_IxN = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
      terms.append(jax.lax.dot_general(x_IxN, dw, (((0,), (0,)), ((), ())))
                   .reshape(y.shape))
    else:
      terms.append(x @ dw)
  return y, sum(terms[1:], terms[0]).astype(y.dtype) if terms else jnp.zeros_like(y)


matmul.defjvp(_matmul_jvp, symbolic_zeros=True)


def dense(params: dict[str, jax.Array], x_BxI: jax.Array) -> jax.Array:
  """``x @ w + b``: ``[B, I] -> [B, O]`` (``x @ w`` by :func:`matmul`)."""
  return matmul(x_BxI, params["w"]) + params["b"][None, :]


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
