"""Optax optimizers and learning-rate schedules from an :class:`OptimConfig`."""

from __future__ import annotations

import optax

from meshnet.config import OptimConfig
from meshnet.errors import MeshnetError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "warmup_cosine")


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step.

  Raises:
    MeshnetError: unknown schedule, or warmup longer than the run.
  """
  if config.lr_schedule == "constant":
    return optax.constant_schedule(config.lr)
  if config.lr_schedule == "warmup_cosine":
    if not 0 <= config.warmup_steps < total_steps:
      raise MeshnetError(
          f"warmup_steps={config.warmup_steps} must be in [0, {total_steps}) for a "
          f"run of {total_steps} steps"
      )
    return optax.warmup_cosine_decay_schedule(
        0.0, config.lr, config.warmup_steps, total_steps, end_value=0.0
    )
  raise MeshnetError(
      f"unknown lr schedule {config.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
  )


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """Clipping (if any) chained before the optimizer, with its schedule.

  Gradient accumulation is not here: the train step accumulates micro-steps
  before the exchange between devices, so there is one exchange per step.

  The numbers (lr, weight decay, momentum, clip norm) were checked when
  ``config`` was built (:class:`~meshnet.config.OptimConfig`).

  Raises:
    MeshnetError: unknown optimizer or schedule, or weight decay with adam.
  """
  schedule = make_schedule(config, total_steps)
  name = config.optimizer
  if name == "adam" and config.weight_decay > 0:
    raise MeshnetError(
        f"adam does not take weight_decay={config.weight_decay}; use --optimizer adamw"
    )
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
  if name in ("sgd", "momentum") and config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(core)
  return optax.chain(*parts) if len(parts) > 1 else core
