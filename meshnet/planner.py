"""``meshnet plan``: what a training step will cost, before it runs.

``plan(PlanConfig(...)) -> Plan`` is a pure function of shapes and figures:
per device, the bytes of the parameters, gradients, optimizer state and
activations, and XLA's argument, output and temporary buffers of the
compiled step; per step, the bytes each mesh axis sends, the compute and
communication time, the pipeline bubble and the step time; and the step
time and speedup projected for 1, 2, 4, ... devices. :func:`compiled_memory`
compiles the real train step (when the mesh fits this process's devices)
for XLA's own numbers beside the plan's; :func:`format_plan` prints it all.

The model of the step is meshnet's own (:mod:`meshnet.step`,
:mod:`meshnet.pipeline.executor`):

* **State** (replicated on every device, pipelined or not): the step
  counter, the parameters, ``optimizer.init(params)`` (shapes from
  ``jax.eval_shape``), the rng key. The compiled step's arguments are the
  state and the device's share of the batch; its outputs the new state and
  three scalars (loss, gradient norm, finite flag), plus one 8-byte pointer
  per output leaf (the output tuple XLA returns).
* **Unpipelined temporaries**: the forward keeps each dense layer's output
  and, after a nonlinearity, its activation; the backward makes each
  layer's weight gradient (kept until packed) and the cotangents of the
  layer it is in; the gradient bucket (all gradients and the loss, one flat
  buffer) is written from the loss on; then the all-reduce's result and the
  unpacked gradient the update reads. The estimate is the peak of these
  buffers' live bytes, run in that order (a liveness simulation, not a fit).
* **Pipelined temporaries**: the stage's parameters and gradient as one
  padded vector each (``[v, N]``), the activation, cotangent and residual
  ring buffers (their slots from :mod:`meshnet.pipeline.plan`, residual
  words from :mod:`meshnet.pipeline.residuals`), the padded input, what is
  in flight between devices, and one op's working set; or, after the
  rounds, the all-gathered ``[S, v, N]`` gradient and its unstacked tree:
  whichever is larger.
* **Time**: matmul FLOPs (``2 x in x out`` per example per layer forward,
  the same again for the weight gradient and for the input gradient except
  the first layer's) over the device's FLOP/s, elementwise traffic
  (gradient packing, norm, update, finite check) over its memory
  bandwidth; a pipeline's rounds last as long as their busiest device
  (:mod:`meshnet.pipeline.rounds` timed with each stage's own cost), plus a
  ``ppermute`` per round; collectives cost ``latency + bus_bytes /
  bandwidth`` (:mod:`meshnet.hardware`) and do not overlap compute (the
  step exchanges the gradient after the backward).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meshnet import collectives
from meshnet.config import Config, MeshConfig, OptimConfig
from meshnet.errors import MeshnetError
from meshnet.hardware import (
    ALL_GATHER, ALL_REDUCE, PPERMUTE, DeviceSpec, bus_factor,
)
from meshnet.mesh import AXES, DATA, FSDP, STAGE, TENSOR

F32 = 4  # bytes of a float32
POINTER = 8  # bytes per output leaf in the tuple XLA returns
METRICS_BYTES = 4 + 4 + 1  # loss, grad_norm (float32), state_finite (bool)
NONLINEAR = ("relu", "gelu", "tanh", "sigmoid", "silu")

# Shapes of the built-in data sets: (input features, outputs, loss, training examples).
DATA_SHAPES: dict[str, tuple[int, int, str, int]] = {
    "xor": (2, 1, "mse", 4),
    "digits": (64, 10, "cross_entropy", 1438),
    "mnist": (784, 10, "cross_entropy", 60000),
}


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """What to plan: a model, a mesh, a batch, a schedule and a device.

  Attributes:
    widths: the MLP's layer widths, input first (``784, 512, 10``); ``None``
      when only ``num_params`` is known.
    num_params: the parameter count when ``widths`` is ``None`` (one float32
      vector; no activations or pipeline can be planned then).
    activation: hidden activation (``linear`` keeps no separate activation).
    loss: ``cross_entropy`` (int labels ``[B]``) or ``mse`` (targets ``[B, O]``).
    batch_size: global batch per step.
    mesh: axis sizes (every axis a positive int).
    microbatches: pipeline microbatches per data replica (``None``: stages).
    grad_accum: micro-steps per step (a pipeline runs ``microbatches x
      grad_accum`` microbatches, as ``meshnet train`` does).
    schedule, virtual_stages, remat: the pipeline's (``meshnet train``'s flags).
    optim: the optimizer (its state's shapes count).
    deterministic: average gradients in a fixed order (``axis_size`` times
      the traffic: an all-reduce of every device's row).
    device: what a device and its links cost.
    max_devices: the projection's largest device count (powers of two up to it).
    label: the model's name in the printout.
  """

  widths: tuple[int, ...] | None
  batch_size: int
  device: DeviceSpec
  mesh: MeshConfig = MeshConfig(data=1, fsdp=1, stage=1, tensor=1)
  num_params: int | None = None
  activation: str = "relu"
  loss: str = "cross_entropy"
  microbatches: int | None = None
  grad_accum: int = 1
  schedule: str = "1f1b"
  virtual_stages: int = 1
  remat: bool = False
  optim: OptimConfig = OptimConfig()
  deterministic: bool = False
  max_devices: int = 8
  label: str = "mlp"

  def __post_init__(self):
    if self.widths is None and self.num_params is None:
      raise MeshnetError("a plan needs the model's layer widths (--layers W0,W1,...) or its "
                         "parameter count (--params N)")
    if self.widths is not None and (len(self.widths) < 2 or min(self.widths) < 1):
      raise MeshnetError(f"layer widths {','.join(map(str, self.widths))} need an input and "
                         "an output width, all >= 1, e.g. --layers 784,1024,10")
    if self.num_params is not None and self.num_params < 1:
      raise MeshnetError(f"--params {self.num_params} must be a parameter count >= 1")
    if self.batch_size < 1:
      raise MeshnetError(f"batch size {self.batch_size} must be >= 1")
    if self.max_devices < 1:
      raise MeshnetError(f"--max-devices {self.max_devices} must be >= 1")
    for axis in (FSDP, TENSOR):
      if getattr(self.mesh, axis) > 1:
        raise MeshnetError(
            f"mesh axis {axis}={getattr(self.mesh, axis)} is not runnable yet (the train "
            f"step has data and stage parallelism only); plan with {axis}=1")
    if self.stages > 1 and self.widths is None:
      raise MeshnetError(f"a pipeline (stage={self.stages}) needs the layer widths to cut "
                         "into stages; give --layers W0,W1,... instead of --params")
    if self.stages > 1 and self.stages * self.virtual_stages > len(self.widths) - 1:
      raise MeshnetError(
          f"stage={self.stages} x virtual_stages={self.virtual_stages} stages but the model "
          f"has {len(self.widths) - 1} layers; use fewer stages or more layers")
    parts = self.parts
    if self.batch_size % (self.mesh.data * parts):
      what = "microbatches" if self.stages > 1 else "grad_accum"
      raise MeshnetError(
          f"global batch size {self.batch_size} is not divisible by data={self.mesh.data} "
          f"x {what}={parts} = {self.mesh.data * parts}; use a batch size that is a "
          f"multiple of {self.mesh.data * parts}")

  @property
  def stages(self) -> int:
    return self.mesh.stage

  @property
  def parts(self) -> int:
    """Micro-steps each data replica's batch is cut into."""
    if self.stages > 1:
      return (self.microbatches or self.stages) * self.grad_accum
    return self.grad_accum

  @property
  def devices(self) -> int:
    return math.prod(getattr(self.mesh, axis) for axis in AXES)

  def mesh_text(self) -> str:
    return ",".join(f"{axis}={getattr(self.mesh, axis)}" for axis in AXES
                    if getattr(self.mesh, axis) > 1 or axis == DATA)


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device. ``arguments``, ``outputs`` and ``temporaries`` are
  what XLA's ``memory_analysis()`` of the compiled step reports
  (``argument_size_in_bytes``, ``output_size_in_bytes``,
  ``temp_size_in_bytes``); ``temporaries`` is ``None`` when the model's
  layers are unknown."""

  params: int
  grads: int
  optimizer: int
  activations: int | None
  arguments: int
  outputs: int
  temporaries: int | None


@dataclasses.dataclass(frozen=True)
class Traffic:
  """One mesh axis's collectives in one step, per device.

  Attributes:
    axis: the mesh axis.
    bytes_sent: bytes one device sends (bus bytes).
    calls: collective calls, by name.
    seconds: their time (latency + bytes / bandwidth each).
  """

  axis: str
  bytes_sent: int
  calls: dict[str, int]
  seconds: float


@dataclasses.dataclass(frozen=True)
class StepTime:
  """One step on one mesh.

  Attributes:
    devices: devices in the mesh.
    mesh: axis sizes, e.g. ``data=2,stage=2``.
    local_batch: examples per device (per data replica) per step.
    flops: matmul FLOPs per device per step.
    compute_s: seconds of compute on the critical path, bubble included.
    comm_s: seconds of collectives (not overlapped with compute).
    bubble: idle fraction of a pipeline's rounds (0 unpipelined).
    step_s: ``compute_s + comm_s``.
    samples_per_s: global batch / ``step_s``.
    speedup: against one device (filled in the projection).
    temporaries: XLA temporary bytes per device (the plan's estimate).
  """

  devices: int
  mesh: str
  local_batch: int
  flops: float
  compute_s: float
  comm_s: float
  bubble: float
  step_s: float
  samples_per_s: float
  speedup: float | None = None
  temporaries: int | None = None


@dataclasses.dataclass(frozen=True)
class XlaMemory:
  """XLA's ``memory_analysis()`` of the compiled train step, per device."""

  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  platform: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """What :func:`plan` returns. See the module docstring for the model.

  Attributes:
    config: what was planned.
    num_params: parameters of the model.
    memory: bytes per device.
    traffic: per mesh axis with a collective (size > 1).
    step: the step on ``config.mesh``.
    scaling: the same global batch on 1, 2, 4, ... devices.
    pipeline: for a pipeline: stages, layers per stage, rounds, slots...
    notes: what the plan does not model, one line each.
    xla: XLA's numbers of the compiled step, when compiled
      (:func:`compiled_memory`).
  """

  config: PlanConfig
  num_params: int
  memory: Memory
  traffic: tuple[Traffic, ...]
  step: StepTime
  scaling: tuple[StepTime, ...]
  pipeline: dict[str, Any] | None = None
  notes: tuple[str, ...] = ()
  xla: XlaMemory | None = None

  def with_xla(self, xla: XlaMemory | None) -> "Plan":
    return dataclasses.replace(self, xla=xla)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready numbers (bytes as ints, times in seconds)."""
    c = self.config
    d = self.device_dict()
    out = {
        "model": {"label": c.label, "widths": list(c.widths) if c.widths else None,
                  "params": self.num_params, "activation": c.activation, "loss": c.loss},
        "mesh": {axis: getattr(c.mesh, axis) for axis in AXES},
        "batch_size": c.batch_size, "grad_accum": c.grad_accum,
        "optimizer": c.optim.optimizer,
        "pipeline": self.pipeline,
        "device": d,
        "memory": dataclasses.asdict(self.memory),
        "traffic": {t.axis: {"bytes_sent": t.bytes_sent, "calls": t.calls,
                             "seconds": t.seconds} for t in self.traffic},
        "step": dataclasses.asdict(self.step),
        "scaling": [dataclasses.asdict(row) for row in self.scaling],
        "xla": dataclasses.asdict(self.xla) if self.xla else None,
        "notes": list(self.notes),
    }
    return _finite(out)

  def device_dict(self) -> dict[str, Any]:
    dev = self.config.device
    return {"kind": dev.kind, "flops": dev.flops, "memory_bandwidth": dev.memory_bandwidth,
            "memory_bytes": dev.memory_bytes, "source": dev.source,
            "flops_by_rows": [list(pair) for pair in dev.flops_by_rows],
            "link": {name: {"latency_s": cost.latency_s, "bandwidth_Bps": cost.bandwidth_Bps}
                     for name, cost in dev.link.costs.items()},
            "link_source": dev.link.source}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)


def _finite(value: Any) -> Any:
  """``value`` with non-finite floats as ``None`` (strict JSON)."""
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


# --- shapes ------------------------------------------------------------------------


def _model(config: PlanConfig):
  from meshnet.models import mlp
  return mlp(list(config.widths), activation=config.activation)


def _param_shapes(config: PlanConfig) -> Any:
  """The parameter tree's shapes (``jax.ShapeDtypeStruct`` leaves)."""
  if config.widths is None:
    return [{"w": jax.ShapeDtypeStruct((config.num_params,), jnp.float32)}]
  return jax.eval_shape(_model(config).init, jax.random.key(0))


def _optimizer(optim: OptimConfig):
  from meshnet.optim import make_optimizer
  return make_optimizer(optim, max(2, optim.warmup_steps + 1))


def _nbytes(tree: Any) -> int:
  return sum(int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree))


def _layers(widths: Sequence[int]) -> list[tuple[int, int]]:
  return list(zip(widths[:-1], widths[1:]))


def _forward_flops(widths: Sequence[int], rows: int) -> float:
  return 2.0 * rows * sum(i * o for i, o in _layers(widths))


def _backward_flops(widths: Sequence[int], rows: int, input_grad: bool) -> float:
  """Weight gradients of every layer and input gradients of every layer but
  the first (unless ``input_grad``): what autodiff runs, XLA's dead code
  removed."""
  forward = _forward_flops(widths, rows)
  first = 2.0 * rows * widths[0] * widths[1]
  return 2.0 * forward - (0.0 if input_grad else first)


# --- memory: the compiled step's buffers --------------------------------------------


class _Heap:
  """Live bytes of named buffers; ``peak`` is the most ever live."""

  def __init__(self):
    self.live: dict[str, int] = {}
    self.peak = 0

  def alloc(self, name: str, nbytes: int) -> None:
    self.live[name] = int(nbytes)
    self.peak = max(self.peak, sum(self.live.values()))

  def free(self, *names: str) -> None:
    for name in names:
      self.live.pop(name, None)


def _kept_activations(widths: Sequence[int], rows: int, activation: str) -> int:
  """Bytes the forward keeps for the backward: every layer's output, and
  the activation of every hidden layer after a nonlinearity."""
  layers = _layers(widths)
  kept = sum(o for _, o in layers)
  if activation in NONLINEAR:
    kept += sum(o for _, o in layers[:-1])
  return F32 * rows * kept


def _forward_pass(heap: _Heap, widths: Sequence[int], rows: int, activation: str) -> None:
  """Simulates the forward of the dense layers at ``rows`` examples on
  ``heap``: each layer's output, and its activation after a nonlinearity,
  stay live for the backward; the loss keeps two ``rows x outputs`` terms."""
  layers = _layers(widths)
  for l, (_, o) in enumerate(layers):
    heap.alloc(f"z{l}", F32 * rows * o)
    if l < len(layers) - 1 and activation in NONLINEAR:
      heap.alloc(f"h{l}", F32 * rows * o)
  heap.alloc("loss", 2 * F32 * rows * layers[-1][1])


def _backward_pass(heap: _Heap, widths: Sequence[int], rows: int) -> list[str]:
  """Simulates the backward after :func:`_forward_pass`: per layer, last
  first, its weight gradient (live until packed), the cotangent of its
  input and, through the activation, of the layer below's output, freeing
  what the forward kept once read. Returns the weight gradients' names."""
  layers = _layers(widths)
  L = len(layers)
  heap.alloc(f"g{L - 1}", F32 * rows * layers[-1][1])
  heap.free("loss", f"z{L - 1}")
  grads = []
  for l in range(L - 1, -1, -1):
    i, o = layers[l]
    heap.alloc(f"dw{l}", F32 * (i * o + o))
    grads.append(f"dw{l}")
    if l == 0:  # the input's cotangent is not needed
      heap.free("g0")
      break
    heap.free(f"h{l - 1}")
    heap.alloc(f"dh{l - 1}", F32 * rows * i)
    heap.free(f"g{l}")
    heap.alloc(f"g{l - 1}", F32 * rows * i)
    heap.free(f"dh{l - 1}", f"z{l - 1}")
  return grads


def _plain_temporaries(config: PlanConfig, grad_bytes: int, local_batch: int) -> int:
  """Peak temporary bytes of the unpipelined step (see the module docstring)."""
  widths, accum = config.widths, config.grad_accum
  rows = local_batch // accum
  n = config.mesh.data
  bucket = grad_bytes + F32  # the gradients and the loss, packed
  heap = _Heap()
  if accum > 1:
    heap.alloc("grad_sum", grad_bytes)
    heap.alloc("x_micro", F32 * rows * (widths[0] + 1))
  _forward_pass(heap, widths, rows, config.activation)
  if accum == 1:
    heap.alloc("bucket", bucket)
  grads = _backward_pass(heap, widths, rows)
  heap.free(*grads)  # written into the bucket (or added to grad_sum) in place
  if accum > 1:
    heap.free("x_micro")
    heap.alloc("bucket", bucket)
    heap.free("grad_sum")
  if config.deterministic and n > 1:
    heap.alloc("rows", n * bucket)
    heap.free("bucket")
    heap.alloc("reduced", n * bucket)
    heap.free("rows")
  else:
    heap.alloc("reduced", bucket)
    heap.free("bucket")
  heap.alloc("unpacked", grad_bytes)  # slices of the reduced bucket the update reads
  return heap.peak


def _abstract_pipeline(config: PlanConfig):
  """The executor's :class:`~meshnet.pipeline.Pipeline` for this plan, on an
  abstract mesh (no devices needed): bounds, widths, rounds."""
  from jax.sharding import AbstractMesh

  from meshnet.pipeline import make_pipeline
  mesh = AbstractMesh(tuple(getattr(config.mesh, a) for a in AXES), AXES)
  return make_pipeline(_model(config), mesh, (config.widths[0],), schedule=config.schedule,
                       microbatches=config.parts, virtual_stages=config.virtual_stages,
                       remat=config.remat)


def _residual_words(pipe, config: PlanConfig, mb: int) -> dict[int, int]:
  """uint32 words a forward of each stage group keeps per microbatch (the
  executor's residual layout; with remat, the stage input ``mb x D``)."""
  from meshnet import losses
  from meshnet.pipeline import residuals

  K, N, D = pipe.num_virtual_stages, pipe.param_width, pipe.activation_width
  if config.remat:
    return {k: mb * D for k in set(pipe.stage_groups)}
  objective = losses.objective(config.loss)
  M = pipe.schedule.num_microbatches
  y = (jax.ShapeDtypeStruct((mb,), jnp.int32) if config.loss == "cross_entropy"
       else jax.ShapeDtypeStruct((mb, config.widths[-1]), jnp.float32))
  words = {}
  for k in sorted(set(pipe.stage_groups)):
    def fn(flat, x, y, keys, k=k):
      out = pipe._stage_forward(k, flat, x, None, True)  # noqa: SLF001 (the executor's own)
      return jnp.mean(objective.loss(out, y)) / M if k == K - 1 else out.astype(jnp.float32)

    lay = residuals.layout(fn, jax.ShapeDtypeStruct((N,), jnp.float32),
                           jax.ShapeDtypeStruct((mb, D), jnp.float32), y,
                           jax.ShapeDtypeStruct((), jnp.uint32))
    words[k] = lay.size
  return words


@dataclasses.dataclass(frozen=True)
class _PipelineShape:
  """What the executor allocates and runs for one plan."""

  pipe: Any
  mb: int
  slots: tuple[int, int, int]  # activation, cotangent, residual slots per chunk
  residual_words: dict[int, int]

  @property
  def S(self) -> int:
    return self.pipe.schedule.num_stages

  @property
  def v(self) -> int:
    return self.pipe.schedule.virtual_stages

  @property
  def N(self) -> int:
    return self.pipe.param_width

  @property
  def D(self) -> int:
    return self.pipe.activation_width

  @property
  def R(self) -> int:
    return max(self.residual_words.values())

  def stage_widths(self, widths: Sequence[int], k: int) -> list[int]:
    b = self.pipe.bounds
    return list(widths[b[k]:b[k + 1] + 1])

  def buffers(self) -> int:
    """The three ring buffers (each with its trash slot), per device."""
    act, cot, res = self.slots
    return F32 * self.v * ((act + 1) * self.mb * self.D + (cot + 1) * self.mb * self.D
                           + (res + 1) * self.R)


def _pipeline_shape(config: PlanConfig, local_batch: int) -> _PipelineShape:
  from meshnet.pipeline import plan as buffer_plan

  pipe = _abstract_pipeline(config)
  mb = local_batch // config.parts
  buffers = buffer_plan.plan(pipe.rounds, list(range(pipe.num_virtual_stages)))
  return _PipelineShape(pipe, mb, (buffers.num_act, buffers.num_cot, buffers.num_res),
                        _residual_words(pipe, config, mb))


def _pipeline_phases(config: PlanConfig, shape: _PipelineShape, grad_bytes: int,
                     largest_leaf: int, local_batch: int) -> dict[str, int]:
  """Peak temporary bytes of the pipelined step's two phases: the rounds
  (the scan over the schedule) and the gather (after it)."""
  S, v, N, D, mb = shape.S, shape.v, shape.N, shape.D, shape.mb
  sizes = shape.pipe._sizes  # noqa: SLF001 (the executor's stage sizes)
  # One op: the stage's weights as leaves (a copy), its flat gradient (or
  # the idle branch's zeros), its residuals unpacked, a cotangent in and out.
  op = max(F32 * (sizes[k] + N + shape.residual_words[g] + 2 * mb * D)
           for k, g in enumerate(shape.pipe.stage_groups))
  padded_input = F32 * local_batch * D if config.widths[0] != D else 0
  rounds = (F32 * 2 * v * N  # the stage's parameters, and the gradient accumulated
            + shape.buffers()  # activation, cotangent and residual ring buffers
            + F32 * 2 * mb * D  # received last round, stored this round
            + padded_input + op)
  # The [S, v, N] gradient gathered over stage, unstacked into the model's
  # tree, and one leaf's update before it is written into the parameters.
  gather = F32 * S * v * N + grad_bytes + largest_leaf
  return {"rounds": rounds, "gather": gather}


# --- time ---------------------------------------------------------------------------


def _elementwise_bytes(param_bytes: int, opt_bytes: int) -> int:
  """Bytes the step's elementwise work reads and writes: packing and
  unpacking the gradient (4x), its norm (1x), the update (reads parameters,
  gradient and state, writes parameters and state) and the finite check
  (reads parameters and state)."""
  return 4 * param_bytes + param_bytes + (3 * param_bytes + 2 * opt_bytes) \
      + (param_bytes + opt_bytes)


def _data_traffic(config: PlanConfig, leaves: list[tuple[tuple[int, ...], Any]]
                  ) -> tuple[int, dict[str, int], float]:
  """The gradient exchange over ``data``: ``(bus bytes, calls, seconds)``."""
  n = config.mesh.data
  if n <= 1:
    return 0, {}, 0.0
  link = config.device.link
  buckets = collectives.plan_buckets(leaves, collectives.DEFAULT_BUCKET_BYTES)
  sent, seconds = 0.0, 0.0
  for bucket in buckets:
    nbytes = sum(int(np.prod(leaves[i][0], dtype=np.int64)) * np.dtype(leaves[i][1]).itemsize
                 for i in bucket)
    if config.deterministic:
      nbytes *= n
    sent += bus_factor(ALL_REDUCE, n) * nbytes
    seconds += link.time(ALL_REDUCE, nbytes, n)
  return int(round(sent)), {ALL_REDUCE: len(buckets)}, seconds


def _plain_step(config: PlanConfig, param_bytes: int, opt_bytes: int, num_params: int,
                leaves: list) -> tuple[StepTime, list[Traffic]]:
  dev = config.device
  local = config.batch_size // config.mesh.data
  rows = local // config.grad_accum
  if config.widths is not None:
    flops = config.grad_accum * (_forward_flops(config.widths, rows)
                                 + _backward_flops(config.widths, rows, False))
  else:
    flops = 6.0 * num_params * local
  compute = (flops / dev.rate(rows)
             + _elementwise_bytes(param_bytes, opt_bytes) / dev.memory_bandwidth)
  sent, calls, seconds = _data_traffic(config, [((), jnp.float32)] + leaves)
  traffic = [Traffic(DATA, sent, calls, seconds)] if calls else []
  step = _step_time(config, local, flops, compute, seconds, 0.0)
  return step, traffic


def _pipeline_step(config: PlanConfig, shape: _PipelineShape, param_bytes: int,
                   opt_bytes: int) -> tuple[StepTime, list[Traffic], float]:
  """The pipelined step; also returns the lockstep rounds' bubble."""
  dev, widths = config.device, config.widths
  pipe, mb, S, v, N, D = shape.pipe, shape.mb, shape.S, shape.v, shape.N, shape.D
  split = pipe.schedule.split_backward
  groups = pipe.stage_groups
  rate = dev.rate(mb)
  cost: dict[tuple[str, int], float] = {}  # (op kind, virtual stage) -> seconds
  for k in range(pipe.num_virtual_stages):
    w = shape.stage_widths(widths, k)
    fwd = _forward_flops(w, mb)
    weight = fwd
    input_grad = fwd - (2.0 * mb * w[0] * w[1] if k == 0 and groups.count(0) == 1 else 0.0)
    recompute = fwd if config.remat else 0.0
    cost[("F", k)] = fwd / rate
    if split:
      cost[("B", k)] = (input_grad + recompute) / rate
      cost[("W", k)] = (weight + recompute) / rate
    else:
      cost[("B", k)] = (input_grad + weight + recompute) / rate
  rounds = pipe.rounds
  round_s, busy = [], 0.0
  for row in rounds.ops:
    times = [sum(cost[(op.kind, op.chunk * S + d)] for op in ops) for d, ops in enumerate(row)]
    round_s.append(max(times))
    busy += sum(times)
  total_flops = busy * rate / S  # per device, on average
  rounds_s = sum(round_s)
  bubble = 1.0 - busy / (S * rounds_s) if rounds_s > 0 else 0.0
  link = dev.link
  # Each round: activations forward and cotangents back, one swap at S = 2.
  message = F32 * mb * D
  if S == 2:
    per_round_bytes, per_round_s, per_round_calls = 2 * message, link.time(PPERMUTE, 2 * message, S), 1
  else:
    per_round_bytes, per_round_s, per_round_calls = 2 * message, 2 * link.time(PPERMUTE, message, S), 2
  R = rounds.num_rounds
  gathered = F32 * S * v * N
  stage_bytes = R * per_round_bytes + bus_factor(ALL_GATHER, S) * gathered \
      + bus_factor(ALL_REDUCE, S) * F32
  stage_s = R * per_round_s + link.time(ALL_GATHER, gathered, S) + link.time(ALL_REDUCE, F32, S)
  traffic = [Traffic(STAGE, int(round(stage_bytes)),
                     {PPERMUTE: R * per_round_calls, ALL_GATHER: 1, ALL_REDUCE: 1}, stage_s)]
  n = config.mesh.data
  if n > 1:
    grad = F32 * v * N * (n if config.deterministic else 1)
    data_bytes = bus_factor(ALL_REDUCE, n) * (grad + 2 * F32 + 2 * F32)
    data_s = (link.time(ALL_REDUCE, grad, n) + link.time(ALL_REDUCE, F32, n)
              + link.time(ALL_REDUCE, 2 * F32, n))
    traffic.append(Traffic(DATA, int(round(data_bytes)), {ALL_REDUCE: 3}, data_s))
  local = config.batch_size // n
  per_round_traffic = F32 * (4 * mb * D + 2 * shape.R)  # stores into the ring buffers
  elementwise = (_elementwise_bytes(param_bytes, opt_bytes) + R * per_round_traffic
                 + F32 * (v * N + S * v * N) + 2 * param_bytes)  # stack and unstack
  compute = rounds_s + elementwise / dev.memory_bandwidth
  comm = sum(t.seconds for t in traffic)
  return _step_time(config, local, total_flops, compute, comm, bubble), traffic, bubble


def _step_time(config: PlanConfig, local: int, flops: float, compute: float, comm: float,
               bubble: float) -> StepTime:
  step = compute + comm
  return StepTime(config.devices, config.mesh_text(), local, flops, compute, comm, bubble,
                  step, config.batch_size / step if step > 0 else math.inf)


# --- the plan ------------------------------------------------------------------------


def _estimate(config: PlanConfig) -> tuple[StepTime, list[Traffic], Memory, dict | None, int]:
  """Memory and time of ``config``'s step on its own mesh."""
  params = _param_shapes(config)
  opt_state = jax.eval_shape(_optimizer(config.optim).init, params)
  param_bytes, opt_bytes = _nbytes(params), _nbytes(opt_state)
  num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  leaves = [(tuple(leaf.shape), leaf.dtype) for leaf in jax.tree.leaves(params)]
  local = config.batch_size // config.mesh.data
  state_bytes = 4 + param_bytes + opt_bytes + 8
  state_leaves = 2 + len(jax.tree.leaves(params)) + len(jax.tree.leaves(opt_state))
  in_size = config.widths[0] if config.widths else 0
  label_bytes = F32 * local * (config.widths[-1] if config.loss == "mse" and config.widths
                               else 1)
  arguments = state_bytes + F32 * local * in_size + label_bytes
  outputs = state_bytes + METRICS_BYTES + POINTER * (state_leaves + 3)
  pipeline = None
  if config.stages > 1:
    shape = _pipeline_shape(config, local)
    step, traffic, bubble = _pipeline_step(config, shape, param_bytes, opt_bytes)
    largest = max(_nbytes(leaf) for leaf in jax.tree.leaves(params))
    phases = _pipeline_phases(config, shape, param_bytes, largest, local)
    temporaries = max(phases.values())
    activations = shape.buffers()
    b = shape.pipe.bounds
    pipeline = {
        "schedule": config.schedule, "stages": shape.S, "virtual_stages": shape.v,
        "microbatches": shape.pipe.schedule.num_microbatches, "microbatch": shape.mb,
        "layers_per_stage": [b[k + 1] - b[k] for k in range(len(b) - 1)],
        "rounds": shape.pipe.rounds.num_rounds, "bubble": bubble,
        "schedule_bubble": shape.pipe.rounds.bubble,
        "param_width": shape.N, "activation_width": shape.D,
        "slots": {"activations": shape.slots[0], "cotangents": shape.slots[1],
                  "residuals": shape.slots[2]},
        "residual_words": shape.R, "remat": config.remat,
        "temporaries": phases,
    }
  else:
    step, traffic = _plain_step(config, param_bytes, opt_bytes, num_params, leaves)
    if config.widths is not None:
      rows = local // config.grad_accum
      temporaries = _plain_temporaries(config, param_bytes, local)
      activations = _kept_activations(config.widths, rows, config.activation)
    else:
      temporaries = activations = None
  memory = Memory(param_bytes, param_bytes, opt_bytes, activations, arguments, outputs,
                  temporaries)
  step = dataclasses.replace(step, temporaries=temporaries)
  return step, traffic, memory, pipeline, num_params


def _projection_configs(config: PlanConfig) -> list[tuple[int, PlanConfig | str]]:
  """For 1, 2, 4, ... ``max_devices`` devices: the same global batch on
  ``data = n / stage`` replicas of the planned pipeline (unpipelined on
  fewer devices than stages), or why that mesh cannot run it."""
  rows = []
  n = 1
  while n <= max(config.max_devices, 1):
    S = config.stages if n % config.stages == 0 and n >= config.stages else 1
    mesh = MeshConfig(data=n // S, fsdp=1, stage=S, tensor=1)
    try:
      rows.append((n, dataclasses.replace(config, mesh=mesh)))
    except MeshnetError:
      rows.append((n, f"batch {config.batch_size} does not split over data={n // S}"))
    n *= 2
  return rows


def plan(config: PlanConfig) -> Plan:
  """Plans ``config``'s step: memory, traffic, time, and the projection to
  1, 2, 4, ... ``config.max_devices`` devices (the same global batch).

  Pure: only shapes are traced (``jax.eval_shape``); nothing is compiled
  or run. See the module docstring for what is modelled.
  """
  step, traffic, memory, pipeline, num_params = _estimate(config)
  scaling, base = [], None
  for n, row in _projection_configs(config):
    if isinstance(row, str):
      continue
    row_step = step if row == config else _estimate(row)[0]
    if n == 1:
      base = row_step
    speedup = base.step_s / row_step.step_s if base is not None else None
    scaling.append(dataclasses.replace(row_step, speedup=speedup))
  step = dataclasses.replace(step, speedup=base.step_s / step.step_s if base else None)
  return Plan(config, num_params, memory, tuple(traffic), step, tuple(scaling), pipeline,
              _notes(config))


def _notes(config: PlanConfig) -> tuple[str, ...]:
  notes = []
  if config.optim.grad_transport == "shm":
    notes.append("grad_transport shm: the exchange is priced as an all-reduce")
  return tuple(notes)


# --- from meshnet train's configuration ---------------------------------------------


class _DataShape:
  """A data set's shapes only (for :func:`~meshnet.defaults.resolve_defaults`)."""

  def __init__(self, name: str):
    if name not in DATA_SHAPES:
      raise MeshnetError(f"unknown dataset {name!r}; choose one of {', '.join(DATA_SHAPES)}")
    self.name = name
    self.input_size, self.num_outputs, self.loss, n = DATA_SHAPES[name]
    self.x_train = np.empty((n, 0), np.float32)


def plan_config(config: Config, device: DeviceSpec, *, layers: Sequence[int] | None = None,
                num_params: int | None = None, n_devices: int | None = None,
                max_devices: int | None = None) -> tuple[PlanConfig, list[str]]:
  """The :class:`PlanConfig` of what ``meshnet train`` runs with ``config``
  (its unset fields resolved as ``train.run`` resolves them), and the notes
  of the defaults it adjusted.

  Args:
    config: ``meshnet train``'s configuration.
    device: the device to plan for.
    layers: widths to plan instead of the built-in model (the data set then
      gives only the loss).
    num_params: a parameter count to plan instead of a model.
    n_devices: devices the mesh may use (default ``config.mesh.devices``,
      else JAX's device count).
    max_devices: the projection's largest device count (default: the
      mesh's devices, at least 8).
  """
  from meshnet.defaults import resolve_defaults
  from meshnet.models import MODELS

  data = _DataShape(config.data.dataset)
  if config.model.name not in MODELS:
    raise MeshnetError(f"unknown model {config.model.name!r}; choose one of "
                       f"{', '.join(MODELS)}")
  if n_devices is None:
    n_devices = config.mesh.devices or jax.device_count()
  resolved, notes = resolve_defaults(config, data, n_devices,
                                     builds_model=layers is None and num_params is None)
  mesh = resolved.mesh
  if layers is not None:
    widths, label = tuple(int(w) for w in layers), "mlp"
  elif num_params is not None:
    widths, label = None, f"{num_params:,} parameters"
  else:
    widths = (data.input_size, *resolved.model.hidden, data.num_outputs)
    label = config.model.name
  size = math.prod(getattr(mesh, a) for a in AXES)
  pc = PlanConfig(
      widths=widths, num_params=num_params if widths is None else None,
      activation=resolved.model.activation, loss=data.loss,
      batch_size=resolved.data.batch_size, device=device,
      mesh=MeshConfig(**{a: getattr(mesh, a) for a in AXES}),
      microbatches=resolved.pipeline.microbatches, grad_accum=resolved.optim.grad_accum,
      schedule=resolved.pipeline.schedule, virtual_stages=resolved.pipeline.virtual_stages,
      remat=resolved.pipeline.remat, optim=resolved.optim,
      deterministic=resolved.optim.deterministic,
      max_devices=max_devices or max(8, size), label=label)
  if resolved.model.dropout:
    notes.append(f"dropout {resolved.model.dropout}: its masks and per-example keys are "
                 "not modelled")
  return pc, notes


def _device_count(config: Config, default: int) -> int:
  """Devices the mesh may use: ``mesh.devices`` when given, else the size
  of a mesh given in full (no -1), else ``default``."""
  if config.mesh.devices is not None:
    return config.mesh.devices
  sizes = config.mesh.axes()
  if not config.mesh.is_default and -1 not in sizes.values():
    return math.prod(sizes.values())
  return default


def _check_positive(name: str, value: float | None) -> None:
  if value is not None and not (math.isfinite(value) and value > 0):
    raise MeshnetError(f"{name} {value:g} must be a finite number > 0")


def _device(kind: str, pc: PlanConfig, *, flops: float | None, bandwidth_GBps: float | None,
            latency_us: float | None, link_file: str | None) -> DeviceSpec:
  """The device to plan for: the kind's figures (``cpu``: timed on this
  host at the plan's microbatch), then the link file's, then the flags'."""
  from meshnet import hardware

  if kind == "auto":
    kind = hardware.detect_kind()
  if kind not in hardware.DEVICE_KINDS:
    raise MeshnetError(f"unknown device kind {kind!r}; choose one of "
                       f"{', '.join(hardware.DEVICE_KINDS)} (or auto)")
  if kind == "cpu":
    bandwidth = hardware.measure_cpu_bandwidth(_num_params(pc))
    if flops:
      spec = hardware.device_spec("cpu", flops=flops, memory_bandwidth=bandwidth)
      spec = dataclasses.replace(spec, source="--flops; update timed here")
    else:
      rows = sorted({min(r, hardware.MAX_MEASURED_ROWS) for r in _matmul_rows(pc)})
      measured = tuple((r, hardware.measure_cpu_flops(pc.widths, r)) for r in rows)
      main = min(_matmul_rows(pc)[0], hardware.MAX_MEASURED_ROWS)
      spec = hardware.device_spec("cpu", flops=dict(measured)[main],
                                  memory_bandwidth=bandwidth)
      what = "the model's matmuls" if pc.widths else "a 1024x1024 matmul"
      spec = dataclasses.replace(
          spec, flops_by_rows=measured,
          source=f"measured here: {what} at {', '.join(str(r) for r in rows)} rows; "
          "an update")
  else:
    spec = hardware.device_spec(kind, flops=flops)
  link = spec.link
  if link_file:
    link = hardware.read_link_file(link_file, base=link)
  if bandwidth_GBps is not None or latency_us is not None:
    given = " and ".join(f for f, v in (("--bandwidth", bandwidth_GBps),
                                        ("--latency", latency_us)) if v is not None)
    link = link.replace(bandwidth_Bps=None if bandwidth_GBps is None else bandwidth_GBps * 1e9,
                        latency_s=None if latency_us is None else latency_us * 1e-6,
                        source=f"{link.source}, {given}" if link_file else given)
  return dataclasses.replace(spec, link=link)


def _matmul_rows(pc: PlanConfig) -> list[int]:
  """Rows per matmul of the plan's step, then of its projection's meshes."""
  rows = []
  for config in [pc] + [row for _, row in _projection_configs(pc) if not isinstance(row, str)]:
    local = config.batch_size // config.mesh.data
    rows.append(local // config.parts)
  return rows


def _num_params(pc: PlanConfig) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(_param_shapes(pc)))


def make_plan(config: Config, *, layers: Sequence[int] | None = None,
              num_params: float | None = None, device_kind: str = "auto",
              flops: float | None = None, bandwidth_GBps: float | None = None,
              latency_us: float | None = None, link_file: str | None = None,
              max_devices: int | None = None, compile: bool = True,
              default_devices: int = 8) -> tuple[Plan, list[str]]:
  """``meshnet plan``: plans what ``meshnet train`` runs with ``config``.

  Resolves ``config`` as a run does, picks the device's figures
  (``device_kind``; ``auto``: this host's; ``cpu`` measures its rates here;
  a ``link_file`` of ``meshnet bench collectives`` lines, then
  ``bandwidth_GBps`` and ``latency_us``, replace the link's), plans, and,
  when ``compile`` and the mesh fits this process's devices (on CPU:
  simulated, like ``meshnet train --devices``), compiles the real step for
  XLA's memory numbers.

  Returns:
    ``(plan, notes)``: notes are the defaults adjusted to the data set and
    why XLA's numbers are missing, one line each.

  Raises:
    MeshnetError: bad input, with the value and the fix.
  """
  from meshnet.mesh import set_cpu_device_count

  for name, value in (("--flops", flops), ("--bandwidth", bandwidth_GBps),
                      ("--params", num_params)):
    _check_positive(name, value)
  if latency_us is not None and not (math.isfinite(latency_us) and latency_us >= 0):
    raise MeshnetError(f"--latency {latency_us} must be a finite number of microseconds >= 0")
  if max_devices is not None and max_devices < 1:
    raise MeshnetError(f"--max-devices {max_devices} must be >= 1")
  if num_params is not None and num_params != int(num_params):
    raise MeshnetError(f"--params {num_params} must be a whole number of parameters")
  n_devices = _device_count(config, default_devices)
  try:  # before JAX starts: simulate the devices on CPU, as meshnet train does
    set_cpu_device_count(n_devices)
  except MeshnetError:
    pass
  provisional = _placeholder_device()
  pc, notes = plan_config(config, provisional, layers=layers,
                          num_params=None if num_params is None else int(num_params),
                          n_devices=n_devices, max_devices=max_devices)
  device = _device(device_kind, pc, flops=flops, bandwidth_GBps=bandwidth_GBps,
                   latency_us=latency_us, link_file=link_file)
  result = plan(dataclasses.replace(pc, device=device))
  if compile:
    devices = jax.devices()
    if pc.widths is None:
      notes.append("XLA: not compiled (a parameter count has no layers to compile)")
    elif len(devices) < pc.devices:
      notes.append(f"XLA: not compiled (mesh {pc.mesh_text()} needs {pc.devices} devices, "
                   f"this process has {len(devices)}; on CPU pass --devices "
                   f"{pc.devices})")
    else:
      result = result.with_xla(compiled_memory(pc, devices))
  return result, notes


def _placeholder_device() -> DeviceSpec:
  from meshnet.hardware import CPU_LINK
  return DeviceSpec("cpu", 1.0, 1.0, 0, CPU_LINK)


# --- XLA's numbers ------------------------------------------------------------------


def compiled_memory(config: PlanConfig, devices: Sequence[jax.Device] | None = None
                    ) -> XlaMemory:
  """Compiles ``config``'s real train step (nothing runs) and returns XLA's
  memory analysis of it, per device.

  Args:
    config: the plan's configuration (widths needed).
    devices: the devices to compile for (default: this process's first
      ``config.devices``).

  Raises:
    MeshnetError: no layer widths, or too few devices.
  """
  from meshnet import make_mesh, make_pipeline, make_train_step
  from meshnet.sharding import batch_sharding, replicated
  from meshnet.step import TrainState

  if config.widths is None:
    raise MeshnetError("compiling the step needs the model's layers (--layers), not only "
                       "its parameter count")
  devices = list(devices if devices is not None else jax.devices())
  if len(devices) < config.devices:
    raise MeshnetError(f"mesh {config.mesh_text()} needs {config.devices} devices; this "
                       f"process has {len(devices)}")
  axes = {a: getattr(config.mesh, a) for a in AXES}
  mesh = make_mesh(devices=devices[:config.devices], **axes)
  model, optimizer = _model(config), _optimizer(config.optim)
  pipeline = None
  if config.stages > 1:
    pipeline = make_pipeline(model, mesh, (config.widths[0],), schedule=config.schedule,
                             microbatches=config.parts, virtual_stages=config.virtual_stages,
                             remat=config.remat)
  step = make_train_step(model, optimizer, mesh, loss=config.loss,
                         grad_accum=1 if pipeline else config.grad_accum, pipeline=pipeline,
                         deterministic=config.deterministic)
  params = jax.eval_shape(model.init, jax.random.key(0))
  shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                      jax.eval_shape(optimizer.init, params),
                      jax.ShapeDtypeStruct((2,), jnp.uint32))
  rep = replicated(mesh)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)
  B, batch = config.batch_size, batch_sharding(mesh)
  x = jax.ShapeDtypeStruct((B, config.widths[0]), jnp.float32, sharding=batch)
  y = (jax.ShapeDtypeStruct((B,), jnp.int32, sharding=batch) if config.loss == "cross_entropy"
       else jax.ShapeDtypeStruct((B, config.widths[-1]), jnp.float32, sharding=batch))
  analysis = step.lower(state, (x, y)).compile().memory_analysis()
  return XlaMemory(int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes),
                   int(analysis.alias_size_in_bytes), int(analysis.temp_size_in_bytes),
                   devices[0].platform)


# --- the table ----------------------------------------------------------------------


def _size(nbytes: float | None) -> str:
  if nbytes is None:
    return "-"
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if nbytes >= scale:
      return f"{nbytes / scale:.2f} {unit}"
  return f"{int(nbytes)} B"


def _time(seconds: float) -> str:
  if seconds >= 1:
    return f"{seconds:.2f} s"
  if seconds >= 1e-3:
    return f"{seconds * 1e3:.2f} ms"
  return f"{seconds * 1e6:.1f} us"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  line = lambda r: "  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                    for i, (c, w) in enumerate(zip(r, widths)))
  return [line(header)] + [line(r) for r in rows]


def format_plan(plan: Plan) -> str:
  """The plan as text: a header, per-device memory (plan beside XLA when
  compiled), per-step traffic and time, and the scaling projection."""
  c, m, s, dev = plan.config, plan.memory, plan.step, plan.config.device
  model = ("-".join(map(str, c.widths)) if c.widths else "")
  lines = [f"meshnet plan: {c.label} {model} ({plan.num_params:,} parameters), "
           f"{c.optim.optimizer}, global batch {c.batch_size}".replace("  ", " ")]
  where = f"mesh {c.mesh_text()} ({c.devices} device{'s' * (c.devices > 1)}, {dev.kind})"
  if plan.pipeline:
    p = plan.pipeline
    where += (f"; pipeline {p['schedule']}"
              + (f" v={p['virtual_stages']}" if p["virtual_stages"] > 1 else "")
              + f", {p['microbatches']} microbatches of {p['microbatch']}, layers per "
              f"stage {p['layers_per_stage']}, {p['rounds']} rounds"
              + (", remat" if p["remat"] else ""))
  elif c.grad_accum > 1:
    where += f"; grad_accum {c.grad_accum}"
  lines.append(where)
  lines.append(f"device: {dev.flops / 1e9:,.1f} GFLOP/s, memory {dev.memory_bandwidth / 1e9:.1f} "
               f"GB/s ({dev.source}); links: {dev.link.describe()}")
  lines.append("")
  xla = plan.xla
  header = ["per device", "plan"] + ([f"XLA ({xla.platform})", "plan/XLA"] if xla else [])

  def row(name, value, xla_value=None):
    cells = [name, _size(value)]
    if xla:
      cells.append(_size(xla_value) if xla_value is not None else "")
      cells.append(f"{value / xla_value:.2f}" if xla_value and value is not None else "")
    return cells

  act_name = "activations (ring buffers)" if plan.pipeline else "activations (kept)"
  rows = [row("parameters", m.params), row("gradients", m.grads),
          row("optimizer state", m.optimizer), row(act_name, m.activations),
          row("XLA arguments", m.arguments, xla.arguments if xla else None),
          row("XLA outputs", m.outputs, xla.outputs if xla else None),
          row("XLA temporaries", m.temporaries, xla.temporaries if xla else None)]
  lines += _table(header, rows)
  if dev.memory_bytes and m.temporaries is not None:
    total = m.arguments + m.outputs - m.params - m.optimizer + m.temporaries
    lines.append(f"  peak about {_size(total)} of {_size(dev.memory_bytes)} device memory"
                 + ("" if total <= dev.memory_bytes else "  (does NOT fit)"))
  lines.append("")
  rows = []
  for t in plan.traffic:
    calls = ", ".join(f"{n} {name}" for name, n in t.calls.items())
    rows.append([f"{t.axis} axis", _size(t.bytes_sent), calls, _time(t.seconds)])
  if rows:
    lines += _table(["per step", "sent per device", "collectives", "time"], rows)
  else:
    lines.append("  per step: no collectives (one device)")
  lines.append(f"  compute {_time(s.compute_s)} ({s.flops / 1e9:.3g} GFLOP"
               + (f", bubble {s.bubble:.1%}" if plan.pipeline else "")
               + f"), communication {_time(s.comm_s)}: step {_time(s.step_s)}, "
               f"{s.samples_per_s:,.0f} samples/s"
               + (f", {s.speedup:.2f}x one device" if s.speedup else ""))
  lines.append("")
  lines.append(f"projection, global batch {c.batch_size} on 1, 2, 4, ... devices "
               f"(data parallel{' x stage=' + str(c.stages) if c.stages > 1 else ''}):")
  rows = [[str(r.devices), r.mesh, str(r.local_batch), _time(r.compute_s), _time(r.comm_s),
           f"{r.bubble:.1%}" if r.bubble else "-", _time(r.step_s), f"{r.samples_per_s:,.0f}",
           f"{r.speedup:.2f}x" if r.speedup else "-", _size(r.temporaries)]
          for r in plan.scaling]
  lines += _table(["devices", "mesh", "batch/replica", "compute", "comm", "bubble", "step",
                   "samples/s", "speedup", "temp"], rows)
  for note in plan.notes:
    lines.append(f"note: {note}")
  return "\n".join(lines)
