"""The pipeline executor: one ``shard_map`` program that follows a schedule.

Layout. The model's layers are cut into ``K = S * v`` virtual stages (``S``
devices on ``stage``, ``v`` chunks each); virtual stage ``k = c * S + d`` is
chunk ``c`` of device ``d``. Each virtual stage's parameters are raveled into
one vector, padded to the longest (``N``), and stacked as a global array
``[S, v, N]`` sharded over ``stage`` (``Pipeline.stack``; the train step
does it from the replicated parameter tree each step, and gathers the
gradient back with ``Pipeline.unstack``, so the optimizer always sees the
model's own tree). Activations between stages are raveled per example and
padded to the widest boundary ``D``.

Inside a stage, a run of identical layers (same program, shapes and closed-over
values, in training and in evaluation) is one ``lax.scan`` over their
parameters, which are contiguous in the flat vector; stages whose whole
computation is identical share one branch. Layers that read their key run per
example with the key of the example's global index (as
:func:`meshnet.model.apply_train` runs an unpipelined model), so dropout
masks do not depend on the schedule, microbatch or stage. The compiled
program therefore does not grow with the number of blocks or stages.

Execution. A ``lax.scan`` over the schedule's ticks; at each tick every
device looks up its entry in the table (static arrays indexed by tick and
``axis_index(stage)``) and runs one branch of a ``lax.switch``: idle, the
forward of a stage, its backward, or (split schedules) its input-gradient or
weight-gradient half. Backward branches recompute the stage's forward under
``jax.vjp`` from the stashed stage input, so only stage inputs are kept,
in ring buffers whose slots the table assigns (a 1F1B stash holds about
``S`` microbatches, whatever ``M``). After the branch, activations move one
device forward and cotangents one device back with ``ppermute`` (circular,
so chunk ``c`` of the last device feeds chunk ``c + 1`` of the first), and
the receiver stores them in the slot the table names. The ``data`` axis
averages the result with a bucketed ``pmean``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshnet import collectives, losses
from meshnet.errors import MeshnetError
from meshnet.mesh import DATA, STAGE, axis_size
from meshnet.model import Model, example_keys, uses_key
from meshnet.step import check_batch_size
from meshnet.pipeline import schedules as sched
from meshnet.pipeline.stages import balanced_bounds, check_bounds, layer_param_counts

IDLE = 0


def _varying(x: jax.Array, axes: Sequence[str]) -> jax.Array:
  """``x`` marked as varying over ``axes`` (those it is not varying over yet)."""
  have = jax.typeof(x).manual_axis_type.varying
  missing = tuple(a for a in axes if a not in have)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


@dataclasses.dataclass(frozen=True)
class _Slots:
  """Ring-buffer slots assigned from a table, per (virtual stage, microbatch)."""

  act: dict[tuple[int, int], int]
  cot: dict[tuple[int, int], int]
  num_act: int
  num_cot: int


def _allocate(intervals: dict[tuple[int, int], tuple[int, int]]) -> tuple[dict, int]:
  """Greedy interval colouring per virtual stage. An entry written at the end
  of tick ``w`` and last read at tick ``r`` blocks its slot for writes at
  ticks ``w..r-1`` (a tick reads before it writes)."""
  slots: dict[tuple[int, int], int] = {}
  most = 1
  by_stage: dict[int, list] = {}
  for (k, m), (w, r) in intervals.items():
    by_stage.setdefault(k, []).append((w, r, m))
  for k, items in by_stage.items():
    free_at: list[int] = []  # per slot: first tick a new write may happen
    for w, r, m in sorted(items):
      for s, t in enumerate(free_at):
        if t <= w:
          free_at[s] = r
          slots[(k, m)] = s
          break
      else:
        free_at.append(r)
        slots[(k, m)] = len(free_at) - 1
    most = max(most, len(free_at))
  return slots, most


def _slots(schedule: sched.Schedule) -> _Slots:
  S, v = schedule.num_stages, schedule.virtual_stages
  K = S * v
  when: dict[tuple[str, int, int], int] = {}  # (kind, stage k, m) -> tick
  for t, row in enumerate(schedule.table):
    for d, op in enumerate(row):
      if op is not None:
        when[(op.kind, op.chunk * S + d, op.microbatch)] = t
  last_kind = sched.W if schedule.split_backward else sched.B
  act, cot = {}, {}
  for m in range(schedule.num_microbatches):
    for k in range(K):
      if k > 0:
        act[(k, m)] = (when[(sched.F, k - 1, m)], when[(last_kind, k, m)])
      if k < K - 1:
        cot[(k, m)] = (when[(sched.B, k + 1, m)], when[(last_kind, k, m)])
  act_slots, n_act = _allocate(act)
  cot_slots, n_cot = _allocate(cot)
  return _Slots(act_slots, cot_slots, n_act, n_cot)


def _tables(schedule: sched.Schedule, slots: _Slots,
            branch_of: Sequence[int]) -> dict[str, np.ndarray]:
  """Per (tick, device) int32 arrays the program indexes at run time.
  ``branch_of[k]`` is the code branch virtual stage ``k`` runs."""
  S, v = schedule.num_stages, schedule.virtual_stages
  K = S * v
  G = max(branch_of) + 1
  T = schedule.num_ticks
  kind_index = {sched.F: 0, sched.B: 1, sched.W: 2}
  names = ("branch", "chunk", "micro", "act_slot", "cot_slot",
           "recv_act_chunk", "recv_act_slot", "recv_cot_chunk", "recv_cot_slot")
  tabs = {name: np.zeros((T, S), np.int32) for name in names}
  for name in names[5:]:
    tabs[name][:] = -1
  for t, row in enumerate(schedule.table):
    for d, op in enumerate(row):
      if op is None:
        continue
      k = op.chunk * S + d
      tabs["branch"][t, d] = 1 + kind_index[op.kind] * G + branch_of[k]
      tabs["chunk"][t, d] = op.chunk
      tabs["micro"][t, d] = op.microbatch
      tabs["act_slot"][t, d] = slots.act.get((k, op.microbatch), 0)
      tabs["cot_slot"][t, d] = slots.cot.get((k, op.microbatch), 0)
      if op.kind == sched.F and k < K - 1:  # the next stage receives it
        d2, c2 = (k + 1) % S, (k + 1) // S
        tabs["recv_act_chunk"][t, d2] = c2
        tabs["recv_act_slot"][t, d2] = slots.act[(k + 1, op.microbatch)]
      if op.kind == sched.B and k > 0:  # the previous stage receives its cotangent
        d2, c2 = (k - 1) % S, (k - 1) // S
        tabs["recv_cot_chunk"][t, d2] = c2
        tabs["recv_cot_slot"][t, d2] = slots.cot[(k - 1, op.microbatch)]
  return tabs


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A model cut into stages for a mesh and a schedule.

  Build with :func:`make_pipeline`. ``stack`` turns the model's logical
  parameters (a list, one entry per layer) into the stacked ``[S, v, N]``
  array sharded over ``stage``; ``unstack`` is its inverse (for evaluation and
  checkpoints); ``grad_fn`` is the pipelined ``(loss, grads)``.

  Attributes:
    model: the model (with ``layers``).
    mesh: the mesh; ``stage`` is ``S``.
    schedule: the validated schedule.
    bounds: layer boundaries of the ``K = S * v`` virtual stages.
    example_shape: shape of one input example (without the batch axis).
  """

  model: Model
  mesh: Mesh
  schedule: sched.Schedule
  bounds: tuple[int, ...]
  example_shape: tuple[int, ...]
  _unravel: tuple[Callable, ...]
  _sizes: tuple[int, ...]
  _widths: tuple[int, ...]  # flattened activation size entering stage k; last = output
  _groups: tuple[int, ...] = ()  # stage k computes what stage _groups[k] computes
  _shapes: tuple[tuple[int, ...], ...] = ()  # per-example activation entering stage k
  _runs: tuple[tuple[tuple[int, int], ...], ...] = ()  # per stage: runs of identical layers
  _layer_slices: tuple[tuple[tuple[int, int, Callable], ...], ...] = ()  # (offset, size, unravel)
  _key_layers: tuple[bool, ...] = ()  # per layer: reads its key when training (dropout)

  @property
  def stage_groups(self) -> tuple[int, ...]:
    """For each virtual stage, the first stage whose computation is the same
    (same layers' code and shapes). Stages that share one share a branch of
    the compiled program, so L identical blocks compile to the same program
    for any depth and stage count."""
    return self._groups or tuple(range(self.num_virtual_stages))

  @property
  def num_virtual_stages(self) -> int:
    return len(self.bounds) - 1

  @property
  def param_width(self) -> int:
    return max(self._sizes)

  @property
  def activation_width(self) -> int:
    return max(self._widths)

  def stage_params(self, params: Sequence[Any], k: int) -> list[Any]:
    return list(params[self.bounds[k]:self.bounds[k + 1]])

  def stacked_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(STAGE))

  @functools.cached_property
  def _stack_fn(self) -> Callable:
    S, v = self.schedule.num_stages, self.schedule.virtual_stages
    N = self.param_width

    def build(params):
      rows = []
      for k in range(self.num_virtual_stages):
        flat, _ = ravel_pytree(self.stage_params(params, k))
        rows.append(jnp.pad(flat, (0, N - flat.shape[0])))
      stacked = jnp.stack(rows)  # [K, N], k = c * S + d
      return stacked.reshape(v, S, N).transpose(1, 0, 2)

    return jax.jit(build, out_shardings=self.stacked_sharding())

  @functools.cached_property
  def _unstack_fn(self) -> Callable:
    S = self.schedule.num_stages
    replicated = NamedSharding(self.mesh, P())

    def split(stacked):
      stacked = jax.reshard(stacked, replicated)  # gather the stages' slices
      params: list[Any] = []
      for k in range(self.num_virtual_stages):
        d, c = k % S, k // S
        params.extend(self._unravel[k](stacked[d, c, :self._sizes[k]]))
      return params

    return jax.jit(split, out_shardings=replicated)

  def stack(self, params: Sequence[Any]) -> jax.Array:
    """Logical per-layer params -> ``[S, v, N]`` sharded over ``stage``."""
    return self._stack_fn(list(params))

  def unstack(self, stacked: jax.Array) -> list[Any]:
    """``[S, v, N]`` -> logical per-layer params (the inverse of ``stack``)."""
    return self._unstack_fn(stacked)

  @property
  def _max_layers(self) -> int:
    """The most layers any virtual stage has."""
    return max(e - b for b, e in zip(self.bounds[:-1], self.bounds[1:]))

  def _layer_keys(self, key: jax.Array, first_index: jax.Array, mb: int) -> jax.Array:
    """``[mb, L + n]`` raw key data: row ``r`` holds, for global example
    ``first_index + r``, the keys ``split(fold_in(key, i), L)`` its ``L``
    layers get in :func:`~meshnet.model.sequential` (then ``n`` unused
    columns, so a stage's window never runs past the end)."""
    L = len(self.model.layers)
    keys = example_keys(key, first_index, mb)
    per_layer = jax.vmap(lambda k: jax.random.split(k, L))(keys)
    data = jax.random.key_data(per_layer)
    return jnp.pad(data, ((0, 0), (0, self._max_layers), (0, 0)))

  def _stage_forward(self, k: int, flat: jax.Array, x_pad: jax.Array,
                     layer_keys: jax.Array | None, train: bool):
    """Stage ``k`` on padded activations: ``[b, D] -> [b, D]`` (the last
    stage returns its real output shape ``[b, ...]``). ``layer_keys``:
    ``[b, n]`` raw key data, column ``i`` for the stage's ``i``-th layer (a
    layer that reads its key runs per example with it, as
    :func:`~meshnet.model.apply_train` runs the whole model). A run of
    identical layers is one ``lax.scan`` over their stacked parameters, so
    the program does not grow with the number of blocks."""
    b = x_pad.shape[0]
    x = x_pad[:, :self._widths[k]].reshape(b, *self._shapes[k])
    first = self.bounds[k]
    layers = self.model.layers[first:self.bounds[k + 1]]
    slices = self._layer_slices[k]
    keys = None if layer_keys is None else jax.random.wrap_key_data(layer_keys)

    def run_layer(layer, p, x, layer_keys_b, per_example):
      if keys is None:
        return layer.apply(p, x, train=train, key=None)
      if not per_example:
        return layer.apply(p, x, train=train, key=layer_keys_b[0])
      one = lambda x_i, k_i: layer.apply(p, x_i[None], train=train, key=k_i)[0]
      return jax.vmap(one)(x, layer_keys_b)

    for start, end in self._runs[k]:
      layer = layers[start]
      per_example = self._key_layers[first + start]
      offset, size, unravel_layer = slices[start]
      if end - start == 1:
        x = run_layer(layer, unravel_layer(flat[offset:offset + size]), x,
                      None if keys is None else keys[:, start], per_example)
        continue
      # The run's parameters are contiguous in the flat vector: one reshape
      # gives them stacked, whatever the number of layers.
      region = flat[offset:offset + (end - start) * size].reshape(end - start, size)
      stacked = jax.vmap(unravel_layer)(region)

      def body(h, inputs, layer=layer, per_example=per_example):
        p, column = inputs
        return run_layer(layer, p, h, column, per_example), None

      columns = None if keys is None else jnp.swapaxes(keys[:, start:end], 0, 1)
      x, _ = jax.lax.scan(body, x, (stacked, columns))
    if k == self.num_virtual_stages - 1:
      return x
    x = x.reshape(b, -1)
    return jnp.pad(x, ((0, 0), (0, self.activation_width - x.shape[1])))

  def make_grad_fn(
      self, *, loss: str | losses.Objective | Callable = "cross_entropy",
      bucket_bytes: int = collectives.DEFAULT_BUCKET_BYTES,
      flatten_buckets: bool = True, deterministic: bool = False,
      train: bool = True, return_stats: bool = False, _fill: float = 0.0,
  ) -> Callable:
    """``(stacked_params, (x, y), key) -> (loss, stacked_grads)``.

    Global shapes: ``x: [B, ...]``, ``y: [B, ...]`` sharded over ``data``
    (each data replica's ``B / data`` examples are cut into ``M``
    microbatches); ``stacked_params`` and the gradient ``[S, v, N]`` sharded
    over ``stage``; ``loss`` a replicated scalar, the mean over the batch.
    With ``return_stats`` a third result counts, per device (``[S]``), the
    ticks the program ran (``ticks``) and those that ran an op (``busy``).
    ``_fill`` is the value of never-written buffer entries (tests poison it
    with NaN to show idle ticks leak nothing).
    """
    objective = losses.objective(loss)
    schedule, mesh = self.schedule, self.mesh
    S, v, M = schedule.num_stages, schedule.virtual_stages, schedule.num_microbatches
    K, N, D = self.num_virtual_stages, self.param_width, self.activation_width
    slots = _slots(schedule)
    representatives = sorted(set(self.stage_groups))
    branch_of = [representatives.index(g) for g in self.stage_groups]
    tabs = _tables(schedule, slots, branch_of)
    split = schedule.split_backward
    data = axis_size(mesh, DATA)

    def mean_loss(out, y):
      return jnp.mean(objective.loss(out, y)) / M

    def branches(mb: int):
      axes = (DATA, STAGE)
      zeros_act = lambda: _varying(jnp.zeros((mb, D), jnp.float32), axes)
      zeros_p = lambda: _varying(jnp.zeros((N,), jnp.float32), axes)
      zero = lambda: _varying(jnp.zeros((), jnp.float32), axes)

      def idle(flat, x, cot, y, key):
        return zeros_p(), zero(), zeros_act(), zeros_act()

      def forward(k):
        def run(flat, x, cot, y, key):
          out = self._stage_forward(k, flat, x, key if use_keys else None, train)
          if k == K - 1:
            return zeros_p(), mean_loss(out, y), zeros_act(), zeros_act()
          return zeros_p(), zero(), out.astype(jnp.float32), zeros_act()
        return run

      def objective_of(k, y, key):
        key = key if use_keys else None
        if k == K - 1:
          return lambda f, x: mean_loss(self._stage_forward(k, f, x, key, train), y)
        return lambda f, x: self._stage_forward(k, f, x, key, train)

      def seed(k, cot):
        return _varying(jnp.ones((), jnp.float32), axes) if k == K - 1 else cot

      def backward(k):  # full, or input-gradient half when split
        def run(flat, x, cot, y, key):
          fn = objective_of(k, y, key)
          if split:
            _, vjp = jax.vjp(lambda x: fn(flat, x), x)
            (dx,) = vjp(seed(k, cot))
            return zeros_p(), zero(), zeros_act(), dx
          _, vjp = jax.vjp(fn, flat, x)
          dflat, dx = vjp(seed(k, cot))
          return dflat, zero(), zeros_act(), dx
        return run

      def weight(k):
        def run(flat, x, cot, y, key):
          fn = objective_of(k, y, key)
          _, vjp = jax.vjp(lambda f: fn(f, x), flat)
          (dflat,) = vjp(seed(k, cot))
          return dflat, zero(), zeros_act(), zeros_act()
        return run

      reps = representatives
      out = [idle] + [forward(k) for k in reps] + [backward(k) for k in reps]
      out += [weight(k) for k in reps] if split else [idle] * len(reps)
      return out

    use_keys = train and any(self._key_layers)
    n_max = self._max_layers
    first_layer = jnp.asarray(self.bounds[:-1], jnp.int32)  # of each virtual stage

    def local(stacked, x, y, key, tables):
      # stacked: [1, v, N] (this device's stages); x: [b, ...]; y: [b, ...].
      d = jax.lax.axis_index(STAGE)
      first_row = jax.lax.axis_index(DATA) * x.shape[0]  # global index of x[0]
      flat_params = _varying(stacked[0], (DATA, STAGE))  # own gradient, no implicit psum
      b = x.shape[0]
      mb = b // M
      xs = x.reshape(M, mb, -1)
      xs = jnp.pad(xs, ((0, 0), (0, 0), (0, D - xs.shape[-1]))).astype(jnp.float32)
      ys = y.reshape(M, mb, *y.shape[1:])
      all_branches = branches(mb)
      axes = (DATA, STAGE)
      fill = lambda shape: _varying(jnp.full(shape, _fill, jnp.float32), axes)
      carry = (
          _varying(jnp.zeros((v, N), jnp.float32), axes),  # gradient accumulator
          _varying(jnp.zeros((), jnp.float32), axes),  # loss accumulator
          fill((v, slots.num_act, mb, D)),  # received activations (stage inputs)
          fill((v, slots.num_cot, mb, D)),  # received cotangents
          _varying(jnp.zeros((2,), jnp.int32), axes),  # ticks run, ticks busy
      )

      def tick(carry, row):
        grads, loss_sum, act_buf, cot_buf, counts = carry
        entry = {name: row[name][d] for name in row}
        c, m = entry["chunk"], entry["micro"]
        k = c * S + d
        x_in = jnp.where(k == 0, xs[m], act_buf[c, entry["act_slot"]])
        cot_in = cot_buf[c, entry["cot_slot"]]
        if use_keys:  # this microbatch's examples' keys for this stage's layers
          keys = jax.lax.dynamic_slice_in_dim(
              self._layer_keys(key, first_row + m * mb, mb), first_layer[k], n_max, axis=1)
        else:
          keys = _varying(jnp.zeros((), jnp.uint32), axes)
        dflat, dloss, act_out, cot_out = jax.lax.switch(
            entry["branch"], all_branches, flat_params[c], x_in, cot_in, ys[m], keys)
        grads = grads.at[c].add(dflat)
        loss_sum = loss_sum + dloss
        with jax.named_scope("pipeline_send"):
          act_recv = jax.lax.ppermute(act_out, STAGE, [(i, (i + 1) % S) for i in range(S)])
          cot_recv = jax.lax.ppermute(cot_out, STAGE, [(i, (i - 1) % S) for i in range(S)])

        def store(buf, value, chunk, slot):
          ok = chunk >= 0
          chunk, slot = jnp.maximum(chunk, 0), jnp.maximum(slot, 0)
          return buf.at[chunk, slot].set(jnp.where(ok, value, buf[chunk, slot]))

        act_buf = store(act_buf, act_recv, entry["recv_act_chunk"], entry["recv_act_slot"])
        cot_buf = store(cot_buf, cot_recv, entry["recv_cot_chunk"], entry["recv_cot_slot"])
        counts = counts + jnp.stack([1, (entry["branch"] != IDLE).astype(jnp.int32)])
        return (grads, loss_sum, act_buf, cot_buf, counts), None

      with jax.named_scope("pipeline_ticks"):
        (grads, loss_sum, _, _, counts), _ = jax.lax.scan(tick, carry, tables)
      loss_value = jax.lax.pmean(jax.lax.psum(loss_sum, STAGE), DATA)
      with jax.named_scope("gradient_exchange"):
        grads = collectives.pmean_bucketed(
            grads, DATA, bucket_bytes=bucket_bytes, flatten=flatten_buckets,
            ordered_size=data if deterministic else None)
      # counts: the same on every data replica; report data replica 0's.
      counts = jax.lax.psum(jnp.where(jax.lax.axis_index(DATA) == 0, counts, 0), DATA)
      return loss_value, grads[None], counts[None]

    table_arrays = {name: jnp.asarray(a) for name, a in tabs.items()}
    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(STAGE), P(DATA), P(DATA), P(), P()),
        out_specs=(P(), P(STAGE), P(STAGE)),
    )
    batch_sharding = NamedSharding(mesh, P(DATA))

    def grad_fn(stacked, batch, key):
      x, y = batch
      check_batch_size(x.shape[0], mesh, M, what="microbatches")
      x, y = (jax.reshard(a, batch_sharding) for a in (x, y))
      stacked = jax.reshard(stacked, self.stacked_sharding())  # no-op when already so
      loss_value, grads, counts = sharded(stacked, x, y, key, table_arrays)
      if return_stats:
        return loss_value, grads, {"ticks": counts[:, 0], "busy": counts[:, 1]}
      return loss_value, grads

    return grad_fn


def make_pipeline(
    model: Model, mesh: Mesh, example_shape: Sequence[int], *,
    schedule: str | sched.Schedule = "1f1b", microbatches: int | None = None,
    virtual_stages: int = 1, bounds: Sequence[int] | None = None,
) -> Pipeline:
  """Cuts ``model`` (which must have ``layers``) into stages over ``stage``.

  Args:
    model: a model with ``layers`` (e.g. :func:`meshnet.models.mlp`, or
      :func:`meshnet.model.sequential` of your own layers). Stages may have
      any shapes.
    mesh: the mesh; its ``stage`` size is the number of devices ``S``.
    example_shape: shape of one input example, e.g. ``(784,)``.
    schedule: a name in :data:`~meshnet.pipeline.schedules.SCHEDULES` or a
      :class:`~meshnet.pipeline.schedules.Schedule` (e.g. from
      :func:`~meshnet.pipeline.schedules.custom`).
    microbatches: ``M`` (default ``S``); ignored for a Schedule object.
    virtual_stages: chunks per device (interleaved schedules).
    bounds: layer boundaries of the ``S * v`` stages (default: balanced by
      parameter count).

  Raises:
    MeshnetError: no layers, more stages than layers, bad bounds, or a
      schedule that does not fit (see :func:`~meshnet.pipeline.schedules.make_schedule`).
  """
  if not model.layers:
    raise MeshnetError(
        "pipelining needs a model made of layers (Model(..., layers=...), e.g. "
        "meshnet.models.mlp or meshnet.model.sequential); this model has none")
  S = axis_size(mesh, STAGE)
  params = jax.eval_shape(model.init, jax.random.key(0))
  if not isinstance(params, (list, tuple)) or len(params) != len(model.layers):
    raise MeshnetError(
        f"a pipelined model's init must return a list or tuple with one entry per layer "
        f"({len(model.layers)}), got {type(params).__name__}; build it with "
        "meshnet.sequential(layers)")
  if isinstance(schedule, sched.Schedule):
    plan = schedule
    if plan.num_stages != S:
      raise MeshnetError(
          f"schedule has {plan.num_stages} stages but the mesh has stage={S}")
  else:
    plan = sched.make_schedule(schedule, S, microbatches or S, virtual_stages)
  K = S * plan.virtual_stages
  n_layers = len(model.layers)
  if bounds is None:
    bounds = balanced_bounds(layer_param_counts(model.layers), K)
  else:
    if K > n_layers:
      balanced_bounds([1] * n_layers, K)  # raises the "more stages than layers" error
    bounds = check_bounds(bounds, n_layers, K)
  example_shape = tuple(int(s) for s in example_shape)

  # Shapes of every stage's parameters and boundary activations (abstractly),
  # and, inside each stage, runs of identical layers to scan over.
  unravel, sizes, shapes, runs, slices, key_layers = [], [], [example_shape], [], [], []
  x = jax.ShapeDtypeStruct((2, *example_shape), jnp.float32)
  for k in range(K):
    stage = list(params[bounds[k]:bounds[k + 1]])
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), stage)
    flat, fn = ravel_pytree(zeros)
    unravel.append(fn)
    sizes.append(int(flat.shape[0]))
    signatures, layer_slices, offset = [], [], 0
    for p in zeros:
      layer_flat, layer_unravel = ravel_pytree(p)
      layer_slices.append((offset, int(layer_flat.shape[0]), layer_unravel))
      offset += int(layer_flat.shape[0])
    for layer, p in zip(model.layers[bounds[k]:bounds[k + 1]], stage):
      y = jax.eval_shape(functools.partial(layer.apply, train=True), p, x,
                         key=jax.random.key(0))
      same_shape = (y.shape, y.dtype) == (x.shape, x.dtype)
      signatures.append(_signature(layer.apply, p, x) if same_shape else None)
      key_layers.append(uses_key(layer.apply, p, x))
      x = y
    runs.append(_identical_runs(signatures))
    slices.append(tuple(layer_slices))
    shapes.append(tuple(x.shape[1:]))
  pipe = Pipeline(model, mesh, plan, tuple(bounds), example_shape, tuple(unravel),
                  tuple(sizes), tuple(int(np.prod(s)) for s in shapes[:-1]),
                  _shapes=tuple(shapes), _runs=tuple(runs), _layer_slices=tuple(slices),
                  _key_layers=tuple(key_layers))
  return dataclasses.replace(pipe, _groups=_stage_groups(pipe))


def _const_digest(value: Any) -> tuple:
  """Shape, dtype and SHA-256 of a constant's bytes (a key: of its key data)."""
  if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype,
                                                             jax.dtypes.prng_key):
    value = jax.random.key_data(value)
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    array = np.ascontiguousarray(np.asarray(jax.device_get(value)))
    return (array.shape, str(array.dtype), hashlib.sha256(array.tobytes()).hexdigest())
  return (repr(value),)


def _nested_consts(closed: Any) -> list[tuple]:
  """Digests of the constants of ``closed`` and of every program nested in
  its equations (inner ``jit``, ``scan``, ``cond`` bodies...): printing a
  jaxpr names constants but not their values."""
  digests = [_const_digest(c) for c in getattr(closed, "consts", ())]
  jaxpr = getattr(closed, "jaxpr", closed)
  for eqn in getattr(jaxpr, "eqns", ()):
    for param in eqn.params.values():
      for inner in (param if isinstance(param, (tuple, list)) else (param,)):
        if hasattr(inner, "eqns") or hasattr(inner, "consts"):
          digests.extend(_nested_consts(inner))
  return digests


def _signature(fn: Callable, *args) -> tuple:
  """What ``fn(*args, train=..., key=...)`` computes, forward and backward,
  in training and in evaluation: equal signatures mean the same function of
  the arguments. The backward program is part of it because custom
  derivative rules (``custom_vjp``/``custom_jvp``) appear only there; the
  values of every constant, nested programs' included, are part of it
  because a jaxpr's text does not show them."""
  signature = []
  for train in (True, False):
    def forward_and_backward(*a, train=train):
      *inputs, key = a
      out, vjp = jax.vjp(lambda *i: fn(*i, train=train, key=key), *inputs)
      return out, vjp(out)

    closed = jax.make_jaxpr(forward_and_backward)(*args, jax.random.key(0))
    signature.append((str(closed), tuple(_nested_consts(closed))))
  return tuple(signature)


def _identical_runs(signatures: Sequence[Any]) -> tuple[tuple[int, int], ...]:
  """``(start, end)`` of each maximal run of layers with one signature
  (``None``: not scannable, a run of its own)."""
  runs, start = [], 0
  for i in range(1, len(signatures) + 1):
    if (i == len(signatures) or signatures[i] is None or signatures[i] != signatures[start]):
      runs.append((start, i))
      start = i
  return tuple(runs)


def _stage_groups(pipe: Pipeline) -> tuple[int, ...]:
  """Groups virtual stages whose traced computation is identical."""
  flat = jax.ShapeDtypeStruct((pipe.param_width,), jnp.float32)
  x = jax.ShapeDtypeStruct((2, pipe.activation_width), jnp.float32)
  signatures = []
  for k in range(pipe.num_virtual_stages):
    def fn(f, x, *, train, key, k=k):
      keys = jax.random.key_data(jax.random.split(key, (x.shape[0], pipe._max_layers)))
      return pipe._stage_forward(k, f, x, keys, train)

    signatures.append(_signature(fn, flat, x))
  return tuple(signatures.index(sig) for sig in signatures)
