"""The training step and the evaluation step, as single jitted SPMD programs.

``state, metrics = train_step(state, (x, y))``: one optimizer step on a
global batch. Inside ``shard_map`` each device computes the gradient of its
share of the batch (accumulated over micro-steps), the gradients are averaged
over ``data`` with a bucketed ``pmean``, and the optax update runs on the
averaged (replicated) gradient.

On a mesh with ``fsdp`` or ``tensor`` > 1 the parameters and the optimizer
state live sharded (:func:`meshnet.sharding.param_specs`: logical names
through the rules table, the default FSDP rule for unnamed leaves). The batch
is split over ``data`` x ``fsdp``; inside a ``shard_map`` manual over
``data`` and ``fsdp`` each device all-gathers the ``fsdp``-split weights,
computes the gradient of its rows, and the gradient comes back
reduce-scattered over ``fsdp`` (then the bucketed ``pmean`` over ``data``).
``tensor`` stays with the compiler (an ``Auto`` axis inside the loss), which
places one all-reduce per Megatron column/row pair in the forward pass. The
optax update runs on the sharded gradient, parameters and state.

The gradient computation is the part a parallelism replaces (a pipeline over
``stage`` computes the same ``(loss, grads)`` differently); the optimizer
update and the state are shared by all of them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshnet import collectives, compute, losses, sharded
from meshnet.errors import MeshnetError
from meshnet.mesh import DATA, FSDP, STAGE, TENSOR, axis_size
from meshnet.model import Model, Params, apply_train
from meshnet.sharding import (Rules, batch_axes, batch_sharding, batch_spec, replicated,
                              storage_specs, without_stage)

if TYPE_CHECKING:
  from meshnet.pipeline.executor import Pipeline

Batch = tuple[jax.Array, jax.Array]


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree of arrays.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model's parameters (replicated over ``data``).
    opt_state: the optax state for ``params``.
    rng: ``uint32[2]`` raw key data (``jax.random.key_data``), so the state
      is plain arrays that any checkpointer can store. Step ``s`` draws from
      ``fold_in(key, s)``.
  """

  step: jax.Array
  params: Params
  opt_state: Any
  rng: jax.Array


def init_train_state(
    model: Model, optimizer: optax.GradientTransformation, mesh: Mesh, key: jax.Array,
    *, pipeline: "Pipeline | None" = None, rules: Rules | None = None,
) -> TrainState:
  """Initial state, built directly in its sharding on ``mesh``.

  Args:
    model: the model; ``model.init`` receives a key derived from ``key``.
    optimizer: the optax transformation whose state to create.
    mesh: the mesh. With ``fsdp`` = ``tensor`` = ``stage`` = 1 parameters
      and optimizer state are replicated on it; otherwise each parameter is
      laid out by :func:`meshnet.sharding.param_specs` (with ``stage`` > 1:
      :func:`meshnet.sharding.storage_specs`, also split over ``stage``) and
      the optimizer state's per-parameter leaves (Adam's ``mu``, ``nu``...)
      like their parameter, its scalars replicated.
    key: a ``jax.random.key``.
    pipeline: accepted for code written for either layout; the state's tree
      is the same with or without a pipeline: ``params`` in the model's own
      tree (one entry per layer) and ``optimizer.init(params)``, so any optax
      transformation (masks by path or rank, LAMB, Adafactor) sees the real
      parameter tree. The pipelined step stacks them per stage itself.
    rules: the logical-axis rules table (``None``:
      :data:`meshnet.sharding.DEFAULT_RULES`); pass the same to the step.

  Raises:
    MeshnetError: a parameter that is not a floating-point array, or a
      dimension that the mesh axes it is split over do not divide.
  """
  del pipeline  # the state's layout is the model's own, pipelined or not
  init_key, rng_key = jax.random.split(key)
  check_params(model, init_key)

  def init(init_key, rng_key):
    params = model.init(init_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(rng_key),
    )

  pipelined = axis_size(mesh, STAGE) > 1
  if not (shards_params(mesh) or pipelined):
    return jax.jit(init, out_shardings=replicated(mesh))(init_key, rng_key)
  params_shapes = jax.eval_shape(model.init, init_key)
  if pipelined:
    param_shardings = jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), storage_specs(model, params_shapes, mesh, rules),
        is_leaf=lambda x: isinstance(x, P))
  else:
    param_shardings = sharded.param_layout(model, params_shapes, mesh, rules).shardings
  shardings = sharded.state_shardings(jax.eval_shape(init, init_key, rng_key),
                                      params_shapes, param_shardings, mesh)
  return jax.jit(init, out_shardings=shardings)(init_key, rng_key)


def shards_params(mesh: Mesh) -> bool:
  """Whether ``mesh`` splits parameters (``fsdp`` or ``tensor`` > 1)."""
  return axis_size(mesh, FSDP) > 1 or axis_size(mesh, TENSOR) > 1


def check_params(model: Model, key: jax.Array) -> None:
  """Refuses parameters that are not floating-point arrays (from shapes only).

  Raises:
    MeshnetError: ``model.init`` returns a leaf that is not an array (a
      string, ``None`` inside a layer...) or one of integer/bool dtype,
      naming the leaf.
  """
  try:
    shapes = jax.eval_shape(model.init, key)
  except TypeError as e:
    raise MeshnetError(
        f"model.init returned something that is not a pytree of arrays "
        f"({str(e).splitlines()[0][:120]}); parameters must be floating-point arrays"
    ) from None
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise MeshnetError(
          f"parameter {jax.tree_util.keystr(path) or 'params'} has dtype {leaf.dtype}; "
          "parameters must be floating-point arrays (keep integer constants out of "
          "params, e.g. close over them in apply, or cast them to float32)")


def check_outputs(model: Model, objective: losses.Objective, params: Params,
                  x: jax.Array, y: jax.Array) -> None:
  """Checks ``model.apply``'s output against the batch and the loss (shapes
  only; nothing runs).

  Raises:
    MeshnetError: the output's batch axis differs from the input's, or the
      targets do not fit the built-in loss (integer labels with ``mse``,
      float targets or a wrong shape with ``cross_entropy``).
  """
  # Shapes without shardings: a tensor-split matmul is the compiler's to place.
  params, x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
  out = jax.eval_shape(lambda p, x: model.apply(p, x, train=False), params, x)
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise MeshnetError(f"model.apply must return one array [B, ...], got {out}")
  if out.ndim == 0 or out.shape[0] != x.shape[0]:
    raise MeshnetError(
        f"model.apply maps inputs {tuple(x.shape)} to outputs {tuple(out.shape)}: the "
        f"batch axis changed from {x.shape[0]}; apply must map [B, ...] to [B, ...] "
        "with each example computed on its own")
  integer_targets = jnp.issubdtype(y.dtype, jnp.integer)
  if objective is losses.OBJECTIVES["mse"] and (integer_targets or y.shape != out.shape):
    raise MeshnetError(
        f"loss 'mse' needs float targets shaped like the outputs {tuple(out.shape)}, got "
        f"{y.dtype} {tuple(y.shape)}; for class labels use loss='cross_entropy'")
  if objective is losses.OBJECTIVES["cross_entropy"] and (
      not integer_targets or out.ndim < 2 or y.shape != out.shape[:-1]):
    raise MeshnetError(
        f"loss 'cross_entropy' needs integer labels {tuple(out.shape[:-1])} for outputs "
        f"{tuple(out.shape)}, got {y.dtype} {tuple(y.shape)}; for float targets use "
        "loss='mse'")


def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point value in ``tree`` is finite (a bool scalar)."""
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_batch_size(global_batch: int, mesh: Mesh, grad_accum: int = 1, *,
                     what: str = "grad_accum") -> int:
  """The per-device micro-batch size, or a clear error if it is not whole.

  Args:
    global_batch: examples per step over all devices.
    mesh: the mesh (its ``data`` x ``fsdp`` size splits the batch).
    grad_accum: parts each replica's batch is cut into (accumulation
      micro-steps, or pipeline microbatches).
    what: the name of those parts, for the message.

  Raises:
    MeshnetError: ``global_batch`` is not divisible by
      ``data * fsdp * grad_accum``.
  """
  if grad_accum < 1:
    raise MeshnetError(f"{what}={grad_accum} must be >= 1")
  data = axis_size(mesh, DATA) * axis_size(mesh, FSDP)
  if global_batch % (data * grad_accum):
    hint = " x ".join(f"{a}={axis_size(mesh, a)}" for a in batch_axes(mesh))
    hint += f" x {what}={grad_accum}" if grad_accum > 1 else ""
    raise MeshnetError(
        f"global batch size {global_batch} is not divisible by {hint} = "
        f"{data * grad_accum}; use a batch size that is a multiple of "
        f"{data * grad_accum}"
    )
  return global_batch // (data * grad_accum)


def check_mesh(mesh: Mesh, *, pipelined: bool) -> None:
  """Refuses, with one line, a mesh the step cannot run: ``stage`` > 1
  without a pipeline."""
  if not pipelined and axis_size(mesh, STAGE) > 1:
    raise MeshnetError(
        f"mesh has stage={axis_size(mesh, STAGE)}: pass pipeline="
        "meshnet.pipeline.make_pipeline(model, mesh, ...) to pipeline the model")


def check_pipeline_compute(precision: str, remat: str) -> None:
  """Refuses, with one line, a precision or remat policy given to the step
  with a pipeline: the pipeline's stages apply their own."""
  if compute.check_precision(precision) != "fp32":
    raise MeshnetError(
        f"precision={precision!r} given to the step with a pipeline: pass it to "
        "meshnet.pipeline.make_pipeline(..., precision=...) instead")
  if compute.check_remat(remat) != "none":
    raise MeshnetError(
        f"remat={remat!r} given to the step with a pipeline: pass it to "
        "meshnet.pipeline.make_pipeline(..., remat=...) instead")


def _local_value_and_grad(
    loss_of: Callable[..., jax.Array], params: Params, x: jax.Array, y: jax.Array,
    key: jax.Array, first_index: jax.Array, grad_accum: int,
    varying: tuple[str, ...] = (DATA,),
) -> tuple[jax.Array, Params]:
  """Mean loss and gradient over this device's batch, in ``grad_accum`` parts.

  Shapes are local: ``x: [b, ...]``, ``y: [b, ...]`` with ``b`` the per-device
  batch, rows ``first_index ..`` of the global batch. ``params`` must already
  be varying over the batch's axes ``varying`` so the gradient is this
  device's own (no implicit reduction). ``loss_of(params, x, y, key,
  first_index)``.
  """
  value_and_grad = jax.value_and_grad(loss_of)
  if grad_accum == 1:
    return value_and_grad(params, x, y, key, first_index)
  part = x.shape[0] // grad_accum

  def split(a):
    return a.reshape(grad_accum, part, *a.shape[1:])

  def micro_step(carry, inputs):
    loss_sum, grad_sum = carry
    x, y, first = inputs
    loss, grads = value_and_grad(params, x, y, key, first)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                       (jax.ShapeDtypeStruct((), jnp.float32), params))
  zeros = jax.lax.pcast(zeros, varying, to="varying")  # the scan carry varies per device
  firsts = first_index + part * jnp.arange(grad_accum)
  (loss_sum, grad_sum), _ = jax.lax.scan(micro_step, zeros, (split(x), split(y), firsts))
  return loss_sum / grad_accum, jax.tree.map(lambda g: g / grad_accum, grad_sum)


def _host_mean(model: Model, mesh: Mesh) -> Callable:
  """The shared-memory mean (:mod:`meshnet.shm`), its segment sized for the
  loss and the whole gradient (one exchange a step)."""
  from meshnet import shm

  shapes = jax.eval_shape(model.init, jax.random.key(0))
  # The loss is float32, or bf16 with bf16 outputs: 64 bytes either way.
  leaves = [((), jnp.float32)] + [(s.shape, s.dtype) for s in jax.tree.leaves(shapes)]
  return shm.make_host_mean(mesh, DATA, shm.slot_bytes(leaves))


def _mean_loss(model: Model, objective: losses.Objective) -> Callable[..., jax.Array]:
  """``loss_of(params, x, y, key, first_index)``: the mean loss of a local batch
  whose first row is global example ``first_index`` (dropout keys per example)."""
  def loss_of(params, x, y, key, first_index):
    outputs = apply_train(model.apply, params, x, key, first_index)
    return jnp.mean(objective.loss(outputs, y))
  return loss_of


def make_grad_fn(
    model: Model, mesh: Mesh, *, loss: str | losses.Objective | Callable = "cross_entropy",
    grad_accum: int = 1, bucket_bytes: int = collectives.DEFAULT_BUCKET_BYTES,
    flatten_buckets: bool = True, deterministic: bool = False, grad_transport: str = "xla",
    rules: Rules | None = None, precision: str = "fp32", remat: str = "none",
) -> Callable[[Params, Batch, jax.Array], tuple[jax.Array, Params]]:
  """``(params, (x, y), key) -> (loss, grads)`` averaged over the global batch.

  Global shapes: ``x: [B, ...]`` and ``y: [B, ...]`` sharded over ``data``;
  ``params`` and the results are replicated. Inside ``shard_map`` each device
  takes its ``B / data`` examples, accumulates ``grad_accum`` micro-steps
  (dropout keys come from each example's global index, see
  :func:`meshnet.model.apply_train`, so masks do not depend on the layout), and
  the gradient pytree is averaged over ``data`` with one bucketed ``pmean``.
  ``flatten_buckets`` (default) packs the gradient, and the loss with it,
  into flat buckets, one all-reduce each; false leaves the grouping to
  XLA's all-reduce combiner (see :mod:`meshnet.collectives` for both,
  measured). ``deterministic`` averages in a fixed
  order (:func:`meshnet.collectives.ordered_pmean`), so the result is
  bit-identical however the devices are spread over processes.
  ``grad_transport="shm"`` averages through shared memory between the
  processes of one host instead of an all-reduce (one device per process;
  summed in ``data`` order, so runs repeat bit for bit; see
  :mod:`meshnet.shm`). Setting it up synchronises the processes.

  On a mesh with ``fsdp`` or ``tensor`` > 1 (see :func:`_make_sharded_grad_fn`)
  ``params`` and ``grads`` are laid out by
  :func:`meshnet.sharding.param_specs` with ``rules``, and the batch is split
  over ``data`` x ``fsdp``.

  ``precision`` (``fp32``, ``bf16``) and ``remat`` (``none``, ``layer``,
  ``full``) are applied to the model (:func:`meshnet.compute.policy_model`):
  with ``bf16`` the forward runs in bfloat16 on float32 master parameters and
  the loss, the gradient (float32, the cast's transpose), its accumulation
  and its exchange stay float32.
  """
  check_mesh(mesh, pipelined=False)
  model = compute.policy_model(model, precision=precision, remat=remat)
  if shards_params(mesh):
    return _make_sharded_grad_fn(
        model, mesh, loss=loss, grad_accum=grad_accum, bucket_bytes=bucket_bytes,
        flatten_buckets=flatten_buckets, deterministic=deterministic,
        grad_transport=grad_transport, rules=rules)
  objective = losses.objective(loss)
  mean = _host_mean(model, mesh) if grad_transport == "shm" else None

  loss_of = _mean_loss(model, objective)

  def local(params, x, y, key):
    first_index = collectives.axis_index(DATA) * x.shape[0]  # of this device's rows
    # Make params per-device values: their gradient is then this device's own,
    # and we do the one (bucketed) reduction ourselves.
    params = jax.lax.pcast(params, (DATA,), to="varying")
    loss, grads = _local_value_and_grad(loss_of, params, x, y, key, first_index,
                                        grad_accum)
    with jax.named_scope("gradient_exchange"):
      # The loss rides in the gradient's bucket: one all-reduce per step, not
      # two (each gloo all-reduce costs ~2 ms of latency here).
      loss, grads = collectives.pmean_bucketed(
          (loss, grads), DATA, bucket_bytes=bucket_bytes, flatten=flatten_buckets,
          ordered_size=axis_size(mesh, DATA) if deterministic else None, mean=mean)
    return loss, grads

  sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), batch_spec(), batch_spec(), P()),
      out_specs=(P(), P()),
  )

  def grad_fn(params, batch, key):
    x, y = batch
    check_batch_size(x.shape[0], mesh, grad_accum)
    check_outputs(model, objective, params, x, y)
    x, y = (jax.reshard(a, batch_sharding(mesh)) for a in (x, y))  # no-op when already so
    return sharded(params, x, y, key)

  return grad_fn


def _check_transport(mesh: Mesh, deterministic: bool, grad_transport: str) -> None:
  sizes = ", ".join(f"{a}={axis_size(mesh, a)}" for a in (FSDP, TENSOR)
                    if axis_size(mesh, a) > 1)
  if grad_transport != "xla":
    raise MeshnetError(
        f"grad_transport={grad_transport!r} with {sizes}: shared memory averages one "
        "device per process over data; use the default transport (xla) on this mesh")
  if deterministic:
    raise MeshnetError(
        f"deterministic=True with {sizes}: the fixed-order mean covers the data axis "
        "only (the fsdp/tensor reductions are the compiler's); drop --deterministic or "
        "set fsdp=1 and tensor=1")


def _make_sharded_grad_fn(
    model: Model, mesh: Mesh, *, loss: str | losses.Objective | Callable, grad_accum: int,
    bucket_bytes: int, flatten_buckets: bool, deterministic: bool, grad_transport: str,
    rules: Rules | None,
) -> Callable[[Params, Batch, jax.Array], tuple[jax.Array, Params]]:
  """:func:`make_grad_fn` on a mesh with ``fsdp`` or ``tensor`` > 1 (ZeRO-3
  and Megatron tensor parallelism).

  Global shapes: ``x: [B, ...]``, ``y: [B, ...]`` split over ``data`` x
  ``fsdp``; ``params`` and ``grads`` laid out by their specs (each leaf
  ``[.., d, ..]`` held as ``[.., d / fsdp, ..]`` on its split dimension, and
  over ``tensor`` where its names say). Inside a ``shard_map`` manual over
  ``data`` and ``fsdp`` each device gathers the weights (``fsdp_gather``),
  computes loss and gradient of its ``B / (data * fsdp)`` rows with ``tensor``
  left to the compiler, reduce-scatters the gradient over ``fsdp``
  (``fsdp_scatter``; never all-reduced then sliced) and averages it over
  ``data`` with the bucketed ``pmean`` (``gradient_exchange``).
  """
  _check_transport(mesh, deterministic, grad_transport)
  objective = losses.objective(loss)
  varying = batch_axes(mesh)

  loss_of = _mean_loss(model, objective)

  def local(params, x, y, key, *, layout):
    first_index = collectives.axis_index(varying) * x.shape[0]  # of this device's rows
    params = sharded.vary(sharded.gather_fsdp(params, layout, mesh), varying)
    loss, grads = _local_value_and_grad(loss_of, params, x, y, key, first_index,
                                        grad_accum, varying)
    return sharded.exchange_gradients(loss, grads, layout, mesh, bucket_bytes=bucket_bytes,
                                      flatten=flatten_buckets)

  def grad_fn(params, batch, key):
    x, y = batch
    check_batch_size(x.shape[0], mesh, grad_accum)
    check_outputs(model, objective, params, x, y)
    layout = sharded.param_layout(model, params, mesh, rules)
    params = sharded.constrain(params, layout, mesh)  # no-op when already so
    x, y = (jax.reshard(a, batch_sharding(mesh)) for a in (x, y))
    spec = batch_spec(mesh)
    return jax.shard_map(
        functools.partial(local, layout=layout), mesh=mesh,
        in_specs=(layout.manual, spec, spec, P()), out_specs=(P(), layout.manual),
        axis_names=sharded.manual_axes(mesh))(params, x, y, key)

  return grad_fn


def make_train_step(
    model: Model, optimizer: optax.GradientTransformation, mesh: Mesh, *,
    loss: str | losses.Objective | Callable = "cross_entropy", grad_accum: int = 1,
    bucket_bytes: int = collectives.DEFAULT_BUCKET_BYTES,
    flatten_buckets: bool = True, deterministic: bool = False,
    donate: bool = True, pipeline: "Pipeline | None" = None, grad_transport: str = "xla",
    rules: Rules | None = None, precision: str = "fp32", remat: str = "none",
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted ``step(state, (x, y)) -> (state, metrics)``.

  Args:
    model: the model to train.
    optimizer: optax transformation (clipping included, see
      :func:`meshnet.optim.make_optimizer`); it sees the gradient averaged
      over the whole global batch.
    mesh: the mesh; the batch is split over ``data``.
    loss: a name in :data:`meshnet.losses.OBJECTIVES`, an ``Objective``, or
      ``(outputs [B, ...], targets [B, ...]) -> [B]`` per-example losses.
    grad_accum: micro-steps per step; the global batch must divide by
      ``data * grad_accum``. The result equals one step on the whole batch.
    bucket_bytes: the most bytes per packed gradient reduction.
    flatten_buckets: pack the gradient into flat buckets before reducing
      (see :func:`make_grad_fn`).
    deterministic: average gradients over ``data`` in a fixed order, so the
      run is bit-identical on any process layout (more traffic).
    donate: donate ``state``'s buffers to the output (the input state must
      not be used after the call).
    grad_transport: ``xla`` (all-reduce) or ``shm`` (shared memory between
      the processes of one host; see :func:`make_grad_fn`).
    rules: the logical-axis rules the parameters are laid out by on a mesh
      with ``fsdp`` or ``tensor`` > 1 (the same as :func:`init_train_state`'s).
    pipeline: pipeline the model over ``stage`` with this
      :class:`~meshnet.pipeline.Pipeline`. The state is the same as without
      one; each step stacks the parameters per stage (``[S, v, N]`` sharded
      over ``stage``: a local slice), runs the schedule, gathers the
      gradient back into the parameter tree (one all-gather over ``stage``)
      and updates with ``optimizer`` exactly as the unpipelined step does.
      Gradient accumulation is then more microbatches: build the pipeline
      with ``microbatches * grad_accum`` and leave ``grad_accum=1`` here.
    precision: ``fp32`` or ``bf16`` (bfloat16 forward on float32 master
      parameters and optimizer state; see :mod:`meshnet.compute`); a
      pipeline takes it from :func:`~meshnet.pipeline.make_pipeline`.
    remat: ``none``, ``layer`` or ``full`` (:mod:`meshnet.compute`); a
      pipeline takes its policy from :func:`~meshnet.pipeline.make_pipeline`.

  Returns:
    ``step``. ``metrics`` holds ``loss`` (mean over the global batch, before
    the update), ``grad_norm`` (global norm of the averaged gradient,
    before clipping), both replicated scalars, and ``state_finite`` (a bool:
    every value of the new parameters and optimizer state is finite; the
    run checks it before saving a checkpoint).
  """
  compute.check_precision(precision)
  compute.check_remat(remat)
  if pipeline is None:
    grad_fn = make_grad_fn(model, mesh, loss=loss, grad_accum=grad_accum,
                           bucket_bytes=bucket_bytes, flatten_buckets=flatten_buckets,
                           deterministic=deterministic, grad_transport=grad_transport,
                           rules=rules, precision=precision, remat=remat)
  else:
    check_pipeline_compute(precision, remat)
    if grad_transport != "xla":
      raise MeshnetError(
          f"grad_transport={grad_transport!r} with a pipeline: the pipelined step "
          "averages over data with the compiled all-reduce; use the default transport")
    check_mesh(mesh, pipelined=True)
    if grad_accum != 1:
      raise MeshnetError(
          f"grad_accum={grad_accum} with a pipeline: build the pipeline with "
          f"microbatches x {grad_accum} instead (the same mean gradient)")
    stacked_grad_fn = pipeline.make_grad_fn(loss=loss, bucket_bytes=bucket_bytes,
                                            flatten_buckets=flatten_buckets,
                                            deterministic=deterministic)
    objective = losses.objective(loss)

    def grad_fn(params, batch, key):
      check_outputs(model, objective, params, *batch)
      loss_value, stacked = stacked_grad_fn(pipeline.stack(params), batch, key)
      grads = pipeline.unstack(stacked)  # all-gather over stage
      return loss_value, jax.tree.unflatten(jax.tree.structure(params),
                                            jax.tree.leaves(grads))

  def step(state: TrainState, batch: Batch):
    with jax.named_scope("train_step"):
      key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
      loss_value, grads = grad_fn(state.params, batch, key)
      with jax.named_scope("optimizer_update"):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
      new_state = TrainState(state.step + 1, params, opt_state, state.rng)
      return new_state, {"loss": loss_value, "grad_norm": optax.tree.norm(grads),
                         "state_finite": all_finite((params, opt_state))}

  return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(
    model: Model, mesh: Mesh, *, loss: str | losses.Objective | Callable = "cross_entropy",
    rules: Rules | None = None, precision: str = "fp32",
) -> Callable[[Params, Batch, jax.Array], dict[str, jax.Array]]:
  """A jitted ``eval_step(params, (x, y), mask) -> sums``.

  ``x``, ``y`` are ``[B, ...]`` and ``mask`` ``[B]`` (1 for real examples, 0
  for padding), all sharded over ``data`` (``data`` x ``fsdp`` when ``fsdp``
  > 1; ``params`` then laid out as the train step's, by ``rules``). Returns
  replicated sums over the real examples: ``loss_sum``, ``count`` and, if the
  objective has a correctness test, ``correct``. Divide by ``count`` for
  means. ``precision`` is the train step's (the forward's compute dtype;
  the sums are float32). On a mesh with ``stage`` > 1 every stage evaluates
  the whole model, unpipelined: the parameters are gathered over ``stage``
  (the train state keeps them split over it) and the batch is not split
  over ``stage``.
  """
  objective = losses.objective(loss)
  model = compute.precision_model(model, precision)

  def sums_of(params, x, y, mask):
    outputs = model.apply(params, x, train=False)
    sums = {
        "loss_sum": jnp.sum(objective.loss(outputs, y) * mask),
        "count": jnp.sum(mask),
    }
    if objective.correct is not None:
      sums["correct"] = jnp.sum(objective.correct(outputs, y) * mask)
    return sums

  if not shards_params(mesh):
    def local(params, x, y, mask):
      sums = sums_of(params, x, y, mask)
      with jax.named_scope("eval_reduce"):
        return collectives.all_reduce(sums, DATA, "sum")

    reduce_sums = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), batch_spec(), batch_spec(), batch_spec()),
        out_specs=P(),
    )

    def eval_step(params, batch, mask):
      params = jax.tree.map(lambda a: jax.reshard(a, replicated(mesh)), params)
      x, y, mask = (jax.reshard(a, batch_sharding(mesh)) for a in (*batch, mask))
      return reduce_sums(params, x, y, mask)

    return jax.jit(eval_step)

  def sharded_local(params, x, y, mask, *, layout):
    sums = sums_of(sharded.gather_fsdp(params, layout, mesh), x, y, mask)
    with jax.named_scope("eval_reduce"):
      return collectives.all_reduce(sums, batch_axes(mesh), "sum")

  # Every stage evaluates the whole model: a stacked layers dimension is not
  # split over stage here (the state's storage may split it; constrain moves it).
  eval_rules = without_stage(rules) if axis_size(mesh, STAGE) > 1 else rules

  def sharded_eval_step(params, batch, mask):
    layout = sharded.param_layout(model, params, mesh, eval_rules)
    params = sharded.constrain(params, layout, mesh)
    x, y, mask = (jax.reshard(a, batch_sharding(mesh)) for a in (*batch, mask))
    spec = batch_spec(mesh)
    return jax.shard_map(
        functools.partial(sharded_local, layout=layout), mesh=mesh,
        in_specs=(layout.manual, spec, spec, spec), out_specs=P(),
        axis_names=sharded.manual_axes(mesh))(params, x, y, mask)

  return jax.jit(sharded_eval_step)
