"""Per-example losses and correctness, for training and evaluation.

A loss here maps model outputs ``[B, ...]`` and targets ``[B, ...]`` to
per-example values ``[B]``; the training loss is their mean over the batch.

Sequences: :func:`cross_entropy` and :func:`argmax_correct` also take
``[B, T, V]`` logits with ``[B, T]`` labels (a language model's next-token
targets), and give each example the *mean over its T positions*. Every
example of a batch has the same T, so the mean over examples that the
train and eval steps take is then exactly the mean over all ``B * T``
tokens: the usual per-token loss (and, for bytes, ``loss / ln 2`` bits per
byte) and per-token accuracy.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from meshnet.errors import MeshnetError


class Objective(NamedTuple):
  """A loss and, optionally, a correctness test (for accuracy).

  Attributes:
    loss: ``(outputs [B, ...], targets [B, ...]) -> [B]`` per-example loss.
    correct: ``(outputs, targets) -> [B]`` bool, or ``None`` (no accuracy).
  """

  loss: Callable[[jax.Array, jax.Array], jax.Array]
  correct: Callable[[jax.Array, jax.Array], jax.Array] | None = None


def _per_example(values: jax.Array) -> jax.Array:
  """``[B, ...] -> [B]``: the mean over every axis after the batch axis (a
  ``[B]`` input is returned as it is)."""
  if values.ndim == 1:
    return values
  return jnp.mean(values.reshape(values.shape[0], -1), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels.

  ``[B, C], [B] -> [B]``, or for sequences ``[B, T, V], [B, T] -> [B]``: the
  mean of the ``T`` positions' losses (see the module docstring).
  """
  return _per_example(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def argmax_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Whether the top class is the label.

  ``[B, C], [B] -> [B]`` bool, or for sequences ``[B, T, V], [B, T] -> [B]``
  float32: the fraction of the ``T`` positions whose top class is the label
  (so summing over examples and dividing by ``B`` gives the per-token
  accuracy).
  """
  hits = jnp.argmax(logits, axis=-1) == labels
  return hits if hits.ndim == 1 else _per_example(hits.astype(jnp.float32))


def squared_error(pred_BxO: jax.Array, target_BxO: jax.Array) -> jax.Array:
  """Mean squared error over the output features: ``[B, O], [B, O] -> [B]``."""
  return jnp.mean(jnp.square(pred_BxO - target_BxO).reshape(pred_BxO.shape[0], -1), axis=-1)


def within_half(pred_BxO: jax.Array, target_BxO: jax.Array) -> jax.Array:
  """Every output within 0.5 of its target (right side of 0.5 for 0/1 targets)."""
  close = jnp.abs(pred_BxO - target_BxO) < 0.5
  return jnp.all(close.reshape(pred_BxO.shape[0], -1), axis=-1)


OBJECTIVES: dict[str, Objective] = {
    "cross_entropy": Objective(cross_entropy, argmax_correct),
    "mse": Objective(squared_error, within_half),
}


def objective(loss: str | Objective | Callable) -> Objective:
  """An :class:`Objective` from a name in :data:`OBJECTIVES`, an Objective,
  or a per-example loss function (then without accuracy)."""
  if isinstance(loss, Objective):
    return loss
  if callable(loss):
    return Objective(loss)
  if loss not in OBJECTIVES:
    raise MeshnetError(f"unknown loss {loss!r}; choose one of {', '.join(OBJECTIVES)}")
  return OBJECTIVES[loss]
