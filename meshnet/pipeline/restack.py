"""Parameters between the train state's layout and the stage vectors, moving
only what each device needs.

The train state keeps each parameter split over ``stage`` along one
dimension (:func:`meshnet.sharding.with_stage`); the executor wants, on
device ``d``, the whole parameters of its virtual stages ``k = c * S + d``
raveled into ``[v, N]`` (:class:`meshnet.pipeline.executor.Pipeline`). An
all-gather of every parameter sends each device the whole model, of which it
keeps ``1 / S``. Here one ``all_to_all`` over ``stage`` moves each device's
piece of a parameter only to the device whose stage holds it (``(S - 1) /
S`` of a stage per device instead of ``(S - 1) / S`` of the model); the
gradient goes back the same way, each device receiving only its pieces.
Measured over gloo on 2 processes: 12-14 ms for a 4.2M-float stage against
32 ms for its all-gather.

Used for a model given as a list of layers on a mesh with ``fsdp = tensor =
1`` (:func:`supported`); other layouts take the executor's gather.

Inside the ``shard_map`` every device runs the same program: what it sends
for the parameters, and what it reads for the gradient, does not depend on
its index (every device holds a same-shaped piece of every parameter); what
depends on it (which stages it assembles or takes apart) is a ``lax.switch``
over the ``stage`` index with one branch per device.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from meshnet import collectives, sharded
from meshnet.mesh import FSDP, STAGE, TENSOR, axis_size
from meshnet.sharding import _as_axes as _axes  # a spec entry's mesh axes


def _stage_dim(spec: P) -> int | None:
  """The dimension a stored leaf is split along over ``stage`` (``None``:
  kept whole on every stage)."""
  dims = [i for i, e in enumerate(spec) if STAGE in _axes(e)]
  return dims[0] if dims else None


def supported(pipe: Any) -> bool:
  """Whether ``pipe`` (a Pipeline) can restack with ``all_to_all``: a list
  of layers, ``fsdp = tensor = 1``, more than one stage, and each stored
  leaf split over ``stage`` alone, if at all."""
  mesh = pipe.mesh
  if (pipe.model.to_layers is not None or axis_size(mesh, FSDP) != 1
      or axis_size(mesh, TENSOR) != 1 or pipe.schedule.num_stages < 2):
    return False
  specs = jax.tree.leaves(pipe._storage, is_leaf=lambda x: isinstance(x, P))
  return all(all(a in (STAGE,) or axis_size(mesh, a) == 1 for e in spec for a in _axes(e))
             for spec in specs)


def _varying(x: jax.Array) -> jax.Array:
  """``x`` marked as varying over ``stage`` (as the gathered stage vectors are)."""
  if STAGE in jax.typeof(x).manual_axis_type.varying:
    return x
  return jax.lax.pcast(x, (STAGE,), to="varying")


def _size(shape: Sequence[int]) -> int:
  return int(np.prod(shape, dtype=np.int64))


def _rows(rows: Sequence[Sequence[jax.Array]], width: int) -> jax.Array:
  """``[len(rows), width]``: row ``e`` the concatenation of ``rows[e]``'s
  vectors, then zeros. One concatenate, so the compiler writes each element
  once (a pad, then a stack, would copy every row twice more)."""
  parts = []
  for row in rows:
    used = sum(int(a.shape[0]) for a in row)
    parts.extend(row)
    if width > used:
      parts.append(_varying(jnp.zeros((width - used,), jnp.float32)))
  return jnp.concatenate(parts).reshape(len(rows), width)


class Restack:
  """``stack(params) -> [S, v, N]`` and ``unstack([S, v, N]) -> params``
  for a :func:`supported` pipeline (inside ``jit``; params in, and out, as
  the train state keeps them).

  Leaves the train state keeps whole on every stage (no dimension that
  ``stage`` divides: small ones) are not moved for the parameters (every
  device has them) and are summed over ``stage`` for the gradient (the
  owner's gradient, zeros elsewhere), so every device ends with the same.
  """

  def __init__(self, pipe: Any, ravel: Callable, unravel: Callable):
    self.pipe = pipe
    S, v = pipe.schedule.num_stages, pipe.schedule.virtual_stages
    self.S, self.v, self.N = S, v, pipe.param_width
    self._ravel, self._unravel = ravel, unravel
    is_spec = lambda x: isinstance(x, P)
    self.specs = list(pipe._storage)  # per layer: a tree of specs
    self.dims = [[_stage_dim(s) for s in jax.tree.leaves(layer, is_leaf=is_spec)]
                 for layer in self.specs]
    abstract = jax.eval_shape(pipe.model.init, jax.random.key(0))
    self.treedefs = [jax.tree.structure(layer) for layer in abstract]
    self.shapes = [[tuple(a.shape) for a in jax.tree.leaves(layer)] for layer in abstract]
    self.dtypes = [[a.dtype for a in jax.tree.leaves(layer)] for layer in abstract]
    # device -> the layers of its stages, in order (chunk 0's first)
    self.layers_of = [[i for c in range(v) for i in range(*self._bounds(c * S + d))]
                      for d in range(S)]
    # leaves kept whole on every stage: (layer, leaf) -> offset in one vector
    self.whole_at, offset = {}, 0
    for i, dims in enumerate(self.dims):
      for j, dim in enumerate(dims):
        if dim is None:
          self.whole_at[(i, j)] = offset
          offset += _size(self.shapes[i][j])
    self.whole_size = offset

  def _bounds(self, k: int) -> tuple[int, int]:
    return self.pipe.bounds[k], self.pipe.bounds[k + 1]

  def _local(self, i: int, j: int) -> tuple[int, ...]:
    """Layer ``i``'s leaf ``j`` as one device stores it."""
    shape, dim = self.shapes[i][j], self.dims[i][j]
    return shape if dim is None else (*shape[:dim], shape[dim] // self.S, *shape[dim + 1:])

  def _split_leaves(self, i: int) -> list[int]:
    return [j for j, dim in enumerate(self.dims[i]) if dim is not None]

  def _piece_words(self, d: int) -> int:
    """Elements device ``d``'s stages hold of each device's pieces."""
    return sum(_size(self._local(i, j)) for i in self.layers_of[d]
               for j in self._split_leaves(i))

  @property
  def stored_words(self) -> int:
    """Elements of one device's pieces of every leaf (the leaves kept whole,
    whole): the parameters, or gradient, as the train state keeps them."""
    return sum(self._piece_words(e) for e in range(self.S)) + self.whole_size

  @property
  def width(self) -> int:
    """Elements of each of the ``S`` rows a device sends in one
    ``all_to_all`` (float32; the longest device's pieces, at least 1)."""
    return max(1, max(self._piece_words(e) for e in range(self.S)))

  def _shard_map(self, fn: Callable, in_specs: Any, out_specs: Any) -> Callable:
    mesh = self.pipe.mesh
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=set(sharded.manual_axes(mesh)))

  def _stored_shardings(self) -> Any:
    mesh = self.pipe.mesh
    return jax.tree.map(lambda s: NamedSharding(mesh, s), self.specs,
                        is_leaf=lambda x: isinstance(x, P))

  # --- parameters -> stage vectors ------------------------------------------
  def _stack_local(self, params: list) -> jax.Array:
    """Inside the program: this device's pieces of every layer -> its
    ``[1, v, N]`` stage vectors."""
    S, v, N = self.S, self.v, self.N
    leaves = [jax.tree.leaves(p) for p in params]
    width = self.width
    # row e, to device e: this device's pieces of e's layers, in order
    send = _rows([[_varying(leaves[i][j].reshape(-1).astype(jnp.float32))
                   for i in self.layers_of[e] for j in self._split_leaves(i)]
                  for e in range(S)], width)
    recv = collectives.all_to_all(send, STAGE, split_dim=0, concat_dim=0)

    def assemble(d):
      def run(recv):
        offset, whole = 0, {}
        for i in self.layers_of[d]:
          out = list(leaves[i])  # leaves kept whole: this device has them
          for j in self._split_leaves(i):
            local = self._local(i, j)
            size = _size(local)
            pieces = [recv[e, offset:offset + size].reshape(local) for e in range(S)]
            out[j] = jnp.concatenate(pieces, axis=self.dims[i][j])
            offset += size
          whole[i] = jax.tree.unflatten(self.treedefs[i], out)
        chunks = [[self._ravel(c * S + d, [whole[i] for i in range(*self._bounds(c * S + d))])]
                  for c in range(v)]
        return _varying(_rows(chunks, N)[None])
      return run

    d = collectives.axis_index(STAGE)
    return jax.lax.switch(d, [assemble(d) for d in range(S)], recv)

  def stack(self, params: Any) -> jax.Array:
    """The model's own params (a list, one entry per layer; any layout) ->
    ``[S, v, N]`` over ``stage``."""
    params = jax.tree.map(jax.reshard, list(params), self._stored_shardings())
    return self._shard_map(self._stack_local, (self.specs,), P(STAGE))(params)

  # --- stage gradient -> the train state's layout ---------------------------
  def _unstack_local(self, stacked: jax.Array) -> list:
    """Inside the program: this device's ``[1, v, N]`` stage vectors ->
    its pieces of every layer (and the leaves kept whole, whole)."""
    S, v = self.S, self.v
    width = self.width

    def send_of(d):
      """What device ``d`` sends: per destination ``e`` its stages' pieces
      ``e``, in the order ``e`` reads them; and the leaves kept whole, in
      their places of one vector summed over ``stage``."""
      def run(stacked):
        per_layer = {}
        for c in range(v):
          k = c * S + d
          b, end = self._bounds(k)
          for i, p in zip(range(b, end), self._unravel(k, stacked[0, c])):
            per_layer[i] = jax.tree.leaves(p)
        rows = [[_varying(jnp.split(per_layer[i][j], S, axis=self.dims[i][j])[e]
                          .reshape(-1).astype(jnp.float32))
                 for i in self.layers_of[d] for j in self._split_leaves(i)]
                for e in range(S)]
        whole = jnp.zeros((self.whole_size,), jnp.float32)
        for i in self.layers_of[d]:
          for j, dim in enumerate(self.dims[i]):
            if dim is None:
              at = self.whole_at[(i, j)]
              whole = whole.at[at:at + _size(self.shapes[i][j])].set(
                  per_layer[i][j].reshape(-1).astype(jnp.float32))
        return _rows(rows, width), _varying(whole)
      return run

    d = collectives.axis_index(STAGE)
    send, whole = jax.lax.switch(d, [send_of(d) for d in range(S)], stacked)
    recv = collectives.all_to_all(send, STAGE, split_dim=0, concat_dim=0)
    whole = collectives.all_reduce(whole, STAGE, "sum")
    out = [None] * len(self.shapes)
    for e in range(S):  # row e: device e's pieces of its stages' layers, for this device
      offset = 0
      for i in self.layers_of[e]:
        leaves = []
        for j, shape in enumerate(self.shapes[i]):
          if self.dims[i][j] is None:
            at = self.whole_at[(i, j)]
            leaf = whole[at:at + _size(shape)].reshape(shape)
          else:
            local = self._local(i, j)
            leaf = recv[e, offset:offset + _size(local)].reshape(local)
            offset += _size(local)
          leaves.append(leaf.astype(self.dtypes[i][j]))
        out[i] = jax.tree.unflatten(self.treedefs[i], leaves)
    return out

  def unstack(self, stacked: jax.Array) -> list:
    """``[S, v, N]`` over ``stage`` -> the model's own params (a list),
    laid out as the train state keeps them."""
    return self._shard_map(self._unstack_local, P(STAGE), self.specs)(stacked)
