"""Optax optimizers and learning-rate schedules from an :class:`OptimConfig`.

Weight decay means what it means in PyTorch: for ``sgd``, ``momentum`` and
``adam`` the L2 term ``weight_decay * param`` is added to the gradient
before the optimizer sees it (``torch.optim.SGD/Adam(weight_decay=)``), after
gradient clipping (torch users clip before ``step()``, which adds the term);
``adamw`` decays the weights decoupled from the gradient (``optax.adamw``,
``torch.optim.AdamW``). optax's ``sgd(momentum=)`` keeps torch's momentum
buffer: ``b = momentum * b + g`` (the first ``b`` is ``g``: no dampening,
not Nesterov), ``p -= lr * b``.
"""

from __future__ import annotations

import optax

from meshnet.config import OptimConfig
from meshnet.defaults import DEFAULTS
from meshnet.errors import MeshnetError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "warmup_cosine")
# The optimizers whose weight decay is an L2 term added to the gradient.
L2_OPTIMIZERS = ("sgd", "momentum", "adam")


def _lr(config: OptimConfig) -> float:
  """The peak rate; an unset one (not resolved for a data set) is the default."""
  return config.lr if config.lr is not None else DEFAULTS["optim.lr"]


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step.

  Raises:
    MeshnetError: unknown schedule, or warmup longer than the run.
  """
  if config.lr_schedule == "constant":
    return optax.constant_schedule(_lr(config))
  if config.lr_schedule == "warmup_cosine":
    if not 0 <= config.warmup_steps < total_steps:
      raise MeshnetError(
          f"warmup_steps={config.warmup_steps} must be in [0, {total_steps}) for a "
          f"run of {total_steps} steps"
      )
    return optax.warmup_cosine_decay_schedule(
        0.0, _lr(config), config.warmup_steps, total_steps, end_value=0.0
    )
  raise MeshnetError(
      f"unknown lr schedule {config.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
  )


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """Clipping (if any), then L2 weight decay (if any), then the optimizer.

  ``clip_by_global_norm -> add_decayed_weights -> sgd/adam`` for ``sgd``,
  ``momentum`` and ``adam`` (PyTorch's ``weight_decay``: the gradient the
  optimizer sees is ``clip(g) + weight_decay * p``); ``adamw`` takes its
  decoupled decay itself. Without clipping or decay the optimizer is
  returned alone, so its state keeps the same structure as before.

  Gradient accumulation is not here: the train step accumulates micro-steps
  before the exchange between devices, so there is one exchange per step.

  The numbers (lr, weight decay, momentum, clip norm) were checked when
  ``config`` was built (:class:`~meshnet.config.OptimConfig`).

  Raises:
    MeshnetError: unknown optimizer or schedule.
  """
  schedule = make_schedule(config, total_steps)
  name = config.optimizer
  if name == "sgd":
    core = optax.sgd(schedule)
  elif name == "momentum":
    core = optax.sgd(schedule, momentum=config.momentum)
  elif name == "adam":
    core = optax.adam(schedule)
  elif name == "adamw":
    core = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    raise MeshnetError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
  parts = []
  if config.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  if name in L2_OPTIMIZERS and config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(core)
  return optax.chain(*parts) if len(parts) > 1 else core
