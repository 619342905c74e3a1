"""The pipeline executor: one ``shard_map`` program that follows a schedule.

Layout. The model's layers are cut into ``K = S * v`` virtual stages (``S``
devices on ``stage``, ``v`` chunks each); virtual stage ``k = c * S + d`` is
chunk ``c`` of device ``d``. Each virtual stage's parameters are raveled into
one vector, padded to the longest (``N``), and stacked as a global array
``[S, v, N]`` sharded over ``stage`` (``Pipeline.stack``; the train step
does it from the parameters as the state keeps them each step, and moves the
gradient back with ``Pipeline.unstack``: one ``all_to_all`` each way where
:mod:`meshnet.pipeline.restack` applies, else gathers; so the optimizer always sees the
model's own tree: a list, or any tree a model's ``to_layers``/``from_layers``
view as its layers, e.g. a gpt's stacked blocks). Activations between stages
are raveled per example and padded to the widest boundary ``D``; a first
stage whose computation no other stage shares (a gpt's embedding) reads its
microbatch as it is (``int32`` tokens ``[mb, T]``).

Inside a stage, a run of identical layers (same program, shapes and closed-over
values, in training and in evaluation) longer than :data:`UNROLL_LAYERS` is
one ``lax.scan`` over their parameters, which are contiguous in the flat
vector (shorter runs are unrolled, each layer on its own slices); stages whose whole
computation is identical share one branch. Layers that read their key run per
example with the key of the example's global index (as
:func:`meshnet.model.apply_train` runs an unpipelined model), so dropout
masks do not depend on the schedule, microbatch or stage. The compiled
program therefore does not grow with the number of blocks or stages (past
:data:`UNROLL_LAYERS` per stage).

Execution. The schedule is packed into lockstep rounds
(:mod:`meshnet.pipeline.rounds`): in each round every device runs up to one
forward, one backward (the input half when split) and one weight-gradient
op, each a ``lax.switch`` over idle and the stage groups, then activations
move one device forward and cotangents one device back with ``ppermute``
(circular, so chunk ``c`` of the last device feeds chunk ``c + 1`` of the
first; at ``S = 2`` both go in one exchange). A forward keeps its vjp
residuals, packed (:mod:`meshnet.pipeline.residuals`: only what depends on
the microbatch; weights are re-sliced from the parameters), for the
backward, so nothing is recomputed; with ``remat=True`` it keeps the stage
input instead and the backward recomputes the forward. Split schedules
(ZB-H1) run each stage's backward as two halves cut from one trace
(:mod:`meshnet.pipeline.split`): the input half computes ``dx`` and
*carries* the cotangents the weight half needs (a dense layer's
pre-activation cotangent), so the weight half computes only the weight
gradients, not the input gradients again. Received
activations, cotangents, residuals and carried cotangents live in ring buffers whose slots
:mod:`meshnet.pipeline.plan` assigns; what a round produces is stored at the
start of the next one, so the switches only read the buffers (XLA copies a
buffer that a conditional reads and the same iteration then writes). The
``data`` axis averages the result with a bucketed ``pmean``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshnet import collectives, losses, sharded
from meshnet.compute import check_precision, check_remat, precision_layers, remat_model
from meshnet.errors import MeshnetError
from meshnet.mesh import DATA, FSDP, STAGE, TENSOR, axis_size
from meshnet.sharding import (Rules, batch_axes, batch_sharding, batch_spec, param_specs,
                              storage_specs)
from meshnet.model import Model, example_keys, layer_params, model_params, uses_key
from meshnet.step import check_batch_size
from meshnet.pipeline import plan, residuals, restack, rounds as packing, split as halves
from meshnet.pipeline import schedules as sched
from meshnet.pipeline.stages import (balanced_bounds, check_balance, check_bounds,
                                     default_bounds)


HOIST_BYTES = 1 << 28
"""A pipelined step cuts each stage group's parameters out of the stage
vector once per step (instead of once per op) when one copy per group
costs each device at most this many bytes (float32 ``N`` per group)."""

UNROLL_LAYERS = 4
"""Runs of identical layers up to this long run unrolled inside a stage (on
each layer's own slices of the stage vector); longer ones are one
``lax.scan``, so the compiled program stays small for deep stages."""


def _varying(x: jax.Array, axes: Sequence[str]) -> jax.Array:
  """``x`` marked as varying over ``axes`` (those it is not varying over yet)."""
  have = jax.typeof(x).manual_axis_type.varying
  missing = tuple(a for a in axes if a not in have)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


@dataclasses.dataclass(frozen=True)
class _RunLayout:
  """Where a run of identical layers keeps its parameters in a stage's flat
  vectors: leaf by leaf (every layer's ``w``, then every layer's ``b``...),
  so a run's stacked leaves are contiguous slices (views, not copies).

  A stage has two flat vectors: ``whole`` ``[size]`` holds the leaves not
  split over ``tensor``; ``split`` ``[T, split_size]`` holds, in row ``t``,
  tensor block ``t`` of each leaf split over ``tensor`` (the compiler keeps
  row ``t`` on the devices of ``tensor`` index ``t``, so each holds only its
  blocks).

  Attributes:
    layers: how many layers the run has (``n``).
    treedef: one layer's parameter tree structure.
    shapes: each leaf's shape in one layer (global).
    dtypes: each leaf's dtype.
    split_dims: per leaf, the dimension split over ``tensor`` (``None``:
      the leaf goes whole in every tensor block).
    tensor: the ``tensor`` size ``T``.
  """

  layers: int
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[Any, ...]
  split_dims: tuple[int | None, ...] = ()
  tensor: int = 1

  def _dim(self, i: int) -> int | None:
    return self.split_dims[i] if self.split_dims else None

  def _count(self, i: int) -> int:
    """Elements of leaf ``i`` in one layer's block of its vector."""
    n = int(np.prod(self.shapes[i], dtype=np.int64))
    return n if self._dim(i) is None else n // self.tensor

  @property
  def size(self) -> int:
    """Elements of the run in the ``whole`` vector."""
    return self.layers * sum(self._count(i) for i in range(len(self.shapes))
                             if self._dim(i) is None)

  @property
  def split_size(self) -> int:
    """Elements of the run in each row of the ``split`` vector."""
    return self.layers * sum(self._count(i) for i in range(len(self.shapes))
                             if self._dim(i) is not None)

  def _local(self, i: int) -> tuple[int, ...]:
    shape, j = self.shapes[i], self._dim(i)
    return (*shape[:j], shape[j] // self.tensor, *shape[j + 1:])

  def stacked(self, piece: jax.Array, split_piece: jax.Array | None = None) -> Any:
    """The run's ``[size]`` slice of ``whole`` (and ``[T, split_size]``
    slice of ``split``) -> its parameter tree with a leading ``[n]`` axis."""
    n, T = self.layers, self.tensor
    leaves, offset, split_offset = [], 0, 0
    for i, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes)):
      count = n * self._count(i)
      j = self._dim(i)
      if j is None:
        leaf = piece[offset:offset + count].reshape(n, *shape)
        offset += count
      else:  # [T, n, *local] -> [n, .., T * local_j, ..]: block t is rows t of dim j
        block = split_piece[:, split_offset:split_offset + count]
        block = jnp.moveaxis(block.reshape(T, n, *self._local(i)), 0, 1 + j)
        leaf = block.reshape(n, *shape)
        split_offset += count
      leaves.append(leaf.astype(dtype))
    return jax.tree.unflatten(self.treedef, leaves)

  def layers_of(self, piece: jax.Array) -> list[Any]:
    """Each layer's parameter tree out of the run's ``[size]`` slice of
    ``whole`` (no leaf split over ``tensor``), cut with one split, whose
    transpose in the backward is one concatenate: each layer's gradient is
    written straight into its place in the stage's gradient (no stacked
    copy, no per-layer dynamic slice, no padded add per leaf)."""
    n = self.layers
    counts = [self._count(j) for j in range(len(self.shapes))]
    cuts = np.cumsum([c for c in counts for _ in range(n)])[:-1].tolist()
    parts = jnp.split(piece, cuts)  # leaf 0 of layers 0..n-1, leaf 1 of ...
    return [jax.tree.unflatten(self.treedef, [
        parts[j * n + i].reshape(shape).astype(dtype)
        for j, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes))])
        for i in range(n)]

  def ravel(self, layer_params: Sequence[Any], dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The run's layers' parameters (one tree each) -> its slices of the
    ``whole`` vector ``[size]`` and the ``split`` vector ``[T, split_size]``."""
    n, T = self.layers, self.tensor
    whole, split = [], []
    per_leaf = zip(*(jax.tree.leaves(p) for p in layer_params))
    for i, leaf in enumerate(per_leaf):
      stacked = jnp.stack(leaf).astype(dtype)  # [n, *shape]
      j = self._dim(i)
      if j is None:
        whole.append(stacked.reshape(-1))
      else:
        shape = self.shapes[i]
        blocks = stacked.reshape(n, *shape[:j], T, shape[j] // T, *shape[j + 1:])
        split.append(jnp.moveaxis(blocks, 1 + j, 0).reshape(T, -1))
    return (jnp.concatenate(whole) if whole else jnp.zeros((0,), dtype),
            jnp.concatenate(split, axis=1) if split else jnp.zeros((T, 0), dtype))


def _ravel_stage(layouts: Sequence[_RunLayout], params: Sequence[Any],
                 dtype: Any) -> tuple[jax.Array, jax.Array]:
  """A stage's layers' parameters -> its ``whole`` and ``split`` vectors."""
  whole, split, i = [], [], 0
  for run in layouts:
    w, s = run.ravel(params[i:i + run.layers], dtype)
    whole.append(w)
    split.append(s)
    i += run.layers
  return jnp.concatenate(whole), jnp.concatenate(split, axis=1)


def _unravel_stage(layouts: Sequence[_RunLayout], flat: jax.Array,
                   split: jax.Array | None) -> list[Any]:
  """Inverse of :func:`_ravel_stage`: one parameter tree per layer."""
  params, offset, split_offset = [], 0, 0
  for run in layouts:
    stacked = run.stacked(flat[offset:offset + run.size],
                          None if split is None else
                          split[:, split_offset:split_offset + run.split_size])
    params.extend(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(run.layers))
    offset += run.size
    split_offset += run.split_size
  return params


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
    input_dtype: the inputs' dtype.
  """

  model: Model
  mesh: Mesh
  schedule: sched.Schedule
  bounds: tuple[int, ...]
  example_shape: tuple[int, ...]
  input_dtype: Any
  _sizes: tuple[int, ...]
  _widths: tuple[int, ...]  # flattened activation size entering stage k; last = output
  _groups: tuple[int, ...] = ()  # stage k computes what stage _groups[k] computes
  _shapes: tuple[tuple[int, ...], ...] = ()  # per-example activation entering stage k
  _runs: tuple[tuple[tuple[int, int], ...], ...] = ()  # per stage: runs of identical layers
  _run_layouts: tuple[tuple[_RunLayout, ...], ...] = ()  # per stage, per run
  _key_layers: tuple[bool, ...] = ()  # per layer: reads its key when training (dropout)
  remat: bool = False
  _boundary_dtypes: tuple[Any, ...] = ()  # dtype of the activation entering stage k >= 1
  _split_sizes: tuple[int, ...] = ()  # per virtual stage: elements per row of ``split``
  _storage: Any = None  # the state's parameter specs (sharding.storage_specs)
  _raw_first: bool = False  # stage 0 reads its microbatch as it is (its own group)

  @functools.cached_property
  def rounds(self) -> packing.Rounds:
    """The schedule packed into the lockstep rounds the program runs."""
    return packing.pack(self.schedule)

  @property
  def stage_groups(self) -> tuple[int, ...]:
    """For each virtual stage, the first stage whose computation is the same
    (same layers' code and shapes). Stages that share one share a branch of
    the compiled program, so L identical blocks compile to the same program
    for any depth and stage count."""
    return self._groups or tuple(range(self.num_virtual_stages))

  def computes_input_grad(self, k: int) -> bool:
    """Whether virtual stage ``k``'s backward computes its input gradient:
    every stage's does but the first's when no other stage runs its branch
    (its input is the data, which nothing differentiates)."""
    return not (k == 0 and self.stage_groups.count(0) == 1)

  @property
  def num_virtual_stages(self) -> int:
    return len(self.bounds) - 1

  @property
  def fsdp(self) -> int:
    return axis_size(self.mesh, FSDP)

  @property
  def tensor(self) -> int:
    return axis_size(self.mesh, TENSOR)

  @property
  def param_width(self) -> int:
    """``N``: elements of a stage's ``whole`` vector (the longest stage's,
    rounded up to a multiple of ``fsdp``, which splits it)."""
    return _round_up(max(self._sizes), self.fsdp)

  @property
  def split_width(self) -> int:
    """``N_t``: elements per tensor block of a stage's ``split`` vector
    (0 when no parameter is split over ``tensor``)."""
    return _round_up(max(self._split_sizes or (0,)), self.fsdp)

  @property
  def stage_param_counts(self) -> tuple[int, ...]:
    """Parameters of each virtual stage (its ``whole`` vector plus every
    tensor block of its ``split`` one), before padding."""
    splits = self._split_sizes or (0,) * len(self._sizes)
    return tuple(n + self.tensor * t for n, t in zip(self._sizes, splits))

  @property
  def stage_padding(self) -> float:
    """What every stage's vectors hold (the longest stage's ``N + T N_t``,
    as one SPMD program gives every device the same buffers) over the mean
    stage's parameters: 1.0 when the stages are equal. The default
    ``bounds`` balance parameters, so this is what the layers' granularity
    leaves."""
    counts = self.stage_param_counts
    return (self.param_width + self.tensor * self.split_width) / (sum(counts) / len(counts))

  @property
  def activation_width(self) -> int:
    return max(self._widths)

  @property
  def activation_dtype(self) -> Any:
    """The dtype activations and their cotangents move between stages in:
    the stages' own when every boundary has the same one (bfloat16 with
    ``precision="bf16"``), else float32 (every floating dtype converts to it
    and back exactly). The first stage's input is cast to it."""
    dtypes = set(self._boundary_dtypes)
    return dtypes.pop() if len(dtypes) == 1 else jnp.dtype(jnp.float32)

  def stage_params(self, params: Sequence[Any], k: int) -> list[Any]:
    """Stage ``k``'s entries of per-layer ``params`` (:func:`~meshnet.model.layer_params`)."""
    return list(params[self.bounds[k]:self.bounds[k + 1]])

  def stacked_sharding(self) -> NamedSharding | tuple[NamedSharding, NamedSharding]:
    """``whole`` ``[S, v, N]`` over ``stage`` (and ``fsdp`` on ``N``); with a
    ``split`` part, also ``[S, v, T, N_t]`` over ``stage``, ``tensor`` (and
    ``fsdp``)."""
    fsdp = FSDP if self.fsdp > 1 else None
    whole = NamedSharding(self.mesh, P(STAGE, None, fsdp) if fsdp else P(STAGE))
    if not self.split_width:
      return whole
    return whole, NamedSharding(self.mesh, P(STAGE, None, TENSOR, fsdp))

  def param_shardings(self) -> Any:
    """Where the train state keeps the model's own parameters
    (:func:`meshnet.sharding.storage_specs`: split over ``stage`` too)."""
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self._storage,
                        is_leaf=lambda x: isinstance(x, P))

  def _tensor_only(self, tree: Any, specs: Any) -> Any:
    """``tree`` gathered over every axis but ``tensor`` (whose split, given
    by ``specs``, is left to the compiler): the layout the flat vectors are
    built from and taken apart into."""
    replicated = NamedSharding(self.mesh, P())
    tree = jax.tree.map(lambda a: jax.reshard(a, replicated), tree)
    if self.tensor == 1:
      return tree
    return jax.tree.map(
        lambda a, spec: jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, spec)),
        tree, specs, is_leaf=lambda x: isinstance(x, P))

  def _stored(self, params: list[Any]) -> list[Any]:
    """``params`` (inside ``jit``) laid out, and typed, as the train state
    keeps them: ``jax.reshard`` places the ``Explicit`` axes, a sharding
    constraint ``tensor`` (an ``Auto`` axis). Without it the optimizer would
    see whole gradients and gather its own state to meet them."""
    is_spec = lambda x: isinstance(x, P)
    explicit = jax.tree.map(
        lambda spec: P(*(_drop_tensor(e) for e in spec)), self._storage, is_leaf=is_spec)
    params = jax.tree.map(lambda a, spec: jax.reshard(a, NamedSharding(self.mesh, spec)),
                          params, explicit, is_leaf=lambda x: is_spec(x) or x is None)
    if self.tensor == 1:
      return params
    return jax.tree.map(
        lambda a, spec: jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, spec)),
        params, self._leaf_tensor_specs(), is_leaf=lambda x: is_spec(x) or x is None)

  def _leaf_tensor_specs(self) -> list[Any]:
    """Per layer, each leaf's spec with only its ``tensor`` entry."""
    return jax.tree.map(
        lambda spec: P(*(TENSOR if TENSOR in _axes(e) and self.tensor > 1 else None
                         for e in spec)),
        self._storage, is_leaf=lambda x: isinstance(x, P))

  def _as_stored_tree(self, params: Any) -> Any:
    """``params`` (a list for a list of layers) as the tuple the train
    state keeps when the model's ``init`` returns a tuple."""
    return tuple(params) if isinstance(self._storage, tuple) else params

  @functools.cached_property
  def _restack(self) -> restack.Restack | None:
    """The ``all_to_all`` way between the state's layout and the stage
    vectors, where it applies (:func:`meshnet.pipeline.restack.supported`)."""
    if not restack.supported(self):
      return None
    return restack.Restack(
        self, lambda k, params: _ravel_stage(self._run_layouts[k], params, jnp.float32)[0],
        lambda k, row: _unravel_stage(self._run_layouts[k], row[:self._sizes[k]], None))

  @functools.cached_property
  def _stack_fn(self) -> Callable:
    if self._restack is not None:
      return jax.jit(self._restack.stack, out_shardings=self.stacked_sharding())
    S, v = self.schedule.num_stages, self.schedule.virtual_stages
    N, Nt, T = self.param_width, self.split_width, self.tensor

    def build(params):
      params = layer_params(self.model, self._tensor_only(params, self._leaf_tensor_specs()))
      rows, split_rows = [], []
      for k in range(self.num_virtual_stages):
        flat, split = _ravel_stage(self._run_layouts[k], self.stage_params(params, k),
                                   jnp.float32)
        rows.append(jnp.pad(flat, (0, N - flat.shape[0])))
        split_rows.append(jnp.pad(split, ((0, 0), (0, Nt - split.shape[1]))))
      stacked = jnp.stack(rows)  # [K, N], k = c * S + d
      whole = stacked.reshape(v, S, N).transpose(1, 0, 2)
      if not Nt:
        return whole
      split = jnp.stack(split_rows).reshape(v, S, T, Nt).transpose(1, 0, 2, 3)
      return whole, split

    return jax.jit(build, out_shardings=self.stacked_sharding())

  @functools.cached_property
  def _unstack_fn(self) -> Callable:
    if self._restack is not None:
      def moved(stacked):
        with jax.named_scope("stage_gather"):
          return self._as_stored_tree(self._restack.unstack(stacked))
      return jax.jit(moved, out_shardings=self.param_shardings())
    S = self.schedule.num_stages

    def split(stacked):
      whole, parts = (stacked[0], stacked[1]) if isinstance(stacked, tuple) else (stacked, None)
      with jax.named_scope("stage_gather"):  # gather the stages' slices
        whole = self._tensor_only(whole, P())
        if parts is not None:
          parts = self._tensor_only(parts, P(None, None, TENSOR, None))
      params: list[Any] = []
      for k in range(self.num_virtual_stages):
        d, c = k % S, k // S
        params.extend(_unravel_stage(
            self._run_layouts[k], whole[d, c, :self._sizes[k]],
            None if parts is None else parts[d, c, :, :self._split_sizes[k]]))
      return self._stored(self._as_stored_tree(model_params(self.model, params)))

    return jax.jit(split, out_shardings=self.param_shardings())

  def stack(self, params: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The model's own params (a list, one entry per layer, or the tree
    :attr:`Model.to_layers` takes apart) -> ``whole`` ``[S, v, N]`` (and,
    when some parameters are split over ``tensor``, ``(whole, split [S, v,
    T, N_t])``), laid out as :meth:`stacked_sharding` says."""
    return self._stack_fn(list(params) if self.model.to_layers is None else params)

  def unstack(self, stacked: jax.Array | tuple[jax.Array, jax.Array]) -> Any:
    """The inverse of ``stack``: the model's own params, laid out as the
    train state keeps them (:meth:`param_shardings`)."""
    return self._unstack_fn(stacked)

  def _here(self, spec: P) -> NamedSharding:
    """``spec`` on the mesh in context: inside the program the one whose
    ``data``/``stage``/``fsdp`` are manual, else :attr:`mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    return NamedSharding(self.mesh if mesh.empty else mesh, spec)

  def _whole_over_tensor(self, x: jax.Array) -> jax.Array:
    """``x`` (inside the program) kept whole on every ``tensor`` device.

    An activation crossing a stage boundary is sliced and padded there; if
    the compiler left it split over ``tensor`` it would exchange halos with
    ``collective-permute`` s inside the switch's branches, which devices on
    other stages do not run (on CPU a deadlock).
    """
    if self.tensor == 1:
      return x
    return jax.lax.with_sharding_constraint(x, self._here(P()))

  def _split_over_tensor(self, run: _RunLayout, stacked: Any) -> Any:
    """A run's stacked parameters ``[n, ...]`` (inside the program) with
    each leaf split over ``tensor`` as the rules say (and the others whole),
    so the compiler adds only the Megatron reductions."""
    if self.tensor == 1:
      return stacked
    leaves, treedef = jax.tree.flatten(stacked)
    specs = [P(*(None,) * a.ndim) if j is None else
             P(*(TENSOR if d == 1 + j else None for d in range(a.ndim)))
             for a, j in zip(leaves, run.split_dims)]
    return jax.tree.unflatten(treedef, [jax.lax.with_sharding_constraint(a, self._here(spec))
                                        for a, spec in zip(leaves, specs)])

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

  def _stage_tree(self, k: int, flat: jax.Array) -> list:
    """Stage ``k``'s parameters cut out of its ``whole`` vector ``[N]`` (no
    ``split`` part), as its runs read them: per run, the list of its
    layers' trees (runs up to :data:`UNROLL_LAYERS` long) or its stacked
    tree. Cut once per step (outside the rounds) they are not copied again
    by every op."""
    layouts = self._run_layouts[k]
    pieces = jnp.split(flat, np.cumsum([run.size for run in layouts]).tolist())
    return [run.layers_of(piece) if end - start <= UNROLL_LAYERS else run.stacked(piece)
            for (start, end), run, piece in zip(self._runs[k], layouts, pieces)]

  def _stage_forward(self, k: int, flat: jax.Array | tuple[jax.Array, jax.Array] | list,
                     x_pad: jax.Array, layer_keys: jax.Array | None, train: bool,
                     raw: bool = False):
    """Stage ``k`` on padded activations: ``[b, D] -> [b, D]`` (the last
    stage returns its real output shape ``[b, ...]``; with ``raw``, ``x_pad``
    is the input as it is, ``[b, *example_shape]`` in its own dtype). ``flat``: the stage's
    ``whole`` vector ``[N]``, or ``(whole, split [T, N_t])``, or what
    :meth:`_stage_tree` cut out of ``whole``. ``layer_keys``:
    ``[b, n]`` raw key data, column ``i`` for the stage's ``i``-th layer (a
    layer that reads its key runs per example with it, as
    :func:`~meshnet.model.apply_train` runs the whole model). A run of
    identical layers is one ``lax.scan`` over their stacked parameters, so
    the program does not grow with the number of blocks."""
    b = x_pad.shape[0]
    if raw:
      x = x_pad
    else:
      x_pad = self._whole_over_tensor(x_pad)
      x = x_pad[:, :self._widths[k]].reshape(b, *self._shapes[k])
    x = self._whole_over_tensor(x)
    first = self.bounds[k]
    layers = self.model.layers[first:self.bounds[k + 1]]
    keys = None if layer_keys is None else jax.random.wrap_key_data(layer_keys)

    def run_layer(layer, p, x, layer_keys_b, per_example):
      if keys is None:
        return layer.apply(p, x, train=train, key=None)
      if not per_example:
        return layer.apply(p, x, train=train, key=layer_keys_b[0])
      one = lambda x_i, k_i: layer.apply(p, x_i[None], train=train, key=k_i)[0]
      return jax.vmap(one)(x, layer_keys_b)

    # Each run's parameters are contiguous in the flat vector, leaf by leaf:
    # one split (whose transpose, in the backward, is one concatenate rather
    # than a padded add per run) and reshapes give them stacked, as views,
    # whatever the number of layers.
    layouts = self._run_layouts[k]
    cut = flat if isinstance(flat, list) else None
    flat, split = flat if isinstance(flat, tuple) else (flat, None)
    pieces = (cut if cut is not None else
              jnp.split(flat, np.cumsum([run.size for run in layouts]).tolist()))
    split_pieces = ([None] * len(layouts) if split is None else jnp.split(
        split, np.cumsum([run.split_size for run in layouts]).tolist(), axis=1))
    for (start, end), run, piece, split_piece in zip(self._runs[k], layouts, pieces,
                                                      split_pieces):
      layer = layers[start]
      per_example = self._key_layers[first + start]
      if cut is not None and end - start > UNROLL_LAYERS:  # stacked, cut already
        stacked = piece
      elif split_piece is None and end - start <= UNROLL_LAYERS:
        # Unrolled on each layer's own slices of the stage vector: a scan
        # would copy the run's weights out of the vector, then each layer's
        # out of the run, and write each layer's gradient back (measured:
        # about 50 ms of an 880 ms pipelined step on 4 layers of 1024^2).
        for i, p in enumerate(piece if cut is not None else run.layers_of(piece)):
          x = run_layer(layer, p, x,
                        None if keys is None else keys[:, start + i], per_example)
        continue
      else:
        stacked = self._split_over_tensor(run, run.stacked(piece, split_piece))
      if end - start == 1:
        x = run_layer(layer, jax.tree.map(lambda a: a[0], stacked), x,
                      None if keys is None else keys[:, start], per_example)
        continue

      def body(h, inputs, layer=layer, per_example=per_example):
        p, column = inputs
        return run_layer(layer, p, h, column, per_example), None

      columns = None if keys is None else jnp.swapaxes(keys[:, start:end], 0, 1)
      x, _ = jax.lax.scan(body, x, (stacked, columns), length=end - start)
    if k == self.num_virtual_stages - 1:
      return x
    x = self._whole_over_tensor(x).reshape(b, -1)
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
    rounds the program ran (``rounds``) and the ops it ran (``ops``).
    ``_fill`` is the value of never-written buffer entries (tests poison it
    with NaN to show idle slots leak nothing).
    """
    objective = losses.objective(loss)
    schedule, mesh = self.schedule, self.mesh
    S, v, M = schedule.num_stages, schedule.virtual_stages, schedule.num_microbatches
    K, D = self.num_virtual_stages, self.activation_width
    act = self.activation_dtype
    F, T = self.fsdp, self.tensor
    if deterministic and (F > 1 or T > 1):
      raise MeshnetError(
          f"deterministic=True with fsdp={F}, tensor={T} in a pipeline: the fixed-order "
          "average covers data only; drop --deterministic or use fsdp=tensor=1")
    over_batch = batch_axes(mesh)
    split = schedule.split_backward
    data = axis_size(mesh, DATA)
    reps = sorted(set(self.stage_groups))
    branch_of = [reps.index(g) for g in self.stage_groups]
    buffers = plan.plan(self.rounds, branch_of)
    tables = {name: jnp.asarray(a) for name, a in buffers.tables.items()}
    use_keys = train and any(self._key_layers)
    n_max = self._max_layers
    first_layer = jnp.asarray(self.bounds[:-1], jnp.int32)  # of each virtual stage
    axes = (DATA, STAGE, FSDP) if F > 1 else (DATA, STAGE)
    whole_spec = P(STAGE, None, FSDP) if F > 1 else P(STAGE)
    split_spec = P(STAGE, None, None, FSDP if F > 1 else None)
    stacked_specs = (whole_spec, split_spec) if self.split_width else whole_spec
    tensor_block = P(None, None, TENSOR)  # a split part's [., v, T, .]: tensor on dim 2

    def gather(stacked):
      """This device's ``fsdp`` pieces of its chunks -> whole chunks
      (``[1, v, N / F] -> [v, N]``; ``split`` ``[1, v, T, N_t / F] -> [v, T, N_t]``)."""
      with jax.named_scope("fsdp_gather"):
        if not isinstance(stacked, tuple):
          return (collectives.all_gather(stacked, FSDP, dim=2, tiled=True)[0] if F > 1
                  else stacked[0])
        whole, split = stacked
        if F > 1:
          whole = collectives.all_gather(whole, FSDP, dim=2, tiled=True)
          split = sharded.blockwise(
              lambda a: collectives.all_gather(a, FSDP, dim=3, tiled=True), mesh,
              (tensor_block,), tensor_block)(split)
        return whole[0], split[0]

    def exchange(grads):
      """Each device's ``[v, ...]`` gradient -> the mean over the batch axes,
      this device's ``fsdp`` piece (reduce-scattered, then averaged over data)."""
      def one(g, dim):
        if F > 1:
          with jax.named_scope("fsdp_scatter"):
            g = collectives.reduce_scatter(g, FSDP, dim=dim, op="mean")
        with jax.named_scope("gradient_exchange"):
          return collectives.pmean_bucketed(
              g, DATA, bucket_bytes=bucket_bytes, flatten=flatten_buckets,
              ordered_size=data if deterministic else None)
      if not isinstance(grads, tuple):
        return one(grads, 1)
      whole, split = grads
      block = P(None, TENSOR)
      return one(whole, 1), sharded.blockwise(lambda g: one(g, 2), mesh, (block,),
                                              block)(split)

    def mean_loss(out, y):
      return jnp.mean(objective.loss(out, y)) / M

    raw_first = self._raw_first  # stage 0 reads x as it is, else padded and cast

    def raw(k):
      return raw_first and k == 0

    def stage_fn(k):
      """``(flat, x, y, keys) -> output`` of virtual stage ``k`` (the last
      stage's output is its share of the loss)."""
      def fn(flat, x, y, keys):
        out = self._stage_forward(k, flat, x, keys if use_keys else None, train, raw(k))
        return mean_loss(out, y) if k == K - 1 else out.astype(act)
      return fn

    def program(stacked, x, y, key, tables):
      # stacked: [1, v, N] (this device's chunks); x: [b, ...]; y: [b, ...] (local).
      d = collectives.axis_index(STAGE)
      b = x.shape[0]
      mb = b // M
      first_row = collectives.axis_index(over_batch) * b  # global index of x[0]
      # [v, N] (and [v, T, N_t]): own gradient, no implicit psum
      flat_params = jax.tree.map(lambda a: _varying(a, axes), gather(stacked))
      if raw_first:  # [M, mb, ...] in the inputs' dtype (a gpt's int32 tokens)
        xs = x.reshape(M, mb, *x.shape[1:])
      else:  # [M, mb, D]: padded and cast like an activation between stages
        xs = x.reshape(M, mb, -1)
        xs = jnp.pad(xs, ((0, 0), (0, 0), (0, D - xs.shape[-1]))).astype(act)
      ys = y.reshape(M, mb, *y.shape[1:])
      zeros = lambda shape, dtype=jnp.float32: _varying(jnp.zeros(shape, dtype), axes)
      act_zeros = lambda: zeros((mb, D), act)  # an activation or its cotangent
      key_shape = (mb, n_max, *jax.random.key_data(key).shape) if use_keys else ()
      # Example arguments with this program's types (varying over the mesh axes).
      x_mb, y_mb, keys_mb = act_zeros(), _varying(ys[0], axes), zeros(key_shape, jnp.uint32)
      x_first = _varying(jnp.zeros_like(xs[0]), axes)  # stage 0's input

      def x_example(k):
        return x_first if raw(k) else x_mb

      def chunk_params(c):
        """``[N]`` (and ``[T, N_t]``) parameters of chunk ``c`` (a static
        index with one chunk: slices of it are then views, not copies)."""
        return jax.tree.map(lambda a: a[0] if v == 1 else a[c], flat_params)

      # Each stage group's parameters cut out of the stage vector once per
      # step, outside the rounds, so its ops read them in place instead of
      # copying them out again every op (one chunk, no tensor split; it
      # costs each device a copy of a stage per group: HOIST_BYTES).
      hoist = (v == 1 and not isinstance(flat_params, tuple)
               and len(reps) * self.param_width * 4 <= HOIST_BYTES)
      cut = {k: self._stage_tree(k, flat_params[0]) for k in reps} if hoist else {}
      # the cut's transpose: a gradient of the cut -> the stage vector's [N]
      uncut = {k: jax.vjp(lambda f, k=k: self._stage_tree(k, f), flat_params[0])[1]
               for k in cut}

      def params_of(k, c):
        """What stage group ``k``'s ops take as parameters, on chunk ``c``."""
        return cut[k] if hoist else chunk_params(c)

      param_zeros = lambda: jax.tree.map(lambda a: zeros(a.shape[1:]), flat_params)
      # Inside the switches' branches, which devices on other stages do not
      # run, every buffer and residual stays whole over tensor: a slice of a
      # value the compiler split over tensor would exchange halos with
      # collective-permutes there (a deadlock on CPU).
      whole = self._whole_over_tensor
      layouts = {} if self.remat else {
          k: residuals.layout(stage_fn(k), params_of(k, 0), x_example(k), y_mb, keys_mb)
          for k in reps}
      R = (max(mb * D, residuals.encode(x_first).shape[0]) if self.remat
           else max([1] + [lay.size for lay in layouts.values()]))

      def op_keys(m, k):
        """``[mb, n_max, 2]`` key data of microbatch ``m``'s examples for
        virtual stage ``k``'s layers (a dummy scalar without dropout)."""
        if not use_keys:
          return zeros((), jnp.uint32)
        rows = self._layer_keys(key, first_row + m * mb, mb)
        return jax.lax.dynamic_slice_in_dim(rows, first_layer[k], n_max, axis=1)

      # --- the branches of the three switches -------------------------------
      def forward(k):
        fn = stage_fn(k)

        def run(c, m, act_buf, act_slot, first, keys):
          if raw(k):  # only virtual stage 0 runs this branch
            x_in = whole(xs[m])
          elif raw_first:  # never the first stage
            x_in = whole(act_buf[c, act_slot])
          else:
            x_in = whole(jnp.where(first, xs[m], act_buf[c, act_slot]))
          flat = params_of(k, c)
          if self.remat:  # the stage input, padded to the buffer's R words
            words = residuals.encode(x_in)
            out = fn(flat, x_in, ys[m], keys)
            res = whole(jnp.pad(words, (0, R - words.shape[0])))
          else:
            out, leaves = residuals.leaves_fn(fn)(flat, x_in, ys[m], keys)
            # varying even with nothing to keep (a stage of linear,
            # parameter-free layers), like the idle branch's words
            res = whole(_varying(residuals.pack([whole(a) for a in leaves], layouts[k], R),
                                 axes))
          if k == K - 1:
            return res, act_zeros(), out
          return res, out, zeros(())
        return run

      def forward_idle(c, m, act_buf, act_slot, first, keys):
        return zeros((R,), jnp.uint32), act_zeros(), zeros(())

      def pullback_of(k, flat, res, y, keys):
        """Stage ``k``'s vjp on parameters ``flat``, rebuilt from its
        forward's residual words ``res`` (microbatch labels ``y``)."""
        fn = stage_fn(k)
        if self.remat:
          x_in = (residuals.decode(whole(res), x_first.shape, x_first.dtype) if raw(k)
                  else whole(residuals.decode(whole(res), (mb, D), act)))
          return jax.vjp(lambda f, a: fn(f, a, y, keys), flat, x_in)[1]
        lay = layouts[k]
        _, recomputed = residuals.leaves_fn(fn)(flat, x_example(k), y_mb, keys_mb)
        stored = [whole(a) for a in residuals.unpack(whole(res), lay)]
        return residuals.pullback(lay, stored, recomputed)

      def no_dx(k):
        return not self.computes_input_grad(k)

      def seed_example(k):
        return _varying(jnp.ones((), jnp.float32), axes) if k == K - 1 else act_zeros()

      # Split schedules: each group's backward cut once into an input half
      # and a weight half that share their work (meshnet.pipeline.split); the
      # input half's values the weight half reads are carried in ``G`` words.
      splits = {}
      if split:
        for k in reps:
          if not no_dx(k):
            def full(flat, res, y, keys, seed, k=k):
              return pullback_of(k, flat, res, y, keys)(seed)
            splits[k] = halves.split(full, params_of(k, 0), zeros((R,), jnp.uint32), y_mb,
                                     keys_mb, seed_example(k))
      G = max([1] + [sp.layout.size for sp in splits.values()])

      def backward(k, half):
        """``half``: "both" (full backward: ``(dflat, dx)``), "input"
        (``(dx, carried words)``) or "weight" (``dflat``) for split schedules."""
        def run(c, m, res_buf, res_slot, cot_buf, cot_slot, carry_buf, carry_slot, keys):
          if half == "input" and no_dx(k):
            return act_zeros(), zeros((G,), jnp.uint32)
          res = whole(res_buf[c, res_slot])
          seed = (_varying(jnp.ones((), jnp.float32), axes) if k == K - 1 else
                  whole(cot_buf[c, cot_slot]))
          args = (params_of(k, c), res, _varying(ys[m], axes), keys, seed)
          if half == "input":
            dx, carried = splits[k].run_input(*args, width=G, each=whole)
            # varying like the other branches' words even when nothing is
            # carried (a stage without parameters: no weight half to feed)
            return dx, whole(_varying(carried, axes))
          if half == "weight" and k in splits:
            dflat = splits[k].run_weight(whole(carry_buf[c, carry_slot]), *args, each=whole)
          else:
            dflat, dx = pullback_of(k, *args[:4])(seed)
          if hoist:
            dflat = uncut[k](dflat)[0]
          if half == "weight":
            return dflat
          return dflat, act_zeros() if no_dx(k) else dx
        return run

      idle = {"both": lambda *a: (param_zeros(), act_zeros()),
              "input": lambda *a: (act_zeros(), zeros((G,), jnp.uint32)),
              "weight": lambda *a: param_zeros()}
      f_branches = [forward_idle] + [forward(k) for k in reps]
      b_half = "input" if split else "both"
      b_branches = [idle[b_half]] + [backward(k, b_half) for k in reps]
      w_branches = [idle["weight"]] + [backward(k, "weight") for k in reps]

      # --- one round ----------------------------------------------------------
      def store(buf, value, chunk, slot):
        """``buf[chunk, slot] = value``, in place."""
        start = (chunk, slot) + (0,) * value.ndim
        return jax.lax.dynamic_update_slice(buf, value[None, None].astype(buf.dtype), start)

      def send(act_out, cot_out):
        """Activations one device forward, cotangents one back (circular)."""
        if S == 1:
          return act_out, cot_out
        if S == 2:  # both directions are the same swap: one exchange
          both = collectives.shift(jnp.stack([act_out, cot_out]), STAGE, offset=1)
          return both[0], both[1]
        return (collectives.shift(act_out, STAGE, offset=1),
                collectives.shift(cot_out, STAGE, offset=-1))

      def one_round(carry, row):
        grads, loss_sum, act_buf, cot_buf, res_buf, carry_buf, pending, counts = carry
        e = {name: row[name][d] for name in row}
        # Store what the previous round produced before anything reads.
        act_recv, cot_recv = pending
        act_buf = store(act_buf, act_recv, e["s_act_chunk"], e["s_act"])
        cot_buf = store(cot_buf, cot_recv, e["s_cot_chunk"], e["s_cot"])
        with jax.named_scope("pipeline_forward"):
          fk = e["f_chunk"] * S + d
          res_new, act_out, dloss = jax.lax.switch(
              e["f_branch"], f_branches, e["f_chunk"], e["f_micro"], act_buf, e["f_act"],
              e["f_first"] > 0, op_keys(e["f_micro"], fk))
          # Stored now: the switches below read res_buf, and nothing writes it
          # after them in this round (else XLA copies the buffer).
          res_buf = store(res_buf, res_new, e["f_chunk"], e["f_res"])

        def backward_op(p, branches):
          """This round's ``p`` op ("b": backward, "w": weight half)."""
          keys = (op_keys(e[f"{p}_micro"], e[f"{p}_chunk"] * S + d) if self.remat
                  else zeros(key_shape, jnp.uint32))
          return jax.lax.switch(e[f"{p}_branch"], branches, e[f"{p}_chunk"], e[f"{p}_micro"],
                                res_buf, e[f"{p}_res"], cot_buf, e[f"{p}_cot"], carry_buf,
                                e[f"{p}_carry"], keys)

        with jax.named_scope("pipeline_backward"):
          out = backward_op("b", b_branches)
          if split:  # stored now, before the weight half reads it
            dflat, (cot_out, carried) = None, out
            carry_buf = store(carry_buf, carried, e["b_chunk"], e["b_carry"])
          else:
            dflat, cot_out = out
          grad_chunk = e["b_chunk"]
        if split:
          with jax.named_scope("pipeline_weight_gradient"):
            dflat = backward_op("w", w_branches)
            grad_chunk = e["w_chunk"]
        grads = jax.tree.map(lambda g, dg: g.at[0 if v == 1 else grad_chunk].add(dg),
                             grads, dflat)
        with jax.named_scope("pipeline_send"):
          act_recv, cot_recv = send(act_out, cot_out)
        ran = (e["f_branch"] > 0).astype(jnp.int32) + (e["b_branch"] > 0) + (
            e["w_branch"] > 0)
        counts = counts + jnp.stack([1, ran])
        return (grads, loss_sum + dloss, act_buf, cot_buf, res_buf, carry_buf,
                (act_recv, cot_recv), counts), None

      fill = lambda shape, dtype=act: _varying(jnp.full(shape, _fill, dtype), axes)
      carry = (
          jax.tree.map(lambda a: zeros(a.shape), flat_params),  # gradient accumulator
          zeros(()),  # loss accumulator
          fill((v, buffers.num_act + 1, mb, D)),  # stage inputs received
          fill((v, buffers.num_cot + 1, mb, D)),  # cotangents received
          jax.lax.bitcast_convert_type(fill((v, buffers.res_slots, R), jnp.float32),
                                       jnp.uint32),
          # the input halves' carried words, to the weight halves (split only)
          jax.lax.bitcast_convert_type(fill((v, buffers.num_carry + 1, G), jnp.float32),
                                       jnp.uint32),
          (act_zeros(), act_zeros()),  # received, stored next round
          zeros((2,), jnp.int32),  # rounds run, ops run
      )
      with jax.named_scope("pipeline_rounds"):
        (grads, loss_sum, *_, counts), _ = jax.lax.scan(one_round, carry, tables)
      with jax.named_scope("pipeline_loss"):
        loss_value = collectives.all_reduce(
            collectives.all_reduce(loss_sum, STAGE, "sum"), over_batch, "mean")
      grads = exchange(grads)
      # counts: the same on every batch replica; report replica 0's.
      counts = collectives.all_reduce(
          jnp.where(collectives.axis_index(over_batch) == 0, counts, 0), over_batch, "sum")
      return loss_value, jax.tree.map(lambda g: g[None], grads), counts[None]

    program_on_mesh = jax.shard_map(
        program, mesh=mesh,
        in_specs=(stacked_specs, batch_spec(mesh), batch_spec(mesh), P(), P()),
        out_specs=(P(), stacked_specs, P(STAGE)),
        axis_names=set(sharded.manual_axes(mesh)),
    )
    on_batch = batch_sharding(mesh)

    def grad_fn(stacked, batch, key):
      x, y = batch
      check_batch_size(x.shape[0], mesh, M, what="microbatches")
      x, y = (jax.reshard(a, on_batch) for a in (x, y))
      if isinstance(stacked, tuple):  # the split part's tensor layout is the compiler's
        stacked = (jax.reshard(stacked[0], self.stacked_sharding()[0]), stacked[1])
      else:
        stacked = jax.reshard(stacked, self.stacked_sharding())  # no-op when already so
      loss_value, grads, counts = program_on_mesh(stacked, x, y, key, tables)
      if return_stats:
        return loss_value, grads, {"rounds": counts[:, 0], "ops": counts[:, 1]}
      return loss_value, grads

    return grad_fn


def make_pipeline(
    model: Model, mesh: Mesh, example_shape: Sequence[int], *,
    schedule: str | sched.Schedule = "1f1b", microbatches: int | None = None,
    virtual_stages: int = 1, bounds: Sequence[int] | None = None, remat: bool | str = False,
    rules: Rules | None = None, precision: str = "fp32", input_dtype: Any = jnp.float32,
    balance: str = "params",
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
    bounds: layer boundaries of the ``S * v`` stages (default: cut by
      ``balance``).
    balance: what the default cut balances over the stages: ``params``
      (parameter count: every device's stage vectors and state hold about
      the same, so no stage pays memory for another's shape) or ``flops``
      (each layer's forward FLOPs on one example, from XLA's cost analysis:
      the rounds are not held back by a slow stage; a gpt's embedding then
      shares its stage with blocks, which its lookup does not slow).
    remat: a policy of :mod:`meshnet.compute`: ``"layer"`` puts each layer
      under ``jax.checkpoint``, so a forward keeps its layers' inputs as its
      vjp residuals and the backward recomputes each layer; ``"full"`` (or
      ``True``) keeps only each stage's input between its forward and
      backward and recomputes the stage's forward (itself under ``layer``)
      in the backward (less memory, about a third more compute); ``"none"``
      (or ``False``, the default) keeps the forward's vjp residuals.
    precision: ``fp32`` or ``bf16`` (:mod:`meshnet.compute`): with ``bf16``
      every layer computes in bfloat16 on float32 master parameters, and the
      activations and cotangents between stages are bfloat16; the loss and
      the gradients stay float32.
    rules: the logical-axis rules (:data:`meshnet.sharding.DEFAULT_RULES`
      when ``None``) that say which parameters ``tensor`` splits and where
      the train state keeps them (pass the same to :func:`meshnet.init_train_state`).
    input_dtype: the dtype of the inputs (``int32`` for a gpt's tokens). A
      first stage whose computation no other stage shares reads its
      microbatch as it is (shape and dtype); otherwise the input is cast to
      the activations' dtype.

  With ``fsdp`` > 1 each stage's vectors are split over ``fsdp`` (gathered
  once per step, gradients reduce-scattered) and the batch over ``data`` x
  ``fsdp``; with ``tensor`` > 1 the parameters the rules split over
  ``tensor`` keep their Megatron split inside each stage (the compiler adds
  the reductions).

  Raises:
    MeshnetError: no layers, more stages than layers, bad bounds, or a
      schedule that does not fit (see :func:`~meshnet.pipeline.schedules.make_schedule`).
  """
  policy = check_remat(remat)
  check_precision(precision)
  if policy != "none":  # each layer under jax.checkpoint; "full" keeps stage inputs too
    model = remat_model(model, "layer")
  remat = policy == "full"
  if not model.layers:
    raise MeshnetError(
        "pipelining needs a model made of layers (Model(..., layers=...), e.g. "
        "meshnet.models.mlp or meshnet.model.sequential); this model has none")
  S, T = axis_size(mesh, STAGE), axis_size(mesh, TENSOR)
  tree = jax.eval_shape(model.init, jax.random.key(0))
  listed = model.to_layers is not None or isinstance(tree, (list, tuple))
  params = jax.eval_shape(lambda p: layer_params(model, p), tree) if listed else []
  if not listed or len(params) != len(model.layers):
    raise MeshnetError(
        f"a pipelined model's init must return a list or tuple with one entry per layer "
        f"({len(model.layers)}), got {type(tree).__name__} ({len(params)} entries); build "
        "it with meshnet.sequential(layers), or give Model.to_layers/from_layers")
  if isinstance(schedule, sched.Schedule):
    plan = schedule
    if plan.num_stages != S:
      raise MeshnetError(
          f"schedule has {plan.num_stages} stages but the mesh has stage={S}")
  else:
    plan = sched.make_schedule(schedule, S, microbatches or S, virtual_stages)
  K = S * plan.virtual_stages
  n_layers = len(model.layers)
  check_balance(balance)
  if bounds is None:
    bounds = default_bounds(model.layers, K, balance, jax.ShapeDtypeStruct(
        (1, *example_shape), jnp.dtype(input_dtype)))
  else:
    if K > n_layers:
      balanced_bounds([1] * n_layers, K)  # raises the "more stages than layers" error
    bounds = check_bounds(bounds, n_layers, K)
  example_shape = tuple(int(s) for s in example_shape)
  model = precision_layers(model, precision)  # after the checks: casts keep the tree
  storage = storage_specs(model, tree, mesh, rules)  # checks every split divides
  # Each layer's tensor split: the model's own (per layer) names, or, for a
  # model with a layered view of another tree, each layer's names.
  per_layer_specs = storage if model.to_layers is None else [
      param_specs(layer, p, mesh, rules) for layer, p in zip(model.layers, params)]
  split_dims = [tuple(_tensor_dim(spec) if T > 1 else None for spec in
                      jax.tree.leaves(layer_specs, is_leaf=lambda x: isinstance(x, P)))
                for layer_specs in per_layer_specs]

  # Shapes of every stage's parameters and boundary activations (abstractly),
  # and, inside each stage, runs of identical layers to scan over.
  sizes, shapes, runs, run_layouts, key_layers = [], [example_shape], [], [], []
  split_sizes, boundary_dtypes = [], []
  x = jax.ShapeDtypeStruct((2, *example_shape), jnp.dtype(input_dtype))
  for k in range(K):
    stage = list(params[bounds[k]:bounds[k + 1]])
    signatures = []
    for layer, p in zip(model.layers[bounds[k]:bounds[k + 1]], stage):
      y = jax.eval_shape(functools.partial(layer.apply, train=True), p, x,
                         key=jax.random.key(0))
      same_shape = (y.shape, y.dtype) == (x.shape, x.dtype)
      signatures.append(_signature(layer.apply, p, x) if same_shape else None)
      key_layers.append(uses_key(layer.apply, p, x))
      x = y
    runs.append(_identical_runs(signatures))
    boundary_dtypes.append(x.dtype)
    layouts = []
    for start, end in runs[-1]:
      leaves, treedef = jax.tree.flatten(stage[start])
      layouts.append(_RunLayout(end - start, treedef, tuple(tuple(s.shape) for s in leaves),
                                tuple(s.dtype for s in leaves),
                                split_dims[bounds[k] + start], T))
    run_layouts.append(tuple(layouts))
    sizes.append(sum(run.size for run in layouts))
    split_sizes.append(sum(run.split_size for run in layouts))
    shapes.append(tuple(x.shape[1:]))
  pipe = Pipeline(model, mesh, plan, tuple(bounds), example_shape, jnp.dtype(input_dtype),
                  tuple(sizes), tuple(int(np.prod(s)) for s in shapes[:-1]),
                  _shapes=tuple(shapes), _runs=tuple(runs), _run_layouts=tuple(run_layouts),
                  _key_layers=tuple(key_layers), remat=bool(remat),
                  _split_sizes=tuple(split_sizes), _storage=storage,
                  _boundary_dtypes=tuple(jnp.dtype(d) for d in boundary_dtypes[:-1]))
  groups = _stage_groups(pipe)
  return dataclasses.replace(pipe, _groups=groups, _raw_first=groups.count(0) == 1)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _axes(entry: Any) -> tuple[str, ...]:
  """A spec entry's mesh axes."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _drop_tensor(entry: Any) -> Any:
  """A spec entry without ``tensor`` (an ``Auto`` axis ``jax.reshard`` does
  not place)."""
  axes = tuple(a for a in _axes(entry) if a != TENSOR)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _tensor_dim(spec: P) -> int | None:
  """The dimension ``spec`` splits over ``tensor`` (``None`` if none)."""
  for dim, entry in enumerate(spec):
    if TENSOR in _axes(entry):
      return dim
  return None


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
  if pipe.split_width:
    flat = (flat, jax.ShapeDtypeStruct((pipe.tensor, pipe.split_width), jnp.float32))
  x = jax.ShapeDtypeStruct((2, pipe.activation_width), pipe.activation_dtype)
  signatures = []
  for k in range(pipe.num_virtual_stages):
    if k == 0 and not jnp.issubdtype(pipe.input_dtype, jnp.floating):
      signatures.append(("first stage", "its inputs are not activations"))  # its own group
      continue

    def fn(f, x, *, train, key, k=k):
      keys = jax.random.key_data(jax.random.split(key, (x.shape[0], pipe._max_layers)))
      return pipe._stage_forward(k, f, x, keys, train)

    signatures.append(_signature(fn, flat, x))
  return tuple(signatures.index(sig) for sig in signatures)
