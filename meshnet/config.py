"""Typed configuration: one frozen dataclass per concern, composed in :class:`Config`.

Every flag of ``meshnet train`` is a field here (``--grad-accum`` is
``Config.optim.grad_accum``), so a run is reproducible from Python with
``meshnet.train.run(Config(...))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meshnet.errors import MeshnetError
from meshnet.mesh import AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (one may be -1: the rest of the devices).

  Attributes:
    data, fsdp, stage, tensor: axis sizes (see :mod:`meshnet.mesh`).
    devices: on the CPU platform, run on this many (simulated) devices; see
      :func:`meshnet.mesh.select_devices`. ``None`` uses every device JAX has.
  """

  data: int = -1
  fsdp: int = 1
  stage: int = 1
  tensor: int = 1
  devices: int | None = None

  def axes(self) -> dict[str, int]:
    return {axis: getattr(self, axis) for axis in AXES}

  @classmethod
  def parse(cls, text: str, devices: int | None = None) -> "MeshConfig":
    """``"data=4,stage=2"`` -> ``MeshConfig(data=4, stage=2)``.

    Absent axes are 1, except ``data``, which takes the devices the other axes
    leave (``-1``) unless another axis is -1.
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
      name, sep, value = part.partition("=")
      name = name.strip()
      if not sep or name not in AXES:
        raise MeshnetError(
            f"bad mesh entry {part!r} in {text!r}; write AXIS=SIZE with AXIS in "
            f"{', '.join(AXES)}, e.g. data=4,stage=2"
        )
      try:
        sizes[name] = int(value)
      except ValueError:
        raise MeshnetError(f"mesh size {value!r} for {name} is not an integer") from None
    if "data" not in sizes and -1 not in sizes.values():
      sizes["data"] = -1  # data parallelism over the devices the others leave
    return cls(**{axis: sizes.get(axis, 1) for axis in AXES}, devices=devices)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A built-in model (``meshnet.models.build``).

  Attributes:
    name: model name (``mlp``).
    hidden: hidden layer widths; input and output sizes come from the data.
    activation: hidden activation.
    dropout: dropout rate after each hidden activation when training.
  """

  name: str = "mlp"
  hidden: tuple[int, ...] = (256, 128)
  activation: str = "relu"
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Attributes:
    dataset: ``xor``, ``digits`` or ``mnist``.
    data_dir: directory with files for file-based data sets (mnist).
    batch_size: global batch size, over all devices and processes.
  """

  dataset: str = "digits"
  data_dir: str | None = None
  batch_size: int = 128


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer, learning-rate schedule, clipping and accumulation.

  Attributes:
    optimizer: ``sgd``, ``momentum``, ``adam`` or ``adamw``.
    lr: peak learning rate.
    weight_decay: decoupled weight decay (adamw) or L2 added to the
      gradient (sgd, momentum); adam refuses it (use adamw).
    momentum: momentum coefficient for ``momentum``.
    lr_schedule: ``constant`` or ``warmup_cosine`` (linear warmup over
      ``warmup_steps``, then cosine decay to 0 at the last step).
    warmup_steps: warmup length for ``warmup_cosine``.
    clip_norm: clip the gradient's global norm to this (``None``: no clipping).
    grad_accum: accumulate gradients over this many micro-steps per step.
    deterministic: average gradients over ``data`` in a fixed order, so runs
      are bit-identical however devices are spread over processes.
  """

  optimizer: str = "adam"
  lr: float = 1e-3
  weight_decay: float = 0.0
  momentum: float = 0.9
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  clip_norm: float | None = None
  grad_accum: int = 1
  deterministic: bool = False


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Pipeline parallelism, used when the mesh's ``stage`` axis is > 1.

  Attributes:
    schedule: ``gpipe``, ``1f1b``, ``interleaved`` or ``zb``.
    microbatches: microbatches per data replica per step (default: the
      number of stages). With gradient accumulation the pipeline runs
      ``microbatches * grad_accum`` microbatches: the same mean gradient.
    virtual_stages: chunks per device for ``interleaved``.
  """

  schedule: str = "1f1b"
  microbatches: int | None = None
  virtual_stages: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Checkpoints (Orbax, asynchronous, logical layout).

  Attributes:
    dir: checkpoint directory; ``None`` saves nothing.
    every: save every this many steps (0: only at the end and on SIGTERM or
      SIGINT).
    keep: newest checkpoints kept.
    resume: continue from the newest complete checkpoint in ``dir``; the
      fields in ``meshnet.checkpoint.STATE_FIELDS`` (model, optimizer, seed,
      data set, batch size) must be those of the checkpoint, the mesh,
      pipeline, run length, learning rate and logging may change.
    overwrite: replace the checkpoints already in ``dir`` (deleted when this
      run saves its first step); without it or ``resume``, a ``dir`` holding
      checkpoints is refused.
  """

  dir: str | None = None
  every: int = 0
  keep: int = 3
  resume: bool = False
  overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop.

  Attributes:
    steps: optimizer steps to run; ``None`` runs ``epochs`` epochs.
    epochs: epochs to run when ``steps`` is ``None``.
    seed: seed for initialisation, shuffling and dropout.
    eval_every: evaluate on the test split every this many steps and at the
      end; 0 turns evaluation off.
    log_every: log (progress, metrics file) every this many steps.
    metrics_file: JSON-lines file for metrics (``None``: none written).
    eval_batch_size: examples per evaluation batch.
    progress: draw the progress bar.
  """

  steps: int | None = None
  epochs: int = 20
  seed: int = 0
  eval_every: int = 100
  log_every: int = 10
  metrics_file: str | None = None
  eval_batch_size: int = 1024
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a training run needs."""

  mesh: MeshConfig = MeshConfig()
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  pipeline: PipelineConfig = PipelineConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  train: TrainConfig = TrainConfig()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
