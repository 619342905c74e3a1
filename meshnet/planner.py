"""``meshnet plan``: what a training step will cost, before it runs.

``plan(PlanConfig(...)) -> Plan`` is a pure function of shapes and figures:
per device, the bytes of the parameters, gradients, optimizer state and
activations, and XLA's argument, output and temporary buffers of the
compiled step; per step, the bytes each mesh axis sends, the compute and
communication time, the pipeline bubble and the step time; and the step
time and speedup projected for 1, 2, 4, ... devices. :func:`compiled_memory`
compiles the real train step (when the mesh fits this process's devices)
for XLA's own numbers beside the plan's; :func:`format_plan`
(:mod:`meshnet.plan_report`) prints it all.

The step's memory and FLOPs come from :mod:`meshnet.stepcost` (a model of
the programs :mod:`meshnet.step` and the pipeline executor build), the
device's and links' figures from :mod:`meshnet.hardware`. Time: matmul
FLOPs over the device's FLOP/s at the step's batch rows, elementwise
traffic over its memory bandwidth; a pipeline's lockstep rounds last as
long as their busiest device, each stage's ops timed at their own cost;
collectives cost ``latency + bus_bytes / bandwidth`` each and do not
overlap compute (the step exchanges the gradient after the backward, and
the executor sends between rounds). The projection keeps the global batch
and the planned ``stage`` and varies ``data`` (fewer devices than stages
run unpipelined); a mesh that splits parameters keeps its ``fsdp`` and
``tensor`` and varies ``data`` (speedups against the smallest such mesh).

On ``fsdp``/``tensor`` meshes the bytes per device are each leaf's shard
under :func:`meshnet.sharding.param_specs` (the step's own layout), the
batch is split over ``data`` x ``fsdp``, matmuls over ``tensor``, and the
traffic adds ``fsdp``'s all-gather and reduce-scatter and ``tensor``'s
all-reduces per Megatron pair (see :func:`_sharded_step`). With ``stage`` >
1 the state is each leaf's shard under :func:`meshnet.sharding.storage_specs`;
the step gathers it to stack the stage vectors (``[v, N / fsdp]`` and
``[v, N_t / fsdp]`` per device; one ``all_to_all`` each way on a list of
layers with ``fsdp = tensor = 1``, :mod:`meshnet.pipeline.restack`), all-gathers them over ``fsdp`` once,
reduce-scatters their gradient, runs ``tensor``'s all-reduces inside the
stages' ops and moves activations in the pipeline's dtype (see
:func:`_pipeline_traffic`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from meshnet import collectives, stepcost
from meshnet.config import Config, MeshConfig, OptimConfig
from meshnet.errors import MeshnetError
from meshnet.hardware import (
    ALL_GATHER, ALL_REDUCE, CPU_LINK, PPERMUTE, DeviceSpec, bus_factor,
)
from meshnet.mesh import AXES, DATA, FSDP, STAGE, TENSOR
from meshnet.plan_report import format_plan
from meshnet.sharding import storage_specs

ALL_TO_ALL = "all_to_all"


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
    dropout: the model's dropout rate (compiled as trained; its masks are
      not in the plan's memory or time).
    loss: ``cross_entropy`` (int labels ``[B]``) or ``mse`` (targets ``[B, O]``).
    batch_size: global batch per step.
    mesh: axis sizes (an axis left ``None`` is 1).
    microbatches: pipeline microbatches per data replica (``None``: stages).
    grad_accum: micro-steps per step (a pipeline runs ``microbatches x
      grad_accum`` microbatches, as ``meshnet train`` does).
    schedule, virtual_stages, remat: the pipeline's (``meshnet train``'s flags).
    optim: the optimizer (its state's shapes count).
    precision: ``fp32`` or ``bf16``; with a pipeline, ``bf16`` moves the
      activations and cotangents between stages (and keeps them in the ring
      buffers) as bfloat16. Unpipelined, the plan is float32's.
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
  dropout: float = 0.0
  loss: str = "cross_entropy"
  microbatches: int | None = None
  grad_accum: int = 1
  schedule: str = "1f1b"
  virtual_stages: int = 1
  remat: bool = False
  balance: str = "params"
  optim: OptimConfig = OptimConfig()
  precision: str = "fp32"
  deterministic: bool = False
  max_devices: int = 8
  label: str = "mlp"

  def __post_init__(self):
    sizes = {axis: getattr(self.mesh, axis) for axis in AXES}
    if -1 in sizes.values():
      raise MeshnetError(f"a plan needs every mesh axis's size, not -1 (mesh "
                         f"{','.join(f'{a}={n}' for a, n in sizes.items() if n is not None)})")
    object.__setattr__(self, "mesh", MeshConfig(
        **{axis: 1 if n is None else n for axis, n in sizes.items()}))
    if self.widths is not None:
      object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
    if self.widths is None and self.num_params is None:
      raise MeshnetError("a plan needs the model's layer widths (--layers W0,W1,...) or its "
                         "parameter count (--params N)")
    if self.widths is not None and (len(self.widths) < 2 or min(self.widths) < 1):
      raise MeshnetError(f"layer widths {','.join(map(str, self.widths))} need an input and "
                         "an output width, all >= 1, e.g. --layers 784,1024,10")
    if self.precision not in ("fp32", "bf16"):
      raise MeshnetError(f"precision {self.precision!r} must be fp32 or bf16")
    if self.loss not in ("cross_entropy", "mse"):
      raise MeshnetError(f"loss {self.loss!r} must be cross_entropy or mse")
    if self.num_params is not None and self.num_params < 1:
      raise MeshnetError(f"--params {self.num_params} must be a parameter count >= 1")
    if self.batch_size < 1:
      raise MeshnetError(f"batch size {self.batch_size} must be >= 1")
    if self.max_devices < 1:
      raise MeshnetError(f"--max-devices {self.max_devices} must be >= 1")
    if self.stages > 1 and self.deterministic and self.shards_params:
      raise MeshnetError(
          f"deterministic with fsdp={self.mesh.fsdp}, tensor={self.mesh.tensor} in a "
          "pipeline: the fixed-order average covers data only; drop --deterministic or "
          "use fsdp=tensor=1")
    if self.stages > 1 and self.widths is None:
      raise MeshnetError(f"a pipeline (stage={self.stages}) needs the layer widths to cut "
                         "into stages; give --layers W0,W1,... instead of --params")
    if self.stages > 1 and self.stages * self.virtual_stages > len(self.widths) - 1:
      raise MeshnetError(
          f"stage={self.stages} x virtual_stages={self.virtual_stages} stages but the model "
          f"has {len(self.widths) - 1} layers; use fewer stages or more layers")
    parts, replicas = self.parts, self.batch_replicas
    if self.batch_size % (replicas * parts):
      what = "microbatches" if self.stages > 1 else "grad_accum"
      split = f"data={self.mesh.data}" + (f" x fsdp={self.mesh.fsdp}" if self.mesh.fsdp > 1
                                          else "")
      raise MeshnetError(
          f"global batch size {self.batch_size} is not divisible by {split} "
          f"x {what}={parts} = {replicas * parts}; use a batch size that is a "
          f"multiple of {replicas * parts}")

  @property
  def stages(self) -> int:
    return self.mesh.stage

  @property
  def shards_params(self) -> bool:
    """Whether the mesh splits parameters (``fsdp`` or ``tensor`` > 1)."""
    return self.mesh.fsdp > 1 or self.mesh.tensor > 1

  @property
  def batch_replicas(self) -> int:
    """Devices the global batch is split over: ``data`` x ``fsdp``."""
    return self.mesh.data * self.mesh.fsdp

  @property
  def local_batch(self) -> int:
    """Examples per device per step."""
    return self.batch_size // self.batch_replicas

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
    d = self._device_dict()
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

  def _device_dict(self) -> dict[str, Any]:
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
  return mlp(list(config.widths), activation=config.activation, dropout=config.dropout)


def _param_shapes(config: PlanConfig) -> Any:
  """The parameter tree's shapes (``jax.ShapeDtypeStruct`` leaves)."""
  if config.widths is None:
    return [{"w": jax.ShapeDtypeStruct((config.num_params,), jnp.float32)}]
  return jax.eval_shape(_model(config).init, jax.random.key(0))


def _optimizer(optim: OptimConfig):
  from meshnet.optim import make_optimizer
  return make_optimizer(optim, max(2, optim.warmup_steps + 1))


class _Shapes(NamedTuple):
  """The state's shapes: global, and one device's shard of each leaf.

  Attributes:
    params, opt_state: global ``jax.ShapeDtypeStruct`` trees.
    local_params, local_opt: the same trees with each leaf's shape one
      device's shard (laid out as :func:`meshnet.init_train_state` lays them).
    layout: :func:`meshnet.sharded.param_layout` on the plan's mesh (the
      ``fsdp``/``tensor`` split the step computes with), or ``None`` when
      ``fsdp`` = ``tensor`` = 1.
  """

  params: Any
  opt_state: Any
  local_params: Any
  local_opt: Any
  layout: Any


def _abstract_mesh(config: PlanConfig):
  from jax.sharding import AbstractMesh

  from meshnet.mesh import axis_types
  sizes = {a: getattr(config.mesh, a) for a in AXES}
  return AbstractMesh(tuple(sizes[a] for a in AXES), AXES, axis_types=axis_types(sizes))


def _layout_model(config: PlanConfig):
  """The model whose logical axes lay the parameters out (``None`` for a
  parameter count: no names, the default FSDP rule)."""
  return _model(config) if config.widths is not None else None


def _shapes(config: PlanConfig) -> _Shapes:
  """The state's global and per-device shapes on ``config``'s mesh, from
  the same specs :func:`meshnet.init_train_state` lays them out by:
  :func:`meshnet.sharding.param_specs`, or with ``stage`` > 1
  :func:`meshnet.sharding.storage_specs` (also split over ``stage``)."""
  from meshnet import sharded

  params = _param_shapes(config)
  opt_state = jax.eval_shape(_optimizer(config.optim).init, params)
  if not config.shards_params and config.stages == 1:
    return _Shapes(params, opt_state, params, opt_state, None)
  mesh = _abstract_mesh(config)
  model = _layout_model(config)
  layout = sharded.param_layout(model, params, mesh) if config.shards_params else None
  if config.stages > 1:  # a pipeline stores them split over stage too
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                             storage_specs(model, params, mesh),
                             is_leaf=lambda x: isinstance(x, P))
  else:
    shardings = layout.shardings
  opt_shardings = sharded.state_shardings(opt_state, params, shardings, mesh)

  def local(leaf, sharding):
    return jax.ShapeDtypeStruct(sharding.shard_shape(leaf.shape), leaf.dtype)

  return _Shapes(params, opt_state, jax.tree.map(local, params, shardings),
                 jax.tree.map(local, opt_state, opt_shardings), layout)


def _sharded_layers(config: PlanConfig, shapes: _Shapes) -> list[stepcost.ShardedLayer]:
  """Each dense layer of the MLP as one device runs it on a mesh that splits
  its parameters: widths after ``tensor``, bytes gathered over ``fsdp``
  and the bytes of its gradient's reduce-scattered piece."""
  from jax.sharding import PartitionSpec as P

  t = config.mesh.tensor
  layout = shapes.layout
  global_leaves = jax.tree.leaves(shapes.params)
  local_leaves = jax.tree.leaves(shapes.local_params)
  tensor_specs = jax.tree.leaves(layout.tensor, is_leaf=lambda x: isinstance(x, P))
  layers = []
  for l in range(len(config.widths) - 1):
    # The MLP's params are [{"b", "w"}, ...]: leaves 2l (b) and 2l + 1 (w).
    gathered = piece = 0
    for i in (2 * l, 2 * l + 1):
      spec, leaf = tensor_specs[i], global_leaves[i]
      block = [n // t if entry == TENSOR else n for n, entry in zip(leaf.shape, spec)]
      block_bytes = int(np.prod(block, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
      gathered += block_bytes if layout.dims[i] is not None else 0
      piece += _nbytes(local_leaves[i])
    w_spec = tuple(tensor_specs[2 * l + 1])
    i, o = config.widths[l], config.widths[l + 1]
    layers.append(stepcost.ShardedLayer(i // t if w_spec[0] == TENSOR else i,
                                        o // t if w_spec[1] == TENSOR else o,
                                        gathered, piece))
  return layers


def _nbytes(tree: Any) -> int:
  return sum(int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree))


# --- time ---------------------------------------------------------------------------


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
  """The unpipelined step: compute, then the gradient exchange."""
  dev = config.device
  local = config.local_batch
  rows = local // config.grad_accum
  if config.widths is not None:
    flops = config.grad_accum * (stepcost.forward_flops(config.widths, rows)
                                 + stepcost.backward_flops(config.widths, rows))
  else:
    flops = 6.0 * num_params * local
  compute = (flops / dev.rate(rows)
             + stepcost.elementwise_bytes(param_bytes, opt_bytes) / dev.memory_bandwidth)
  sent, calls, seconds = _data_traffic(config, [((), jnp.float32)] + leaves)
  traffic = [Traffic(DATA, sent, calls, seconds)] if calls else []
  return _step_time(config, local, flops, compute, seconds, 0.0), traffic


def _sharded_step(config: PlanConfig, shapes: _Shapes, param_bytes: int, opt_bytes: int,
                  num_params: int) -> tuple[StepTime, list[Traffic]]:
  """The step whose parameters are split over ``fsdp`` and ``tensor``:
  compute on each device's rows (``B / (data x fsdp)``) and widths (matmuls
  split over ``tensor``), then the collectives, none overlapped. Over
  ``fsdp``: one all-gather of each split leaf (the gathered weights serve
  the forward and the backward), one reduce-scatter of its gradient, and the
  mean of the loss and the unsplit leaves' gradients (one bucketed
  all-reduce over ``data`` x ``fsdp``, counted here). Over ``tensor``: per
  Megatron column/row pair, an all-reduce of the row layer's output
  ``[rows, out]`` in the forward and of the column layer's input cotangent
  ``[rows, in]`` in the backward (none for the first layer: no input
  gradient). Over ``data``: the bucketed mean of the reduce-scattered pieces."""
  dev, link, F32 = config.device, config.device.link, stepcost.F32
  f, t, d = config.mesh.fsdp, config.mesh.tensor, config.mesh.data
  local = config.local_batch
  rows = local // config.grad_accum
  layout = shapes.layout
  leaves = jax.tree.leaves(shapes.local_params)
  split = [((tuple(a.shape), a.dtype), dim) for a, dim in zip(leaves, layout.dims)]
  pieces = [shape for shape, dim in split if dim is not None]
  whole = [((), jnp.float32)] + [shape for shape, dim in split if dim is None]
  traffic = []
  if config.widths is not None:
    layers = _sharded_layers(config, shapes)
    widths = [layers[0].inputs] + [layer.outputs for layer in layers]
    flops = config.grad_accum * (stepcost.forward_flops(widths, rows)
                                 + stepcost.backward_flops(widths, rows))
  else:
    flops = 6.0 * num_params * local / t
  if f > 1:
    gathered = [_nbytes(jax.ShapeDtypeStruct(s, dt)) * f for s, dt in pieces]
    whole_bytes = sum(_nbytes(jax.ShapeDtypeStruct(s, dt)) for s, dt in whole)
    n_whole = len(collectives.plan_buckets(whole, collectives.DEFAULT_BUCKET_BYTES))
    sent = (2 * bus_factor(ALL_GATHER, f) * sum(gathered)
            + bus_factor(ALL_REDUCE, f) * whole_bytes)
    seconds = (2 * sum(link.time(ALL_GATHER, g, f) for g in gathered)
               + n_whole * link.time(ALL_REDUCE, whole_bytes / n_whole, f))
    traffic.append(Traffic(FSDP, int(round(sent)),
                           {ALL_GATHER: len(gathered), "reduce_scatter": len(gathered),
                            ALL_REDUCE: n_whole}, seconds))
  if t > 1 and config.widths is not None:
    messages = []
    for l, layer in enumerate(layers[:-1]):
      if layer.outputs != config.widths[l + 1]:  # a column-split layer, then its row layer
        messages.append(F32 * rows * config.widths[l + 2])
        if l > 0:
          messages.append(F32 * rows * config.widths[l])
    messages *= config.grad_accum
    traffic.append(Traffic(TENSOR, int(round(sum(bus_factor(ALL_REDUCE, t) * m
                                                 for m in messages))),
                           {ALL_REDUCE: len(messages)},
                           sum(link.time(ALL_REDUCE, m, t) for m in messages)))
  if d > 1:
    sent, calls, seconds = _data_traffic(config, pieces + (whole if f == 1 else []))
    traffic.append(Traffic(DATA, sent, calls, seconds))
  compute = (flops / dev.rate(rows)
             + stepcost.elementwise_bytes(param_bytes, opt_bytes) / dev.memory_bandwidth)
  return (_step_time(config, local, flops, compute, sum(x.seconds for x in traffic), 0.0),
          traffic)


def _stack_gathers(config: PlanConfig, shapes: _Shapes) -> list[tuple[int, int]]:
  """``(gathered bytes, devices)`` of each parameter leaf the step gathers
  to stack the stage vectors: the leaves the state keeps split over
  ``stage`` (and ``fsdp``), gathered over those axes (``tensor`` blocks
  stay split)."""
  t = config.mesh.tensor
  tensor = (jax.tree.leaves(shapes.layout.tensor, is_leaf=lambda x: isinstance(x, P))
            if shapes.layout is not None else [None] * len(jax.tree.leaves(shapes.params)))
  gathers = []
  for leaf, local, spec in zip(jax.tree.leaves(shapes.params),
                               jax.tree.leaves(shapes.local_params), tensor):
    whole = _nbytes(leaf) // (t if spec is not None and TENSOR in tuple(spec) else 1)
    if _nbytes(local) < whole:
      gathers.append((whole, whole // _nbytes(local)))
  return gathers


def _gathered_leaves(config: PlanConfig, shapes: _Shapes) -> list[int]:
  """Bytes of each parameter leaf gathered over every axis but ``tensor``."""
  t = config.mesh.tensor
  if shapes.layout is None:
    return [_nbytes(leaf) for leaf in jax.tree.leaves(shapes.params)]
  tensor = jax.tree.leaves(shapes.layout.tensor, is_leaf=lambda x: isinstance(x, P))
  return [_nbytes(leaf) // (t if TENSOR in tuple(spec) else 1)
          for leaf, spec in zip(jax.tree.leaves(shapes.params), tensor)]


def _tensor_messages(config: PlanConfig, shapes: _Shapes, shape: stepcost.PipelineShape
                     ) -> dict[tuple[str, int], list[int]]:
  """Bytes of each all-reduce over ``tensor`` one op of virtual stage ``k``
  runs, per op kind (``F``, ``B``, ``W``): per Megatron column/row pair,
  the row layer's output ``[mb, out]`` in the forward (in the stage of the
  row layer) and the column layer's input cotangent ``[mb, in]`` in the
  backward (in the column layer's stage; none for the model's first layer);
  ``remat`` recomputes the forward's in the backward. Elements in the
  stages' compute dtype."""
  K, L = shape.pipe.num_virtual_stages, len(config.widths) - 1
  messages = {(kind, k): [] for kind in "FBW" for k in range(K)}
  if config.mesh.tensor == 1:
    return messages
  item = 2 if config.precision == "bf16" else stepcost.F32
  bounds = shape.pipe.bounds
  stage_of = [next(k for k in range(K) if bounds[k] <= l < bounds[k + 1]) for l in range(L)]
  layers = _sharded_layers(config, shapes)
  backward = "B"  # the input cotangent: the B op (the input half when split)
  for l, layer in enumerate(layers[:-1]):
    if layer.outputs == config.widths[l + 1]:
      continue  # not a column-split layer
    forward = item * shape.mb * config.widths[l + 2]
    messages[("F", stage_of[l + 1])].append(forward)
    if config.remat:
      messages[(backward, stage_of[l + 1])].append(forward)
    if l > 0:
      messages[(backward, stage_of[l])].append(item * shape.mb * config.widths[l])
  return messages


def _pipeline_traffic(config: PlanConfig, shapes: _Shapes, shape: stepcost.PipelineShape,
                      tensor: dict[tuple[str, int], list[int]]) -> list[Traffic]:
  """The pipelined step's collectives, per mesh axis.

  Over ``stage``: each parameter leaf split over it gathered to build the
  stage vectors (one ``all_to_all`` where :mod:`meshnet.pipeline.restack`
  applies, and one for the gradient); per round, activations one device forward and cotangents
  one back (one swap at S = 2, two ppermutes otherwise; in the activation
  dtype); after the rounds, the ``[S, v, N]`` (and ``[S, v, T, N_t]``)
  gradient all-gathered over ``stage`` x ``fsdp``, the loss summed, the
  gradient norm's squares summed (a float per split parameter leaf) and the
  finite check (a byte per split state leaf) reduced. Over ``fsdp``: the
  stage vectors all-gathered once and their gradient reduce-scattered,
  and the loss's mean. Over ``tensor``: the Megatron all-reduces of every
  op the busiest device runs. Over ``data``: the gradient's piece
  ``[v, N / F]`` (its ``split`` part in a second call) and the loss, in one
  all-reduce each."""
  link, F32 = config.device.link, stepcost.F32
  S, F, rounds = shape.S, shape.F, shape.pipe.rounds.num_rounds
  message = shape.message
  if S == 2:
    round_s, round_calls = link.time(PPERMUTE, 2 * message, S), 1
  else:
    round_s, round_calls = 2 * link.time(PPERMUTE, message, S), 2
  stack = _stack_gathers(config, shapes)
  gathered = F32 * S * shape.stage_words
  parts = 2 if shape.Nt else 1
  split_leaves = sum(1 for a, b in zip(jax.tree.leaves(shapes.opt_state) +
                                       jax.tree.leaves(shapes.params),
                                       jax.tree.leaves(shapes.local_opt) +
                                       jax.tree.leaves(shapes.local_params))
                     if a.shape != b.shape)
  norm = F32 * sum(1 for a, b in zip(jax.tree.leaves(shapes.params),
                                     jax.tree.leaves(shapes.local_params)) if a.shape != b.shape)
  moved = shape.pipe._restack  # noqa: SLF001
  if moved is None:  # every split leaf gathered, then the gradient gathered back
    moves = {ALL_GATHER: len(stack) + parts}
    moved_sent = (sum(bus_factor(ALL_GATHER, n) * g for g, n in stack)
                  + bus_factor(ALL_GATHER, S * F) * gathered)
    moved_s = (sum(link.time(ALL_GATHER, g, n) for g, n in stack)
               + parts * link.time(ALL_GATHER, gathered / parts, S * F))
  else:  # meshnet.pipeline.restack: one all_to_all of [S, width] each way (priced as
    # an all-gather of that size, the same bus factor); the leaves kept whole
    # are summed in the gradient norm's all-reduce (XLA joins the two)
    exchanged = F32 * S * moved.width
    moves = {ALL_TO_ALL: 2}
    moved_sent = 2 * bus_factor(ALL_TO_ALL, S) * exchanged
    moved_s = 2 * link.time(ALL_GATHER, exchanged, S)
    norm += F32 * moved.whole_size
  stage = Traffic(
      STAGE,
      int(round(moved_sent + rounds * 2 * message
                + bus_factor(ALL_REDUCE, S) * (F32 + norm + split_leaves))),
      {**moves, PPERMUTE: rounds * round_calls, ALL_REDUCE: 2 + (norm > 0)},
      moved_s + rounds * round_s
      + link.time(ALL_REDUCE, F32, S) + link.time(ALL_REDUCE, split_leaves, S)
      + (link.time(ALL_REDUCE, norm, S) if norm else 0.0))
  traffic = [stage]
  if F > 1:
    words = F32 * shape.stage_words  # gathered, and its gradient before the scatter
    traffic.append(Traffic(
        FSDP, int(round(2 * bus_factor(ALL_GATHER, F) * words
                        + bus_factor(ALL_REDUCE, F) * F32)),
        {ALL_GATHER: parts, "reduce_scatter": parts, ALL_REDUCE: 1},
        2 * parts * link.time(ALL_GATHER, words / parts, F) + link.time(ALL_REDUCE, F32, F)))
  T = shape.T
  if T > 1:
    busiest = _tensor_per_device(shape, tensor)
    traffic.append(Traffic(TENSOR, int(round(sum(bus_factor(ALL_REDUCE, T) * m
                                                 for m in busiest))),
                           {ALL_REDUCE: len(busiest)},
                           sum(link.time(ALL_REDUCE, m, T) for m in busiest)))
  n = config.mesh.data
  if n == 1:
    return traffic
  # XLA's all-reduce combiner joins the loss's mean to the gradient's (one
  # all-reduce of both); the op counts' sum is dead code in the train step.
  grad = F32 * shape.stage_words // F * (n if config.deterministic else 1)
  traffic.append(Traffic(DATA, int(round(bus_factor(ALL_REDUCE, n) * (grad + F32))),
                         {ALL_REDUCE: parts},
                         parts * link.time(ALL_REDUCE, (grad + F32) / parts, n)))
  return traffic


def _tensor_per_device(shape: stepcost.PipelineShape,
                       tensor: dict[tuple[str, int], list[int]]) -> list[int]:
  """The ``tensor`` all-reduces (bytes each) of the device that runs the
  most: every op of its chunks, once per microbatch."""
  S, v, M = shape.S, shape.v, shape.pipe.schedule.num_microbatches
  per_device = [[m for c in range(v) for kind in "FBW"
                 for m in tensor[(kind, c * S + d)]] * M for d in range(S)]
  return max(per_device, key=sum)


def _pipeline_step(config: PlanConfig, shapes: _Shapes, shape: stepcost.PipelineShape,
                   param_bytes: int, opt_bytes: int, gathered_bytes: int
                   ) -> tuple[StepTime, list[Traffic]]:
  """The pipelined step: the lockstep rounds (each as long as its busiest
  device, ops timed at the microbatch's rate, ``tensor``'s all-reduces
  inside them), the elementwise work, and the other collectives (none
  overlapped)."""
  dev, F32, link = config.device, stepcost.F32, config.device.link
  S = shape.S
  rate = dev.rate(shape.mb)
  widths = config.widths
  if config.mesh.tensor > 1:
    layers = _sharded_layers(config, shapes)
    widths = [layers[0].inputs] + [layer.outputs for layer in layers]
  flops = stepcost.pipeline_op_flops(shape, widths, config.remat)
  tensor = _tensor_messages(config, shapes, shape)
  seconds = {op: f / rate + sum(link.time(ALL_REDUCE, m, shape.T) for m in tensor[op])
             for op, f in flops.items()}
  duration, busy = shape.pipe.rounds.timed(seconds)
  compute_busy = shape.pipe.rounds.timed({op: f / rate for op, f in flops.items()})[1]
  bubble = 1.0 - busy / (S * duration) if duration > 0 else 0.0
  rounds = shape.pipe.rounds.num_rounds
  stores = 4 * shape.message + F32 * 2 * shape.R  # into the ring buffers, per round
  words = F32 * shape.stage_words
  elementwise = (stepcost.elementwise_bytes(param_bytes, opt_bytes) + rounds * stores
                 + words // shape.F + S * words + 2 * gathered_bytes)  # stack and unstack
  traffic = _pipeline_traffic(config, shapes, shape, tensor)
  in_rounds = sum(t.seconds for t in traffic if t.axis == TENSOR)
  step = _step_time(config, config.local_batch, compute_busy * rate / S,
                    duration - in_rounds + elementwise / dev.memory_bandwidth,
                    sum(t.seconds for t in traffic), bubble)
  return step, traffic


def _step_time(config: PlanConfig, local: int, flops: float, compute: float, comm: float,
               bubble: float) -> StepTime:
  step = compute + comm
  return StepTime(config.devices, config.mesh_text(), local, flops, compute, comm, bubble,
                  step, config.batch_size / step if step > 0 else math.inf)


# --- the plan ------------------------------------------------------------------------


def _io_bytes(config: PlanConfig, params: Any, opt_state: Any) -> tuple[int, int]:
  """XLA's argument and output bytes of the compiled step, per device: the
  state (step counter, parameters, optimizer state, rng key) and the
  device's share of the batch in; the new state, the three metrics and one
  pointer per output leaf (the tuple XLA returns) out."""
  F32 = stepcost.F32
  local = config.local_batch
  state_bytes = 4 + _nbytes(params) + _nbytes(opt_state) + 8
  state_leaves = 2 + len(jax.tree.leaves(params)) + len(jax.tree.leaves(opt_state))
  features = config.widths[0] if config.widths else 0  # unknown for a parameter count
  targets = config.widths[-1] if config.loss == "mse" and config.widths else 1
  arguments = state_bytes + F32 * local * (features + targets)
  outputs = state_bytes + stepcost.METRICS_BYTES + stepcost.POINTER * (state_leaves + 3)
  return arguments, outputs


def _pipelined(config: PlanConfig, shapes: _Shapes, param_bytes: int, opt_bytes: int):
  """``(step, traffic, temporaries, buffers, pipeline summary)`` of a pipelined step."""
  local = config.local_batch
  shape = stepcost.pipeline_shape(
      _model(config), {a: getattr(config.mesh, a) for a in AXES}, config.widths[0],
      schedule=config.schedule, microbatches=config.parts,
      virtual_stages=config.virtual_stages, remat=config.remat, loss=config.loss,
      outputs=config.widths[-1], local_batch=local, precision=config.precision,
      balance=config.balance)
  gathered = _gathered_leaves(config, shapes)
  step, traffic = _pipeline_step(config, shapes, shape, param_bytes, opt_bytes, sum(gathered))
  phases = stepcost.pipeline_temporaries(shape, config.widths[0], max(gathered), local)
  b = shape.pipe.bounds
  summary = {
      "schedule": config.schedule, "stages": shape.S, "virtual_stages": shape.v,
      "microbatches": shape.pipe.schedule.num_microbatches, "microbatch": shape.mb,
      "layers_per_stage": [b[k + 1] - b[k] for k in range(len(b) - 1)],
      "rounds": shape.pipe.rounds.num_rounds, "bubble": step.bubble,
      "schedule_bubble": shape.pipe.rounds.bubble,
      "param_width": shape.N, "split_width": shape.Nt, "activation_width": shape.D,
      "activation_dtype": str(jnp.dtype(shape.pipe.activation_dtype)),
      "stage_vector_bytes": stepcost.F32 * shape.stage_words // shape.F,
      "slots": {"activations": shape.slots[0], "cotangents": shape.slots[1],
                "residuals": shape.slots[2]},
      "residual_words": shape.R, "remat": config.remat, "temporaries": phases,
  }
  return step, traffic, max(phases.values()), shape.buffers(), summary


def _estimate(config: PlanConfig) -> tuple[StepTime, list[Traffic], Memory, dict | None, int]:
  """Memory and time of ``config``'s step on its own mesh."""
  shapes = _shapes(config)
  params = shapes.params
  param_bytes, opt_bytes = _nbytes(shapes.local_params), _nbytes(shapes.local_opt)
  num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  arguments, outputs = _io_bytes(config, shapes.local_params, shapes.local_opt)
  pipeline = None
  if config.stages > 1:
    step, traffic, temporaries, activations, pipeline = _pipelined(
        config, shapes, param_bytes, opt_bytes)
  else:
    leaves = [(tuple(leaf.shape), leaf.dtype) for leaf in jax.tree.leaves(params)]
    if shapes.layout is not None:
      step, traffic = _sharded_step(config, shapes, param_bytes, opt_bytes, num_params)
    else:
      step, traffic = _plain_step(config, param_bytes, opt_bytes, num_params, leaves)
    temporaries = activations = None
    if config.widths is not None and shapes.layout is not None:
      rows = config.local_batch // config.grad_accum
      layers = _sharded_layers(config, shapes)
      temporaries = stepcost.sharded_temporaries(
          layers, rows, config.activation, data=config.mesh.data, grad_accum=config.grad_accum)
      local_widths = [layers[0].inputs] + [layer.outputs for layer in layers]
      activations = stepcost.kept_activation_bytes(local_widths, rows, config.activation)
    elif config.widths is not None:
      rows = config.local_batch // config.grad_accum
      temporaries = stepcost.plain_temporaries(
          config.widths, rows, param_bytes, config.activation, grad_accum=config.grad_accum,
          data=config.mesh.data, deterministic=config.deterministic)
      activations = stepcost.kept_activation_bytes(config.widths, rows, config.activation)
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
  shard = config.mesh.fsdp * config.mesh.tensor
  kept_stage = config.stages if shard > 1 else 1  # a sharded pipeline keeps its stages
  shard *= kept_stage
  while n <= max(config.max_devices, 1):
    if shard > 1:  # fsdp, tensor (and stage) kept, data varied
      if n % shard:  # too few devices for them (a note says so)
        n *= 2
        continue
      mesh = MeshConfig(data=n // shard, fsdp=config.mesh.fsdp, stage=kept_stage,
                        tensor=config.mesh.tensor)
    else:
      S = config.stages if n % config.stages == 0 and n >= config.stages else 1
      mesh = MeshConfig(data=n // S, fsdp=1, stage=S, tensor=1)
    try:
      rows.append((n, dataclasses.replace(config, mesh=mesh)))
    except MeshnetError:
      rows.append((n, f"batch {config.batch_size} does not split over data={mesh.data}"))
    n *= 2
  return rows


def plan(config: PlanConfig) -> Plan:
  """Plans ``config``'s step: memory, traffic, time, and the projection to
  1, 2, 4, ... ``config.max_devices`` devices (the same global batch).

  Pure: only shapes are traced (``jax.eval_shape``); nothing is compiled
  or run. See the module docstring for what is modelled.
  """
  step, traffic, memory, pipeline, num_params = _estimate(config)
  scaling, base, left_out = [], None, []
  for n, row in _projection_configs(config):
    if isinstance(row, str):
      left_out.append(str(n))
      continue
    row_step = step if row == config else _estimate(row)[0]
    if base is None:  # one device, or the smallest mesh that holds fsdp x tensor
      base = row_step
    speedup = base.step_s / row_step.step_s if base is not None else None
    scaling.append(dataclasses.replace(row_step, speedup=speedup))
  step = dataclasses.replace(step, speedup=base.step_s / step.step_s if base else None)
  notes = _notes(config)
  if left_out:
    per = "data replicas x microbatches" if config.stages > 1 else (
        "data replicas x grad_accum" if config.grad_accum > 1 else "data replicas")
    if config.mesh.fsdp > 1:
      per = per.replace("data replicas", "data x fsdp")
    notes += (f"projection: no row for {', '.join(left_out)} devices: global batch "
              f"{config.batch_size} does not split over their {per}; plan a batch size "
              "they divide to see them",)
  return Plan(config, num_params, memory, tuple(traffic), step, tuple(scaling), pipeline,
              notes)


def _notes(config: PlanConfig) -> tuple[str, ...]:
  notes = []
  if config.shards_params:
    shard = config.mesh.fsdp * config.mesh.tensor * config.stages
    kept = f"fsdp={config.mesh.fsdp} and tensor={config.mesh.tensor}"
    if config.stages > 1:
      kept = f"stage={config.stages}, {kept}"
    notes.append(f"projection: {kept} kept, data varied; speedup against {shard} "
                 f"device{'s' * (shard > 1)} (data=1)")
  if config.stages > 1 and config.precision == "bf16":
    notes.append("precision bf16: the activations and cotangents between stages (messages "
                 "and ring buffers) are bfloat16, tensor's all-reduces too; the stages' "
                 "compute is timed at float32's rate and their bfloat16 copies of weights "
                 "and activations are not in the temporaries")
  if config.optim.grad_transport == "shm":
    notes.append("grad_transport shm: the exchange is priced as an all-reduce")
  if config.dropout:
    notes.append(f"dropout {config.dropout}: its masks and per-example keys are not in the "
                 "plan's memory or time")
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
      activation=resolved.model.activation, dropout=resolved.model.dropout, loss=data.loss,
      batch_size=resolved.data.batch_size, device=device,
      mesh=MeshConfig(**{a: getattr(mesh, a) for a in AXES}),
      microbatches=resolved.pipeline.microbatches, grad_accum=resolved.optim.grad_accum,
      schedule=resolved.pipeline.schedule, virtual_stages=resolved.pipeline.virtual_stages,
      remat=resolved.pipeline.remat, balance=resolved.pipeline.balance, optim=resolved.optim,
      precision=resolved.train.precision if mesh.stage > 1 else "fp32",
      deterministic=resolved.optim.deterministic,
      max_devices=max_devices or max(8, size), label=label)
  train = resolved.train
  unmodelled = ([f"--precision {train.precision}"]
                if train.precision != "fp32" and mesh.stage == 1 else [])
  if train.remat not in ("none", "full") or (train.remat != "none" and mesh.stage == 1):
    unmodelled.append(f"--remat {train.remat}")
  if unmodelled:
    notes.append(f"{' and '.join(unmodelled)}: not modelled yet; the plan (and XLA's "
                 "numbers beside it) are for " + ("the pipeline's precision " if
                                                  mesh.stage > 1 else "float32 ") + (
                     "with the pipeline's full remat" if mesh.stage > 1 and train.remat != "none"
                     else "without remat"))
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
  spec = _cpu_device(pc, flops) if kind == "cpu" else hardware.device_spec(kind, flops=flops)
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


def _cpu_device(pc: PlanConfig, flops: float | None) -> DeviceSpec:
  """This host's CPU device, timed here: a training step of the model's
  layers at each batch size the plan and its projection run (unless
  ``flops`` is given), and an update over as many floats as the parameters,
  gradient and optimizer state hold (cache effects included)."""
  from meshnet import hardware

  params = _param_shapes(pc)
  state = 2 * _nbytes(params) + _nbytes(jax.eval_shape(_optimizer(pc.optim).init, params))
  bandwidth = hardware.measure_cpu_bandwidth(state // stepcost.F32 // 2)
  if flops:
    spec = hardware.device_spec("cpu", flops=flops, memory_bandwidth=bandwidth)
    return dataclasses.replace(spec, source="--flops; update timed here")
  rows = [min(r, hardware.MAX_MEASURED_ROWS) for r in _matmul_rows(pc)]
  measured = tuple((r, hardware.measure_cpu_flops(pc.widths, r)) for r in sorted(set(rows)))
  spec = hardware.device_spec("cpu", flops=dict(measured)[rows[0]],
                              memory_bandwidth=bandwidth)
  what = "a training step of the model's layers" if pc.widths else "a 1024-wide MLP's step"
  return dataclasses.replace(
      spec, flops_by_rows=measured,
      source=f"timed here: {what} at {', '.join(str(r) for r, _ in measured)} rows; an "
      "update")


def _matmul_rows(pc: PlanConfig) -> list[int]:
  """Rows per matmul of the plan's step, then of its projection's meshes."""
  rows = []
  for config in [pc] + [row for _, row in _projection_configs(pc) if not isinstance(row, str)]:
    rows.append(config.local_batch // config.parts)
  return rows


# The device before :func:`_device` times it (plan_config needs one).
_UNMEASURED = DeviceSpec("cpu", 1.0, 1.0, 0, CPU_LINK, source="not measured yet")


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
  pc, notes = plan_config(config, _UNMEASURED, layers=layers,
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
  from meshnet import make_mesh, make_pipeline, make_train_step, sharded
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
                             remat=config.remat, precision=config.precision,
                             balance=config.balance)
  step = make_train_step(model, optimizer, mesh, loss=config.loss,
                         grad_accum=1 if pipeline else config.grad_accum, pipeline=pipeline,
                         deterministic=config.deterministic)
  params = jax.eval_shape(model.init, jax.random.key(0))
  shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                      jax.eval_shape(optimizer.init, params),
                      jax.ShapeDtypeStruct((2,), jnp.uint32))
  if pipeline is not None:  # laid out as init_train_state lays them
    shardings = sharded.state_shardings(shapes, params, pipeline.param_shardings(), mesh)
  elif config.shards_params:
    layout = sharded.param_layout(model, params, mesh)
    shardings = sharded.state_shardings(shapes, params, layout.shardings, mesh)
  else:
    shardings = jax.tree.map(lambda _: replicated(mesh), shapes)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       shapes, shardings)
  B, batch = config.batch_size, batch_sharding(mesh)
  x = jax.ShapeDtypeStruct((B, config.widths[0]), jnp.float32, sharding=batch)
  y = (jax.ShapeDtypeStruct((B,), jnp.int32, sharding=batch) if config.loss == "cross_entropy"
       else jax.ShapeDtypeStruct((B, config.widths[-1]), jnp.float32, sharding=batch))
  analysis = step.lower(state, (x, y)).compile().memory_analysis()
  return XlaMemory(int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes),
                   int(analysis.alias_size_in_bytes), int(analysis.temp_size_in_bytes),
                   devices[0].platform)

