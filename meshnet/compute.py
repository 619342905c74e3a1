"""How a step computes: its precision and what it rematerialises.

Both are a transformation of a :class:`~meshnet.model.Model` into another
with the same ``init``, parameter tree and logical axes, so every step (data,
``fsdp``, ``tensor``, the pipeline's stages) applies them the same way:
``policy_model(model, precision="bf16", remat="layer")``.

Precision (jmp's ``params=float32, compute=bfloat16, output=float32``;
MaxText's ``weight_dtype``/``dtype``):

* ``fp32``: everything in float32 (the default);
* ``bf16``: the float32 master parameters and the input are cast to bfloat16
  inside ``apply`` (so matmuls and activations are bfloat16), the output is
  cast back to float32 before the loss. The cast's transpose brings the
  gradient back in float32, so the loss, gradient accumulation, the gradient
  exchange, the optimizer state and the parameters stay float32.

Rematerialisation (``jax.checkpoint``): what the backward recomputes instead
of keeping from the forward.

* ``none``: keep the forward's residuals (the default);
* ``layer``: keep each layer's input only; the backward recomputes one layer
  at a time (``jax.checkpoint`` with
  ``jax.checkpoint_policies.nothing_saveable`` around each layer of a model
  with ``layers``; a model without layers is one layer, so ``layer`` is
  ``full`` for it);
* ``full``: keep only the model's input (a pipeline: each stage's input);
  the backward recomputes the whole forward first, itself under ``layer``
  (a checkpoint around the per-layer ones), then each layer again. Within one
  unpipelined step its peak is ``layer``'s (the recomputed forward keeps the
  layer inputs) for one more forward; what it adds is that nothing but the
  input lives between the forward and the backward, which is what a
  pipeline's microbatches in flight hold.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from meshnet.errors import MeshnetError
from meshnet.model import ApplyFn, Model, run_layers, uses_key

PRECISIONS: dict[str, Any] = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
REMAT_POLICIES = ("none", "layer", "full")


def check_precision(precision: Any) -> str:
  """``precision`` if it names one of :data:`PRECISIONS`.

  Raises:
    MeshnetError: an unknown precision, naming it and the choices.
  """
  if not isinstance(precision, str) or precision not in PRECISIONS:
    raise MeshnetError(f"unknown precision {precision!r}; choose one of "
                       f"{', '.join(PRECISIONS)} (--precision)")
  return precision


def check_remat(remat: Any) -> str:
  """The remat policy ``remat`` names; ``True``/``False`` (the pipeline's
  former boolean) are ``full``/``none``.

  Raises:
    MeshnetError: an unknown policy, naming it and the choices.
  """
  if remat is True or remat is False:
    return "full" if remat else "none"
  if not isinstance(remat, str) or remat not in REMAT_POLICIES:
    raise MeshnetError(f"unknown remat policy {remat!r}; choose one of "
                       f"{', '.join(REMAT_POLICIES)} (--remat)")
  return remat


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Every floating-point leaf of ``tree`` as ``dtype`` (others unchanged)."""
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a,
      tree)


def checkpointed(apply: ApplyFn) -> ApplyFn:
  """``apply`` under ``jax.checkpoint`` (``nothing_saveable``): its backward
  keeps only its inputs and recomputes the rest.

  An ``apply`` whose output does not read its key gets a constant key in its
  place, so :func:`~meshnet.model.uses_key` still sees the key unused (a
  checkpointed program that receives the key would count as reading it).
  """
  policy = jax.checkpoint_policies.nothing_saveable

  def run(params, x, *, train=False, key=None):
    if key is not None and not uses_key(apply, params, x):
      key = jax.random.key(0)
    if key is None:
      inner = lambda p, x, k: apply(p, x, train=train, key=None)
      return jax.checkpoint(inner, policy=policy)(params, x, None)
    # The key crosses the checkpoint as raw uint32 data: a residual that
    # packs into plain buffers (the pipeline's) like any other array.
    impl = jax.random.key_impl(key)
    inner = lambda p, x, k: apply(p, x, train=train, key=jax.random.wrap_key_data(k, impl=impl))
    return jax.checkpoint(inner, policy=policy)(params, x, jax.random.key_data(key))
  return run


def remat_model(model: Model, remat: str) -> Model:
  """``model`` with its backward rematerialising per ``remat`` (see the
  module docstring); ``none`` returns ``model``."""
  remat = check_remat(remat)
  if remat == "none":
    return model
  if model.layers:
    layers = tuple(dataclasses.replace(layer, apply=checkpointed(layer.apply))
                   for layer in model.layers)
    # A model with its own layered view (to_layers: a gpt's scan over stacked
    # blocks) keeps its apply, which checkpoints its blocks itself; the
    # checkpointed layers are what a pipeline runs.
    apply = model.apply if model.to_layers is not None else run_layers(layers)
    model = dataclasses.replace(model, apply=apply, layers=layers)
    if remat == "layer":
      return model
  return dataclasses.replace(model, apply=checkpointed(model.apply))


def precision_model(model: Model, precision: str) -> Model:
  """``model`` computing in ``precision`` (see the module docstring): its
  ``apply`` takes float32 parameters and returns float32 outputs whatever the
  compute dtype; ``fp32`` returns ``model``."""
  dtype = PRECISIONS[check_precision(precision)]
  if dtype == jnp.float32:
    return model
  inner = model.apply

  def apply(params, x, *, train=False, key=None):
    out = inner(cast_floating(params, dtype), cast_floating(x, dtype), train=train, key=key)
    return cast_floating(out, jnp.float32)
  return dataclasses.replace(model, apply=apply)


def precision_layers(model: Model, precision: str) -> Model:
  """``model`` (with ``layers``) computing in ``precision`` layer by layer,
  for a pipeline: each layer casts its float32 parameters and its input to
  the compute dtype and returns its output in it (so activations between
  stages are bfloat16), except the last, which returns float32 for the loss.
  The same numbers as :func:`precision_model`; ``fp32`` returns ``model``."""
  dtype = PRECISIONS[check_precision(precision)]
  if dtype == jnp.float32 or not model.layers:
    return model

  def cast(layer: Model, out_dtype: Any) -> Model:
    inner = layer.apply

    def apply(params, x, *, train=False, key=None):
      out = inner(cast_floating(params, dtype), cast_floating(x, dtype), train=train, key=key)
      return cast_floating(out, out_dtype)
    return dataclasses.replace(layer, apply=apply)

  layers = tuple(cast(layer, jnp.float32 if i == len(model.layers) - 1 else dtype)
                 for i, layer in enumerate(model.layers))
  return dataclasses.replace(model, apply=run_layers(layers, model.to_layers), layers=layers)


def policy_model(model: Model, *, precision: str = "fp32", remat: str = "none") -> Model:
  """``model`` with both: the precision's casts outside, the remat policy
  inside (a checkpoint then keeps bfloat16 inputs)."""
  return precision_model(remat_model(model, remat), precision)
