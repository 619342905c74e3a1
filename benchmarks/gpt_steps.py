"""What the GPT benchmarks share: a hand-written ``jax.jit`` train step (no
meshnet step code) to compare meshnet's against, and the step timer."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax


def plain_step(model, optimizer, compute_dtype=None):
  """A jitted step ``(params, opt_state, x, y) -> (params, opt_state, loss)``:
  the token cross-entropy's mean over ``B x T``, its gradient and one
  ``optimizer`` update. With ``compute_dtype`` (e.g. ``jnp.bfloat16``) the
  float32 masters are cast for the forward and the logits back to float32,
  the recipe of ``precision="bf16"``."""
  def loss_fn(params, x_BxT, y_BxT):
    if compute_dtype is not None:
      params = jax.tree.map(lambda a: a.astype(compute_dtype), params)
    logits_BxTxV = model.apply(params, x_BxT).astype(jnp.float32)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp_BxTxV, y_BxT[..., None], axis=-1))

  def step(params, opt_state, x_BxT, y_BxT):
    loss, grads = jax.value_and_grad(loss_fn)(params, x_BxT, y_BxT)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def timed(step, carry, steps: int):
  """``steps`` steps from ``carry``: the final carry and the seconds per step."""
  jax.block_until_ready(carry)
  begin = time.perf_counter()
  for _ in range(steps):
    carry = step(carry)
  jax.block_until_ready(carry)
  return carry, (time.perf_counter() - begin) / steps
