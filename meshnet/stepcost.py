"""What meshnet's train step allocates and computes, from shapes alone.

The cost model :mod:`meshnet.planner` prices a step with. Everything here
is a function of widths, batch rows and the executor's own layout; nothing
is compiled or run. The model follows the programs :mod:`meshnet.step` and
:mod:`meshnet.pipeline.executor` build:

* **Unpipelined temporaries** (:func:`plain_temporaries`): the forward keeps
  each dense layer's output and, after a nonlinearity, its activation; the
  backward makes each layer's weight gradient (kept until packed) and the
  cotangents of the layer it is in; the gradient bucket (all gradients and
  the loss, one flat buffer) is written from the loss on; then the
  all-reduce's result and the unpacked gradient the update reads. The
  estimate is the peak of these buffers' live bytes, run in that order: a
  liveness simulation (:class:`Heap`), not a fit.
* **Pipelined temporaries** (:func:`pipeline_temporaries`): during the
  rounds, the stage's parameters and gradient as one padded vector each
  (``[v, N]``), the activation, cotangent and residual ring buffers (slots
  from :mod:`meshnet.pipeline.plan`, residual words from
  :mod:`meshnet.pipeline.residuals`), the padded input, what is in flight
  between devices and one op's working set; after them, the all-gathered
  ``[S, v, N]`` gradient, its unstacked tree and one leaf's update (with
  :mod:`meshnet.pipeline.restack`: the stage's gradient, the ``all_to_all``'s
  rows sent and received, and the pieces cut out of them). Whichever is
  larger.
* **FLOPs**: ``2 x in x out`` per example per dense layer forward, the same
  again for its weight gradient, and again for its input gradient except
  the first layer's (nothing needs it; XLA drops it).
* **Elementwise traffic** (:func:`elementwise_bytes`): packing and
  unpacking the gradient, its norm, the update and the finite check.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

F32 = 4  # bytes of a float32
POINTER = 8  # bytes per output leaf in the tuple XLA returns
METRICS_BYTES = 4 + 4 + 1  # loss, grad_norm (float32), state_finite (bool)
ALIGN = 64  # XLA:CPU starts every buffer at a multiple of 64 bytes
NONLINEAR = ("relu", "gelu", "tanh", "sigmoid", "silu")


def dense_layers(widths: Sequence[int]) -> list[tuple[int, int]]:
  """``(in, out)`` of each dense layer of an MLP of ``widths``."""
  return list(zip(widths[:-1], widths[1:]))


def forward_flops(widths: Sequence[int], rows: int) -> float:
  """Matmul FLOPs of the forward over ``rows`` examples."""
  return 2.0 * rows * sum(i * o for i, o in dense_layers(widths))


def backward_flops(widths: Sequence[int], rows: int, input_grad: bool = False) -> float:
  """Weight gradients of every layer, and input gradients of every layer
  but the first unless ``input_grad``: what autodiff runs once XLA has
  dropped the dead code."""
  first = 2.0 * rows * widths[0] * widths[1]
  return 2.0 * forward_flops(widths, rows) - (0.0 if input_grad else first)


def elementwise_bytes(param_bytes: int, opt_bytes: int) -> int:
  """Bytes the step's elementwise work reads and writes, per device:
  packing and unpacking the gradient (read and write, twice), its norm
  (read), the update (reads parameters, gradient and state; writes
  parameters and state) and the finite check (reads parameters and state)."""
  grad = param_bytes
  return 4 * grad + grad + (2 * param_bytes + grad + 2 * opt_bytes) + (param_bytes + opt_bytes)


def kept_activation_bytes(widths: Sequence[int], rows: int, activation: str) -> int:
  """Bytes the forward keeps for the backward over ``rows`` examples: every
  layer's output, and every hidden layer's activation after a nonlinearity."""
  layers = dense_layers(widths)
  kept = sum(o for _, o in layers)
  if activation in NONLINEAR:
    kept += sum(o for _, o in layers[:-1])
  return F32 * rows * kept


def aligned(nbytes: int) -> int:
  """``nbytes`` rounded up to a whole number of :data:`ALIGN` blocks."""
  return -(-int(nbytes) // ALIGN) * ALIGN


class Heap:
  """Live bytes of named buffers (each :func:`aligned`); ``peak`` is the
  most ever live at once."""

  def __init__(self):
    self.live: dict[str, int] = {}
    self.peak = 0

  def alloc(self, name: str, nbytes: int) -> None:
    self.live[name] = aligned(nbytes)
    self.peak = max(self.peak, sum(self.live.values()))

  def free(self, *names: str) -> None:
    for name in names:
      self.live.pop(name, None)


def _forward(heap: Heap, widths: Sequence[int], rows: int, activation: str) -> None:
  """The forward of the dense layers at ``rows`` examples: each layer's
  output ``z``, and its activation ``h`` after a nonlinearity, stay live
  for the backward; the loss keeps two ``rows x outputs`` terms."""
  layers = dense_layers(widths)
  for l, (_, o) in enumerate(layers):
    heap.alloc(f"z{l}", F32 * rows * o)
    if l < len(layers) - 1 and activation in NONLINEAR:
      heap.alloc(f"h{l}", F32 * rows * o)
  heap.alloc("loss", 2 * F32 * rows * layers[-1][1])


def _backward(heap: Heap, widths: Sequence[int], rows: int) -> list[str]:
  """The backward after :func:`_forward`: per layer, last first, its
  weight gradient (live until packed), the cotangent of its input and,
  through the activation, of the layer below's output, freeing what the
  forward kept once read. Returns the weight gradients' names."""
  layers = dense_layers(widths)
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


def plain_temporaries(widths: Sequence[int], rows: int, grad_bytes: int, activation: str,
                      *, grad_accum: int = 1, data: int = 1,
                      deterministic: bool = False) -> int:
  """Peak temporary bytes per device of the unpipelined step.

  Args:
    widths: the MLP's widths, input first.
    rows: examples per micro-step on one device (local batch / grad_accum).
    grad_bytes: the gradient's bytes (the parameters').
    activation: hidden activation.
    grad_accum: micro-steps (a scan carrying the summed gradient).
    data: devices averaging the gradient.
    deterministic: the ordered mean (every device's row all-reduced).
  """
  bucket = grad_bytes + F32  # the gradients and the loss, packed
  heap = Heap()
  if grad_accum > 1:
    heap.alloc("grad_sum", grad_bytes)
    heap.alloc("micro_batch", F32 * rows * (widths[0] + 1))
  _forward(heap, widths, rows, activation)
  if grad_accum == 1:
    heap.alloc("bucket", bucket)
  heap.free(*_backward(heap, widths, rows))  # into the bucket (or grad_sum), in place
  if grad_accum > 1:
    heap.free("micro_batch")
    heap.alloc("bucket", bucket)
    heap.free("grad_sum")
  rows_reduced = data if deterministic and data > 1 else 1
  if rows_reduced > 1:  # each device's bucket in its own row of zeros
    heap.alloc("rows", rows_reduced * bucket)
    heap.free("bucket")
  heap.alloc("reduced", rows_reduced * bucket)
  heap.free("bucket", "rows")
  heap.alloc("unpacked", grad_bytes)  # slices of the reduced bucket the update reads
  return heap.peak


@dataclasses.dataclass(frozen=True)
class ShardedLayer:
  """One dense layer of the sharded step (``fsdp`` or ``tensor`` > 1), on one device.

  Attributes:
    inputs, outputs: its widths on this device (a column-split layer's
      outputs and the next row-split layer's inputs divided by ``tensor``).
    gathered: bytes of its weights all-gathered over ``fsdp`` (0 when none
      of its leaves is split over ``fsdp``).
    piece: bytes of its gradient once reduce-scattered over ``fsdp`` (the
      whole gradient of the leaves not split over it).
  """

  inputs: int
  outputs: int
  gathered: int
  piece: int

  @property
  def grad(self) -> int:
    """Bytes of its weight gradient before the reduce-scatter."""
    return F32 * (self.inputs * self.outputs + self.outputs)


def sharded_temporaries(layers: Sequence[ShardedLayer], rows: int, activation: str, *,
                        data: int = 1, grad_accum: int = 1) -> int:
  """Peak temporary bytes per device of the step whose parameters are split
  over ``fsdp`` and ``tensor`` (:func:`meshnet.step.make_grad_fn`).

  The liveness of :func:`plain_temporaries` on each device's own widths
  (tensor parallelism makes it a narrower MLP), with ZeRO-3's buffers: each
  layer's gathered weights, live from the all-gather until their last read
  (the first layer's in the forward, the others' in the backward, for the
  input cotangent); each weight gradient until its reduce-scatter, whose
  piece stays until the ``data`` mean; then, over ``data`` > 1, the pieces
  packed into a bucket, its all-reduce and the unpacked gradient the update
  reads.

  Args:
    layers: the dense layers, input first.
    rows: examples per micro-step on one device.
    activation: hidden activation.
    data: devices averaging the pieces.
    grad_accum: micro-steps (a scan carrying the summed gradient).
  """
  widths = [layers[0].inputs] + [layer.outputs for layer in layers]
  L = len(layers)
  pieces = sum(layer.piece for layer in layers) + F32  # and the loss
  heap = Heap()
  for l, layer in enumerate(layers):
    if layer.gathered:
      heap.alloc(f"w{l}", layer.gathered)
  if grad_accum > 1:
    heap.alloc("grad_sum", sum(layer.grad for layer in layers))
    heap.alloc("micro_batch", F32 * rows * (widths[0] + 1))
  _forward(heap, widths, rows, activation)
  heap.free("w0")  # only the forward reads the first layer's weights
  heap.alloc(f"g{L - 1}", F32 * rows * widths[-1])
  heap.free("loss", f"z{L - 1}")
  for l in range(L - 1, -1, -1):
    heap.alloc(f"dw{l}", layers[l].grad)
    if l > 0:
      heap.free(f"h{l - 1}")
      heap.alloc(f"dh{l - 1}", F32 * rows * widths[l])
      heap.free(f"w{l}", f"g{l}")
      heap.alloc(f"g{l - 1}", F32 * rows * widths[l])
      heap.free(f"dh{l - 1}", f"z{l - 1}")
    else:
      heap.free("g0")
    if grad_accum == 1:
      heap.alloc(f"piece{l}", layers[l].piece)
      heap.free(f"dw{l}")
  if grad_accum > 1:
    heap.free("micro_batch", *(f"dw{l}" for l in range(L)))
    heap.alloc("pieces", pieces)
    heap.free("grad_sum")
  if data > 1:
    heap.alloc("bucket", pieces)
    heap.free("pieces", *(f"piece{l}" for l in range(L)))
    heap.alloc("reduced", pieces)
    heap.free("bucket")
    heap.alloc("unpacked", pieces - F32)
  return heap.peak


# --- pipelines ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PipelineShape:
  """What the executor allocates and runs for one pipelined step.

  Attributes:
    pipe: the executor's :class:`~meshnet.pipeline.Pipeline` (on an
      abstract mesh): bounds, widths ``N`` and ``D``, rounds.
    mb: examples per microbatch.
    slots: activation, cotangent and residual slots per chunk
      (:func:`meshnet.pipeline.plan.plan`; each buffer has a trash slot more,
      the residual one only when ``res_trash``).
    residual_words: per stage group, uint32 words a forward keeps.
    res_trash: whether the residual buffer has its trash slot.
    carry_slots: split schedules: slots per chunk of the buffer that keeps
      a backward's input half's carried words for its weight half (its
      trash slot not counted; :mod:`meshnet.pipeline.split`).
    carried_words: per stage group, the uint32 words its input half carries.
  """

  pipe: Any
  mb: int
  slots: tuple[int, int, int]
  residual_words: Mapping[int, int]
  res_trash: bool = True
  carry_slots: int = 0
  carried_words: Mapping[int, int] = dataclasses.field(default_factory=dict)

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

  @property
  def Nt(self) -> int:
    """Elements per tensor block of a stage's ``split`` vector (0: none)."""
    return self.pipe.split_width

  @property
  def F(self) -> int:
    return self.pipe.fsdp

  @property
  def T(self) -> int:
    return self.pipe.tensor

  @property
  def act_bytes(self) -> int:
    """Bytes of one element of an activation or cotangent between stages."""
    return jnp.dtype(self.pipe.activation_dtype).itemsize

  @property
  def stage_words(self) -> int:
    """float32 elements of one device's stage vectors once gathered over
    ``fsdp`` (``[v, N]`` and its tensor block of ``[v, T, N_t]``)."""
    return self.v * (self.N + self.Nt)

  @property
  def message(self) -> int:
    """Bytes of one microbatch's activation (or cotangent) between stages."""
    return self.act_bytes * self.mb * self.D

  def stage_widths(self, widths: Sequence[int], k: int) -> list[int]:
    """The widths of virtual stage ``k``'s layers, its input first."""
    b = self.pipe.bounds
    return list(widths[b[k]:b[k + 1] + 1])

  def buffers(self) -> int:
    """Bytes of the ring buffers (with their trash slots), per device: the
    activation, cotangent and residual ones, and the carried one (its
    width at least 1 word, as the executor allocates it)."""
    act, cot, res = self.slots
    G = max([1] + list(self.carried_words.values()))
    return (aligned(self.v * (act + 1) * self.message)
            + aligned(self.v * (cot + 1) * self.message)
            + aligned(F32 * self.v * (res + self.res_trash) * self.R)
            + aligned(F32 * self.v * (self.carry_slots + 1) * G))


def pipeline_shape(model, sizes: Mapping[str, int], example_size: int, *, schedule: str,
                   microbatches: int, virtual_stages: int, remat: bool, loss: str,
                   outputs: int, local_batch: int, precision: str = "fp32",
                   balance: str = "params") -> PipelineShape:
  """The executor's layout for ``model`` on a mesh of ``sizes`` (abstract:
  no devices needed), at ``local_batch`` examples per batch replica
  (``data`` x ``fsdp``)."""
  from jax.sharding import AbstractMesh

  from meshnet.mesh import AXES
  from meshnet.pipeline import make_pipeline, plan

  mesh = AbstractMesh(tuple(sizes[a] for a in AXES), AXES)
  pipe = make_pipeline(model, mesh, (example_size,), schedule=schedule,
                       microbatches=microbatches, virtual_stages=virtual_stages, remat=remat,
                       precision=precision, balance=balance)
  mb = local_batch // microbatches
  buffers = plan.plan(pipe.rounds, list(range(pipe.num_virtual_stages)))
  words, carried = _residual_words(pipe, mb, loss, outputs, remat)
  return PipelineShape(pipe, mb, (buffers.num_act, buffers.num_cot, buffers.num_res), words,
                       buffers.res_trash, buffers.num_carry, carried)


def _residual_words(pipe, mb: int, loss: str, outputs: int,
                    remat: bool) -> tuple[dict[int, int], dict[int, int]]:
  """uint32 words a forward of each stage group keeps per microbatch (the
  executor's residual layout; with ``remat``, the stage input ``mb x D``),
  and, for split schedules, those its backward's input half carries to its
  weight half (:func:`meshnet.pipeline.split.split` of the stage's backward)."""
  from meshnet import losses
  from meshnet.pipeline import residuals, split

  K, N, D = pipe.num_virtual_stages, pipe.param_width, pipe.activation_width
  groups = sorted(set(pipe.stage_groups))
  objective = losses.objective(loss)
  M = pipe.schedule.num_microbatches
  flat = jax.ShapeDtypeStruct((N,), jnp.float32)
  if pipe.split_width:  # the stage's (whole [N], split [T, N_t]) vectors
    flat = (flat, jax.ShapeDtypeStruct((pipe.tensor, pipe.split_width), jnp.float32))
  y = (jax.ShapeDtypeStruct((mb,), jnp.int32) if loss == "cross_entropy"
       else jax.ShapeDtypeStruct((mb, outputs), jnp.float32))
  x = jax.ShapeDtypeStruct((mb, D), pipe.activation_dtype)
  words, carried = {}, {}
  for k in groups:
    def fn(flat, x, y, keys, k=k):  # the executor's stage function (no dropout keys)
      out = pipe._stage_forward(k, flat, x, None, True)  # noqa: SLF001
      return (jnp.mean(objective.loss(out, y)) / M if k == K - 1
              else out.astype(pipe.activation_dtype))

    no_key = jax.ShapeDtypeStruct((), jnp.uint32)
    words[k] = mb * D if remat else residuals.layout(fn, flat, x, y, no_key).size
    # The executor computes no input gradient on a first stage no other shares.
    if pipe.schedule.split_backward and pipe.computes_input_grad(k):
      def backward(flat, x, y, seed, fn=fn):
        return jax.vjp(lambda f, a: fn(f, a, y, None), flat, x)[1](seed)

      seed = (jax.ShapeDtypeStruct((), jnp.float32) if k == K - 1 else x)
      carried[k] = split.split(backward, flat, x, y, seed).layout.size
  return words, carried


def pipeline_temporaries(shape: PipelineShape, example_size: int, largest_leaf: int,
                         local_batch: int) -> dict[str, int]:
  """Peak temporary bytes per device of the pipelined step's two phases:
  ``rounds`` (the scan over the schedule) and ``gather`` (after it: the
  gradient back to the train state's layout).

  Args:
    shape: the executor's layout.
    example_size: features of one input example.
    largest_leaf: the largest parameter's bytes gathered over every axis
      but ``tensor``.
    local_batch: examples per batch replica.
  """
  S, N, D = shape.S, shape.N, shape.D
  pipe = shape.pipe
  sizes, split_sizes = pipe._sizes, pipe._split_sizes or (0,) * len(pipe._sizes)  # noqa: SLF001
  # One op: the stage's weights as leaves (a copy), its flat gradient (or
  # the idle branch's zeros), its residuals unpacked, a cotangent in and out.
  op = max(aligned(F32 * (sizes[k] + split_sizes[k])) + aligned(F32 * (N + shape.Nt))
           + aligned(F32 * shape.residual_words[g]) + 2 * aligned(shape.message)
           for k, g in enumerate(pipe.stage_groups))
  # The batch padded to [b, D] and cast, unless stage 0 reads it as it is.
  padded = example_size != D and not pipe._raw_first  # noqa: SLF001
  padded_input = aligned(shape.act_bytes * local_batch * D) if padded else 0
  words = shape.stage_words
  rounds = (2 * aligned(F32 * words)  # the stage's parameters, and the gradient accumulated
            + (aligned(F32 * words // shape.F) if shape.F > 1 else 0)  # its fsdp piece
            + shape.buffers()  # activation, cotangent and residual ring buffers
            + 2 * aligned(shape.message)  # received last round, stored this round
            + padded_input + op)
  moved = pipe._restack  # noqa: SLF001
  if moved is None:
    # The [S, v, N] (and [S, v, T, N_t]) gradient gathered over stage and
    # fsdp, and one leaf at a time cut out of it (resharded as the state
    # stores it, where the optimizer updates it and its state in place).
    gather = aligned(F32 * S * words) + aligned(largest_leaf)
  else:
    # meshnet.pipeline.restack: the stage's gradient, the [S, width] rows
    # it sends and those it receives, and the pieces cut out of them.
    gather = (aligned(F32 * words) + 2 * aligned(F32 * S * moved.width)
              + aligned(F32 * moved.stored_words))
  return {"rounds": rounds, "gather": gather}


def pipeline_op_flops(shape: PipelineShape, widths: Sequence[int], remat: bool
                      ) -> dict[tuple[str, int], float]:
  """FLOPs of each op kind (``F``, ``B``, ``W``) of each virtual stage
  (``widths``: one device's, e.g. a column-split layer's outputs divided
  by ``tensor``).

  ``B`` is the input and weight gradients together, or only the input's
  when the schedule splits the backward (``W`` is then the weights');
  the first stage computes no input gradient unless its code is shared;
  ``remat`` recomputes the forward in each backward op.
  """
  pipe, mb = shape.pipe, shape.mb
  split = pipe.schedule.split_backward
  flops = {}
  for k in range(pipe.num_virtual_stages):
    w = shape.stage_widths(widths, k)
    forward = forward_flops(w, mb)
    input_grad = forward - (0.0 if pipe.computes_input_grad(k) else 2.0 * mb * w[0] * w[1])
    recompute = forward if remat else 0.0
    flops[("F", k)] = forward
    if split:
      flops[("B", k)] = input_grad + recompute
      flops[("W", k)] = forward + recompute
    else:
      flops[("B", k)] = input_grad + forward + recompute
  return flops
