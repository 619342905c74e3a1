"""Typed configuration: one frozen dataclass per concern, composed in :class:`Config`.

Every flag of ``meshnet train`` is a field here (``--grad-accum`` is
``Config.optim.grad_accum``), so a run is reproducible from Python with
``meshnet.train.run(Config(...))``.

Each dataclass checks its own values when it is built (``__post_init__``),
so a bad value stops a run before any work, from the command line or from
Python, with a one-line :class:`~meshnet.errors.MeshnetError` that names the
field (``optim.lr=nan must be a finite number > 0``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

from meshnet.compute import check_precision, check_remat
from meshnet.errors import MeshnetError
from meshnet.mesh import AXES, DATA, check_axis_sizes
from meshnet.models.gpt import GPT_SIZES, gpt_config
from meshnet.nn_transformer import ATTENTIONS, POSITIONS
from meshnet.pipeline.schedules import SCHEDULES
from meshnet.pipeline.stages import BALANCES

_MAX_SEED = 2**63 - 1


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, note: str = "") -> None:
  """Raises unless ``value`` is an int (not a bool) ``>= minimum``."""
  if not _is_int(value) or value < minimum:
    raise MeshnetError(f"{name}={value!r} must be an integer >= {minimum}{note}")


def _check_optional_int(name: str, value: Any, minimum: int, none_means: str) -> None:
  if value is not None:
    _check_int(name, value, minimum, f" (or None {none_means})")


def _check_float(name: str, value: Any, rule: str, ok: Callable[[float], bool],
                 note: str = "") -> None:
  """Raises unless ``value`` is a finite real number for which ``ok`` holds."""
  if not (_is_number(value) and math.isfinite(value) and ok(value)):
    raise MeshnetError(f"{name}={value!r} must be a finite number {rule}{note}")


GRAD_TRANSPORTS = ("xla", "shm")

@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (one may be -1: the rest of the devices).

  An axis left at ``None`` was not given: it is 1, except ``data``, which
  takes the devices the other axes leave (unless another axis is -1). With
  every axis ``None`` the mesh is the default one, data parallelism over
  every device, which a run narrows to fewer devices when the global batch
  is too small to split over all of them
  (:func:`meshnet.defaults.resolve_defaults`); a mesh that was given is
  used as it is.

  Attributes:
    data, fsdp, stage, tensor: axis sizes (see :mod:`meshnet.mesh`), or
      ``None`` (not given).
    devices: on the CPU platform, run on this many (simulated) devices; see
      :func:`meshnet.mesh.select_devices`. ``None`` uses every device JAX has.
  """

  data: int | None = None
  fsdp: int | None = None
  stage: int | None = None
  tensor: int | None = None
  devices: int | None = None

  def __post_init__(self):
    check_axis_sizes(**{axis: size for axis in AXES
                        if (size := getattr(self, axis)) is not None})
    _check_optional_int("mesh.devices", self.devices, 1, "for every device JAX has")

  @property
  def is_default(self) -> bool:
    """No axis was given: data parallelism over every device (or fewer, to
    fit a small batch)."""
    return all(getattr(self, axis) is None for axis in AXES)

  def axes(self) -> dict[str, int]:
    """The sizes as :func:`meshnet.mesh.make_mesh` takes them: an axis not
    given is 1, ``data`` -1 (the rest) unless another axis is -1."""
    given = {axis: getattr(self, axis) for axis in AXES}
    rest = 1 if -1 in given.values() else -1
    return {axis: size if size is not None else (rest if axis == DATA else 1)
            for axis, size in given.items()}

  @classmethod
  def parse(cls, text: str, devices: int | None = None) -> "MeshConfig":
    """``"data=4,stage=2"`` -> ``MeshConfig(data=4, stage=2)``.

    A parsed mesh was given, so every axis gets its size: an absent axis is
    1, except ``data``, which takes the devices the other axes leave (-1)
    unless another axis is -1 (see :meth:`axes`). Only ``MeshConfig()``, with
    every axis ``None``, is the default mesh that a run may narrow.
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
      if name in sizes:
        raise MeshnetError(
            f"mesh axis {name} is given twice in {text!r}; give each axis once"
        )
      try:
        sizes[name] = int(value)
      except ValueError:
        raise MeshnetError(f"mesh size {value!r} for {name} is not an integer") from None
    return cls(**cls(**sizes).axes(), devices=devices)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A built-in model (``meshnet.models.build``).

  Attributes:
    name: model name (``mlp`` or ``gpt``).
    hidden: hidden layer widths (``mlp``); input and output sizes come from
      the data. ``None``: the data set's recipe, else ``(256, 128)``
      (:func:`meshnet.defaults.resolve_defaults`).
    activation: hidden activation (``mlp``); ``None``: the data set's
      recipe, else ``relu``.
    dropout: dropout rate when training (``mlp``: after each hidden
      activation; ``gpt``: after the embedding and on each residual branch).
    gpt_size: ``gpt``'s shape, a name in
      :data:`meshnet.models.gpt.GPT_SIZES` (``tiny``, ``mini``, ``small``...).
    layers, heads, width, context: ``gpt``'s blocks, attention heads, model
      width and longest sequence; ``None`` takes ``gpt_size``'s.
    positions: ``gpt``'s positions, ``learned`` or ``rotary``.
    tie_embeddings: ``gpt``'s head is its token table (GPT-2) rather than a
      matrix of its own.
    attention: ``gpt``'s attention, ``plain`` or ``fused``
      (``jax.nn.dot_product_attention``: cuDNN flash attention on NVIDIA
      GPUs under bf16).
  """

  name: str = "mlp"
  hidden: tuple[int, ...] | None = None
  activation: str | None = None
  dropout: float = 0.0
  gpt_size: str = "tiny"
  layers: int | None = None
  heads: int | None = None
  width: int | None = None
  context: int | None = None
  positions: str = "learned"
  tie_embeddings: bool = False
  attention: str = "plain"

  def __post_init__(self):
    hidden = self.hidden
    if hidden is not None and (not isinstance(hidden, (tuple, list)) or not all(
        _is_int(w) and w >= 1 for w in hidden)):
      raise MeshnetError(
          f"model.hidden={hidden!r} must be widths >= 1, e.g. (256, 128) "
          "(--hidden 256,128)"
      )
    _check_float("model.dropout", self.dropout, "in [0, 1)", lambda v: 0 <= v < 1)
    for name in ("layers", "heads", "width", "context"):
      _check_optional_int(f"model.{name}", getattr(self, name), 1,
                          "for model.gpt_size's value")
    if self.gpt_size not in GPT_SIZES:
      raise MeshnetError(f"model.gpt_size={self.gpt_size!r} must be one of "
                         f"{', '.join(GPT_SIZES)} (--gpt-size)")
    if self.positions not in POSITIONS:
      raise MeshnetError(f"model.positions={self.positions!r} must be one of "
                         f"{', '.join(POSITIONS)} (--positions)")
    if self.attention not in ATTENTIONS:
      raise MeshnetError(f"model.attention={self.attention!r} must be one of "
                         f"{', '.join(ATTENTIONS)} (--attention)")
    if self.name == "gpt":  # the shape holds together (heads divide the width...)
      self.gpt_config()

  def gpt_config(self, **options: Any):
    """The :class:`~meshnet.models.gpt.GPTConfig` these fields describe, with
    ``options`` (e.g. ``vocab``, ``remat``) added."""
    return gpt_config(self.gpt_size, layers=self.layers, heads=self.heads,
                      width=self.width, context=self.context, positions=self.positions,
                      tie_embeddings=self.tie_embeddings, dropout=self.dropout,
                      attention=self.attention, **options)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Attributes:
    dataset: ``xor``, ``digits``, ``mnist`` or ``text`` (byte-level
      next-token windows, :func:`meshnet.data.text`; their length is the
      model's context, :func:`meshnet.train.text_context`).
    data_dir: files for file-based data sets: mnist's directory (``None``:
      :func:`meshnet.data.default_data_dir`, where ``meshnet data fetch`` puts
      them); text's UTF-8 file or folder of them (``None``: the embedded
      corpus, :func:`meshnet.corpus.embedded_corpus`).
    batch_size: global batch size, over all devices and processes.
      ``None``: the smaller of 128 and the training set, rounded down to a
      multiple of what the mesh splits it into
      (:func:`meshnet.defaults.resolve_defaults`).
  """

  dataset: str = "digits"
  data_dir: str | None = None
  batch_size: int | None = None

  def __post_init__(self):
    _check_optional_int("data.batch_size", self.batch_size, 1,
                        "to fit the data set and the mesh")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer, learning-rate schedule, clipping and accumulation.

  Attributes:
    optimizer: ``sgd``, ``momentum``, ``adam`` or ``adamw``.
    lr: peak learning rate; ``None``: the data set's recipe, else 1e-3.
    weight_decay: for ``sgd``, ``momentum`` and ``adam``, the L2 term
      ``weight_decay * param`` added to the (clipped) gradient before the
      optimizer, as PyTorch's ``weight_decay``; for ``adamw``, decoupled
      decay (``optax.adamw``, PyTorch's ``AdamW``).
    momentum: momentum coefficient for ``momentum``.
    lr_schedule: ``constant`` or ``warmup_cosine`` (linear warmup over
      ``warmup_steps``, then cosine decay to 0 at the last step).
    warmup_steps: warmup length for ``warmup_cosine``.
    clip_norm: clip the gradient's global norm to this (``None``: no clipping).
    grad_accum: accumulate gradients over this many micro-steps per step.
    deterministic: average gradients over ``data`` in a fixed order, so runs
      are bit-identical however devices are spread over processes.
    grad_transport: how processes average gradients: ``xla`` (the
      compiled all-reduce: gloo on CPU, NCCL/ICI on accelerators) or ``shm``
      (CPU processes on one host, one device each: through shared memory,
      summed in process order, see :mod:`meshnet.shm`).
  """

  optimizer: str = "adam"
  lr: float | None = None
  weight_decay: float = 0.0
  momentum: float = 0.9
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  clip_norm: float | None = None
  grad_accum: int = 1
  deterministic: bool = False
  grad_transport: str = "xla"

  def __post_init__(self):
    if self.lr is not None:
      _check_float("optim.lr", self.lr, "> 0", lambda v: v > 0,
                   " (or None for the data set's default)")
    _check_float("optim.weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)
    _check_float("optim.momentum", self.momentum, "in [0, 1)", lambda v: 0 <= v < 1)
    _check_int("optim.warmup_steps", self.warmup_steps, 0)
    if self.clip_norm is not None:
      _check_float("optim.clip_norm", self.clip_norm, "> 0", lambda v: v > 0,
                   " (or None, --clip-norm off, to not clip)")
    _check_int("optim.grad_accum", self.grad_accum, 1)
    if self.grad_transport not in GRAD_TRANSPORTS:
      raise MeshnetError(f"optim.grad_transport={self.grad_transport!r} must be one of "
                         f"{', '.join(GRAD_TRANSPORTS)} (--grad-transport)")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Pipeline parallelism, used when the mesh's ``stage`` axis is > 1.

  Attributes:
    schedule: ``gpipe``, ``1f1b``, ``interleaved`` or ``zb``.
    microbatches: microbatches per data replica per step (default: the
      number of stages). With gradient accumulation the pipeline runs
      ``microbatches * grad_accum`` microbatches: the same mean gradient.
    virtual_stages: chunks per device for ``interleaved``.
    balance: what the cut of the layers into stages balances: ``params``
      (parameter count: equal memory per stage) or ``flops`` (each layer's
      forward FLOPs: equal compute per stage); see
      :func:`meshnet.pipeline.make_pipeline`.
    remat: the former switch for ``train.remat="full"`` (kept for configs
      written before the policy): ``True`` sets ``train.remat`` to ``full``
      when it is ``none``. :class:`Config` keeps the two in step: this is
      ``True`` whenever ``train.remat`` is not ``none``.
  """

  schedule: str = "1f1b"
  microbatches: int | None = None
  virtual_stages: int = 1
  remat: bool = False
  balance: str = "params"

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise MeshnetError(
          f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
      )
    _check_optional_int("pipeline.microbatches", self.microbatches, 1,
                        "for one per stage")
    _check_int("pipeline.virtual_stages", self.virtual_stages, 1)
    check_remat(self.remat)
    if self.balance not in BALANCES:
      raise MeshnetError(f"pipeline.balance={self.balance!r} must be one of "
                         f"{', '.join(BALANCES)} (--stage-balance)")


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
    allow_data_change: with ``resume``, continue even though the training or
      test data differ from those the checkpoint was saved with (each
      checkpoint keeps a fingerprint of them, :func:`meshnet.data.fingerprint`);
      without it such a resume is refused.
  """

  dir: str | None = None
  every: int = 0
  keep: int = 3
  resume: bool = False
  overwrite: bool = False
  allow_data_change: bool = False

  def __post_init__(self):
    _check_int("checkpoint.every", self.every, 0,
               " (0: save only at the end and on SIGTERM/SIGINT)")
    _check_int("checkpoint.keep", self.keep, 1)
    if self.resume and not self.dir:
      raise MeshnetError(
          "checkpoint.resume needs checkpoint.dir to resume from; pass "
          "--checkpoint-dir DIR with --resume"
      )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop.

  Attributes:
    steps: optimizer steps to run; ``None`` runs ``epochs`` epochs.
    epochs: epochs to run when ``steps`` is ``None``; ``None``: the data
      set's recipe, else 20.
    seed: seed for initialisation, shuffling and dropout.
    eval_every: evaluate on the test split every this many steps and at the
      end; 0 turns evaluation off.
    log_every: log (progress, metrics file) every this many steps.
    metrics_file: JSON-lines file for metrics (``None``: none written).
    eval_batch_size: examples per evaluation batch.
    progress: draw the progress bars (training, evaluation).
    tensorboard: directory for TensorBoard event files (``None``: none
      written); see :mod:`meshnet.tensorboard`.
    step_timeout: seconds a step may take before a run of several processes
      ends (a peer that hangs; :class:`meshnet.faults.StepWatchdog`);
      ``None``: max(60 s, 20x the median step time measured after warm-up).
      The first steps get a fixed allowance instead.
    profile_steps: ``(A, B)``: write a ``jax.profiler`` trace of the steps
      after the first ``A``, up to ``B`` (``0 <= A < B <= steps``; ``(3, 5)``
      traces steps 4 and 5 as the progress line counts them) into
      ``profile_dir``, one per process (:mod:`meshnet.profiling`); read it with
      ``meshnet profile DIR``. ``None``: no trace. A directory that holds a
      trace is refused unless ``checkpoint.overwrite`` (or a resumed run
      traces again).
    profile_dir: the directory for ``profile_steps``' traces.
    precision: ``fp32`` or ``bf16``: the forward's compute dtype (bf16:
      float32 master parameters and optimizer state, bfloat16 matmuls and
      activations, float32 loss and gradients; :mod:`meshnet.compute`).
      With a pipeline the activations between stages are bfloat16 too.
    peak_flops: peak FLOP/s of one device for the ``mfu`` a GPT's metrics
      carry; ``None``: :data:`meshnet.flops.PEAK_FLOPS` for the device
      (dense bf16), and no ``mfu`` on a CPU or a device not in the table.
    remat: ``none``, ``layer`` or ``full``: what the backward recomputes
      instead of keeping (``jax.checkpoint``; :mod:`meshnet.compute`), with
      or without a pipeline. ``True``/``False`` mean ``full``/``none``.
    show_sharding: print, before training, a table of every parameter: its
      path, shape, dtype, ``PartitionSpec`` and bytes per device
      (:func:`meshnet.runcost.format_param_table`).
  """

  steps: int | None = None
  epochs: int | None = None
  seed: int = 0
  eval_every: int = 100
  log_every: int = 10
  metrics_file: str | None = None
  eval_batch_size: int = 1024
  progress: bool = True
  tensorboard: str | None = None
  step_timeout: float | None = None
  profile_steps: tuple[int, int] | None = None
  profile_dir: str | None = None
  precision: str = "fp32"
  remat: str = "none"
  peak_flops: float | None = None
  show_sharding: bool = False

  def __post_init__(self):
    check_precision(self.precision)
    if self.peak_flops is not None:
      _check_float("train.peak_flops", self.peak_flops, "> 0", lambda v: v > 0,
                   " (FLOP/s per device, e.g. 989e12; or None for the device table)")
    object.__setattr__(self, "remat", check_remat(self.remat))
    _check_optional_int("train.steps", self.steps, 1, "to run train.epochs epochs")
    _check_optional_int("train.epochs", self.epochs, 1, "for the data set's default")
    if not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED:
      raise MeshnetError(f"train.seed={self.seed!r} must be an integer in [0, 2**63)")
    _check_int("train.eval_every", self.eval_every, 0, " (0 turns evaluation off)")
    _check_int("train.log_every", self.log_every, 1)
    _check_int("train.eval_batch_size", self.eval_batch_size, 1)
    if self.step_timeout is not None:
      _check_float("train.step_timeout", self.step_timeout, "> 0", lambda v: v > 0,
                   " (seconds; or None, --step-timeout auto, for the measured default)")
    self._check_profile()

  def _check_profile(self) -> None:
    steps, directory = self.profile_steps, self.profile_dir
    if steps is None and directory is None:
      return
    if steps is None or not directory:
      raise MeshnetError(
          f"train.profile_steps={steps!r} and train.profile_dir={directory!r} go together; "
          "give both (--profile-steps A:B DIR) or neither")
    if (not isinstance(steps, (tuple, list)) or len(steps) != 2
        or not all(_is_int(s) for s in steps)):
      raise MeshnetError(f"train.profile_steps={steps!r} must be two integers (A, B) "
                         "(--profile-steps A:B DIR)")
    first, last = steps
    if first < 0 or first >= last:
      raise MeshnetError(
          f"train.profile_steps={steps!r} (--profile-steps {first}:{last}) must have "
          f"0 <= A < B: it traces the steps after "
          f"the first A, up to B (e.g. --profile-steps 3:5 traces steps 4 and 5)")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a training run needs.

  Fields left at ``None`` were not given; :func:`meshnet.train.run` fills
  them for the data set and the devices
  (:func:`meshnet.defaults.resolve_defaults`) and says which it adjusted.
  """

  mesh: MeshConfig = MeshConfig()
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  pipeline: PipelineConfig = PipelineConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    # One policy, two fields: pipeline.remat (a bool, older configs) follows
    # train.remat, and True there asks for "full".
    remat = self.train.remat
    legacy = check_remat(self.pipeline.remat)
    if legacy != "none" and remat == "none":
      remat = legacy
      object.__setattr__(self, "train", dataclasses.replace(self.train, remat=remat))
    if self.pipeline.remat is not (remat != "none"):
      object.__setattr__(self, "pipeline",
                         dataclasses.replace(self.pipeline, remat=remat != "none"))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
