"""Single-device references the parallel paths are compared against.

Nothing here uses meshnet's step, collectives or shardings: just the model's
own ``apply``, ``jax.grad`` on the whole batch, and optax, on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

ONE_DEVICE = jax.devices()[0]


def mean_loss(model, per_example_loss, params, x, y):
  return jnp.mean(per_example_loss(model.apply(params, x), y))


def _value_and_grad(model, per_example_loss):
  return jax.jit(jax.value_and_grad(
      lambda p, x, y: mean_loss(model, per_example_loss, p, x, y)))


def loss_and_grad(model, per_example_loss, params, x, y):
  """Full-batch loss and gradient on one device."""
  params, x, y = jax.device_put((params, np.asarray(x), np.asarray(y)), ONE_DEVICE)
  return _value_and_grad(model, per_example_loss)(params, x, y)


def train(model, per_example_loss, optimizer, params, batches):
  """Plain optax steps on one device; returns (params, losses)."""
  value_and_grad = _value_and_grad(model, per_example_loss)
  params = jax.device_put(params, ONE_DEVICE)
  opt_state = optimizer.init(params)
  losses = []
  for x, y in batches:
    loss, grads = value_and_grad(params, *jax.device_put((x, y), ONE_DEVICE))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  return params, losses


def to_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def markdown_tables(out: str) -> dict[str, list[dict[str, str]]]:
  """Markdown tables in a benchmark's output, by their first column's
  header: rows as ``{header: cell}``."""
  tables, header = {}, None
  for line in out.splitlines():
    if not line.startswith("|"):
      header = None
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if header is None:
      header = cells
      tables[header[0]] = []
    elif set(cells) != {"---"}:
      tables[header[0]].append(dict(zip(header, cells)))
  return tables
