"""Split backward (schedule zb, custom tables with W ops) against one device.

:mod:`meshnet.pipeline.split` cuts a stage's backward into an input half
(B) and a weight half (W) that carries the cotangent-dependent values
between them; these tests hold the pipeline to one device's loss,
gradients and parameters after optimizer steps on hostile cases (dropout,
scanned runs, remat, hoist off, tensor/fsdp, bf16, parameter-free layers,
a gpt), hold :func:`~meshnet.pipeline.split.split` itself to the fused
pullback, and check the carried buffer's slots over every split schedule.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshnet
from jax.extend import core as jcore

from meshnet.pipeline import executor, make_pipeline, schedules
from meshnet.pipeline import split as halves
from meshnet.pipeline.plan import plan
from meshnet.pipeline.rounds import pack
from meshnet.pipeline.schedules import B, F, W, Op
from meshnet.sharding import batch_sharding

import reference

TIGHT = dict(rtol=2e-5, atol=2e-6)
BF16 = dict(rtol=1e-2, atol=2e-3)


def _mesh(**axes):
  n = int(np.prod(list(axes.values())))
  return meshnet.make_mesh(**axes, devices=jax.devices()[:n])


def _put(mesh, batch):
  return tuple(jax.device_put(np.asarray(a), batch_sharding(mesh)) for a in batch)


def _one_device(model, batch, key, **kw):
  one = _mesh(data=1)
  params = model.init(jax.random.key(0))
  return jax.jit(meshnet.make_grad_fn(model, one, **kw))(params, _put(one, batch), key)


def _pipelined(model, axes, batch, key, fill=0.0, **pipeline):
  mesh = _mesh(**axes)
  pipe = make_pipeline(model, mesh, np.shape(batch[0])[1:], **pipeline)
  params = jax.device_put(model.init(jax.random.key(0)), pipe.param_shardings())
  loss, stacked = jax.jit(pipe.make_grad_fn(_fill=fill))(pipe.stack(params),
                                                         _put(mesh, batch), key)
  return pipe, loss, pipe.unstack(stacked)


def _assert_equals_one_device(model, axes, batch, fill=float("nan"), tol=TIGHT, **pipeline):
  """Loss and gradients of the pipeline on ``axes`` equal one device's;
  NaN in every unwritten buffer entry shows that W reads only what B wrote."""
  key = jax.random.key(1)
  ref_loss, ref_grads = _one_device(model, batch, key)
  pipe, loss, grads = _pipelined(model, axes, batch, key, fill=fill, **pipeline)
  np.testing.assert_allclose(loss, ref_loss, **tol)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert got.dtype == want.dtype
    # a bf16 leaf: the pipeline sums microbatch gradients in float32 and
    # rounds once, one device rounds the whole batch's: a bf16 step apart
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **(BF16 if want.dtype == jnp.bfloat16 else tol))
  return pipe, grads


@pytest.fixture(scope="module")
def digits():
  ds = meshnet.load_dataset("digits")
  return ds.x_train[:32], ds.y_train[:32]


# --- the executor against one device ---------------------------------------------


def test_tensor_with_remat_runs_and_equals_one_device(digits):
  """tensor=2 x stage=2, zb, remat: the carried values were packed and
  unpacked without being kept whole over tensor, and the compiler's halo
  exchange inside a switch branch deadlocked (XLA aborted the process after
  40 s waiting for the other stage's devices)."""
  model = meshnet.models.mlp([64, 32, 32, 32, 16, 10], dropout=0.2)
  _assert_equals_one_device(model, dict(fsdp=2, stage=2, tensor=2), digits, schedule="zb",
                            microbatches=4, remat=True)


def test_dropout_data2_stage2_with_a_scanned_run_equals_one_device(digits, monkeypatch):
  """Per-example dropout keys through B and W, a stage whose 6 identical
  layers are one scan (cut into an input scan and a weight scan) next to an
  unrolled layer; every carried value has the microbatch's rows (a
  cotangent), none is a copy of the weights."""
  model = meshnet.models.mlp([64] + [36] * 8 + [10], dropout=0.3)
  shapes = _record_carried(monkeypatch)
  pipe, _ = _assert_equals_one_device(model, dict(data=2, stage=2), digits, schedule="zb",
                                      microbatches=4, bounds=(0, 2, 9))
  assert pipe._runs[1] == ((0, 6), (6, 7)) and 6 > executor.UNROLL_LAYERS
  mb = 32 // 2 // 4
  assert shapes and all(mb in s[:2] for s in shapes), shapes
  # the scanned run's: a cotangent per layer (per example: dropout runs vmapped)
  assert (6, mb, 1, 36) in shapes


def _record_carried(monkeypatch):
  """The shapes of the values each split carries (the real split runs)."""
  from meshnet.pipeline import split as halves
  shapes = []
  real = halves.split

  def recording(*args, **kwargs):
    result = real(*args, **kwargs)
    shapes.extend(result.layout.shapes)
    return result
  monkeypatch.setattr(halves, "split", recording)
  return shapes


def test_remat_on_stage4_data2_with_dropout_and_a_scanned_run_equals_one_device(digits):
  """remat=True on 8 devices: B and W each recompute the stage's forward
  from its input (the same dropout masks) and W reads what B carried."""
  model = meshnet.models.mlp([64, 36] + [36] * 7 + [24, 10], dropout=0.2)
  pipe, _ = _assert_equals_one_device(model, dict(data=2, stage=4), digits, schedule="zb",
                                      microbatches=4, remat=True, bounds=(0, 1, 2, 8, 10))
  assert pipe._runs[2] == ((0, 6),)  # a scan of 6 on stage 2


def test_hoist_off_with_layer_remat_equals_one_device(digits, monkeypatch):
  """HOIST_BYTES = 0: every op cuts its parameters out of the stage vector
  (the weight half's gradient is the vector's, not the cut tree's);
  remat="layer" puts each layer under jax.checkpoint, whose backward the
  split cuts inside."""
  monkeypatch.setattr(executor, "HOIST_BYTES", 0)
  shapes = _record_carried(monkeypatch)
  model = meshnet.models.mlp([64, 40, 33, 33, 33, 17, 10], dropout=0.1)
  _assert_equals_one_device(model, dict(data=2, stage=2), digits, schedule="zb",
                            microbatches=2, remat="layer")
  assert shapes and all(s[0] == 32 // 2 // 2 for s in shapes), shapes  # [mb, ...] each


def test_parameters_after_three_adam_steps_equal_one_device(digits_batches):
  """zb through make_train_step, dropout on: loss and gradient norm step by
  step and the parameters after three Adam steps."""
  model = meshnet.models.mlp([64, 48, 32, 32, 32, 24, 10], dropout=0.2)
  optimizer = meshnet.make_optimizer(
      meshnet.OptimConfig(optimizer="adam", lr=1e-2, clip_norm=1.0), 3)
  results = []
  for axes in (dict(data=1), dict(data=2, stage=2)):
    mesh = _mesh(**axes)
    pipe = (make_pipeline(model, mesh, (64,), schedule="zb", microbatches=4)
            if "stage" in axes else None)
    state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0), pipeline=pipe)
    step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
    history = []
    for batch in digits_batches:
      state, metrics = step(state, _put(mesh, batch))
      history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    results.append((history, reference.to_numpy(state.params)))
  (h1, p1), (h2, p2) = results
  np.testing.assert_allclose(h2, h1, **TIGHT)
  chex.assert_trees_all_close(p2, p1, rtol=2e-4, atol=2e-5)


def _split_orders(S, M, v, defer):
  """Each device: all forwards (chunk by chunk), then the backwards with
  each W right after its B, or all Ws at the end in reverse (the most
  carried values in flight)."""
  fwd = [Op(F, m, c) for c in range(v) for m in range(M)]
  bwd = [Op(B, m, c) for c in reversed(range(v)) for m in reversed(range(M))]
  ws = [Op(W, op.microbatch, op.chunk) for op in bwd]
  order = fwd + (bwd + ws[::-1] if defer else [x for pair in zip(bwd, ws) for x in pair])
  return [order] * S


def _custom_split(S, M, v, defer):
  built = schedules.from_orders("x", _split_orders(S, M, v, defer), M, virtual_stages=v,
                                split_backward=True)
  return meshnet.pipeline.custom(built.table, M, virtual_stages=v, split_backward=True)


def test_custom_split_table_with_chunks_and_deferred_ws_equals_one_device(digits):
  """A user's split table with 2 chunks per device, every W after all Bs:
  each chunk's carried slots stay live across the others'."""
  model = meshnet.models.mlp([64, 40, 36, 36, 32, 32, 24, 16, 10], dropout=0.2)
  _assert_equals_one_device(model, dict(data=2, stage=2), digits,
                            schedule=_custom_split(2, 4, 2, defer=True))


def _dense(n_in, n_out, dtype=jnp.float32):
  def init(key):
    return ((0.3 * jax.random.normal(key, (n_in, n_out))).astype(dtype), jnp.zeros(n_out),
            {"unused": jnp.ones(3), "scale": jnp.ones(())})

  def apply(p, x):
    return p[2]["scale"] * jnp.tanh(x @ p[0].astype(jnp.float32) + p[1][None, :])
  return meshnet.Model(init, apply)


def _free(fn):
  return meshnet.Model(lambda key: {}, lambda p, x: fn(x))


def test_parameter_free_stages_and_odd_layers_equal_one_device(digits):
  """Stage 1: tuple parameters with a bf16 leaf, a scalar and a leaf that
  does not touch the output (zero gradient); stage 2: six identical linear
  parameter-free layers (a run with nothing to scan over, no residuals:
  its forward's words were not varying over the mesh and the program
  failed to build, with every schedule); stage 3, the loss stage:
  parameter-free, odd width, nothing to carry (its input half's words were
  not varying either: zb failed to build)."""
  model = meshnet.sequential(
      [_dense(64, 27), _dense(27, 27, jnp.bfloat16)] + [_free(lambda x: 0.9 * x + 0.1)] * 6 +
      [_free(lambda x: 3.0 * x[:, 1:11])])
  _, grads = _assert_equals_one_device(model, dict(stage=4), digits, schedule="zb",
                                       microbatches=4, bounds=(0, 1, 2, 8, 9))
  assert grads[1][0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(grads[1][2]["unused"], 0.0)


def test_gpt_with_scanned_blocks_and_dropout_equals_one_device():
  """A gpt of 6 blocks on 2 stages, the second's 5 blocks one scan (cut in
  two), dropout; the first stage (embedding) reads int32 tokens."""
  model = meshnet.models.gpt(None, layers=6, heads=2, width=16, context=8, dropout=0.1)
  rng = np.random.default_rng(0)
  seqs = rng.integers(0, 256, (8, 9)).astype(np.int32)
  pipe, _ = _assert_equals_one_device(model, dict(stage=2), (seqs[:, :-1], seqs[:, 1:]),
                                      schedule="zb", microbatches=2,
                                      input_dtype=jnp.int32, bounds=(0, 2, 8))
  assert pipe._runs[1][0] == (0, 5)


# --- meshnet.pipeline.split.split on its own -------------------------------------


def _count(jaxpr, name="dot_general"):
  """Equations named ``name`` in ``jaxpr`` and the programs nested in it."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  return sum((eqn.primitive.name == name) +
             sum(_count(sub, name) for sub in jcore.jaxprs_in_params(eqn.params))
             for eqn in jaxpr.eqns)


def _split_pullback(f, params, x, seed=None):
  """``f``'s pullback as the executor runs it (rebuilt from its residual
  leaves), split; ``(split, leaves, seed, fused)``."""
  out, pullback = jax.vjp(f, params, x)
  seed = jnp.cos(out) if seed is None else seed  # not ones: a multiply by 1 folds away
  leaves, treedef = jax.tree.flatten(pullback)
  fused = lambda leaves, seed: jax.tree.unflatten(treedef, leaves)(seed)
  return halves.split(fused, leaves, seed), leaves, seed, fused


def _halves(sp, leaves, seed):
  """The two halves' programs, and their results next to the fused pullback's
  (all under jit)."""
  width = max(1, sp.layout.size)
  run_input = lambda l, s: sp.run_input(l, s, width=width)
  run_weight = lambda c, l, s: sp.run_weight(c, l, s)
  dx, carried = jax.jit(run_input)(leaves, seed)
  dflat = jax.jit(run_weight)(carried, leaves, seed)
  programs = (jax.make_jaxpr(run_input)(leaves, seed),
              jax.make_jaxpr(run_weight)(carried, leaves, seed))
  return programs, (dflat, dx)


def _assert_bitwise(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32) if a.dtype != jax.dtypes.float0
                                  else np.zeros(a.shape), np.asarray(b, np.float32)
                                  if b.dtype != jax.dtypes.float0 else np.zeros(b.shape))


N, MB, WIDTH = 4, 5, 8


def _weights(n=N):
  return [0.3 * jax.random.normal(jax.random.key(i), (WIDTH, WIDTH)) for i in range(n)]


def _x():
  return jax.random.normal(jax.random.key(99), (MB, WIDTH))


def _layer(w, h):
  return jnp.tanh(h @ w)


def _unrolled(layer):
  def f(ws, x):
    for w in ws:
      x = layer(w, x)
    return x
  return f


def _scanned(layer):
  return lambda ws, x: jax.lax.scan(lambda h, w: (layer(w, h), None), x, ws)[0]


STACKS = {
    "dense": (_unrolled(_layer), False),
    # One equation held a layer's whole backward: it ran in the input half
    # and its weight gradient ([8, 8] per layer) was carried; the weight half
    # did no matmul at all.
    "checkpointed": (_unrolled(jax.checkpoint(_layer)), False),
    "jitted": (_unrolled(jax.jit(_layer)), False),
    "scanned": (_scanned(_layer), True),
    "scanned_checkpointed": (_scanned(jax.checkpoint(_layer)), True),
    "scanned_reverse": (lambda ws, x: jax.lax.scan(lambda h, w: (_layer(w, h), None), x, ws,
                                                   reverse=True)[0], True),
    "nested_scans": (lambda ws, x: jax.lax.scan(
        lambda h, pair: (_scanned(_layer)(pair, h), None), x, ws.reshape(2, N // 2,
                                                                     WIDTH, WIDTH))[0], True),
}


@pytest.mark.parametrize("name", sorted(STACKS))
def test_weight_half_does_the_weight_matmuls_and_carries_only_cotangents(name):
  """A stack of 4 dense layers: the input half does the 4 input-gradient
  matmuls (a scan: 1 in its body), the weight half the 4 weight-gradient
  ones, and the carried values are the layers' pre-activation cotangents
  ``[mb, width]`` (a scan: ``[layers, mb, width]``); bit for bit the fused
  pullback's results."""
  f, stacked = STACKS[name]
  ws = jnp.stack(_weights()) if stacked else _weights()
  sp, leaves, seed, fused = _split_pullback(f, ws, _x())
  (input_half, weight_half), got = _halves(sp, leaves, seed)
  _assert_bitwise(got, jax.jit(fused)(leaves, seed))
  per_stack = 1 if stacked else N
  recompute = 1 if "checkpointed" in name else 0  # the layer's forward, per layer
  assert _count(input_half) == per_stack * (1 + recompute), name
  assert _count(weight_half) == per_stack, name
  # a checkpoint's recompute stays behind its barriers (not merged with a forward)
  assert (_count(input_half, "optimization_barrier") > 0) == bool(recompute), name
  if stacked:
    assert sp.layout.shapes == ((N, MB, WIDTH),) or sp.layout.shapes == (
        (2, N // 2, MB, WIDTH),), sp.layout.shapes
  else:
    assert sp.layout.shapes == ((MB, WIDTH),) * N, sp.layout.shapes


W0 = 0.3 * jax.random.normal(jax.random.key(7), (WIDTH, WIDTH))
ODD = {
    # a closed-over array, and one inside a nested program
    "constants": (lambda p, x: jax.jit(lambda h: h * jnp.arange(8.0)[None])(
        jnp.tanh(x @ p["w"])) + jnp.linspace(0.0, 1.0, 8)[None], {"w": W0}, _x()),
    # a leaf that does not touch the output (zero gradient) and None leaves
    "unused_and_none": (lambda p, x: jnp.tanh(x @ p["w"]),
                        {"w": W0, "unused": jnp.ones(3), "none": None, "nested": [None]}, _x()),
    # integer input: its cotangent is float0
    "integer_input": (lambda p, i: jnp.tanh(p["table"][i] @ p["w"]),
                      {"table": jnp.ones((10, WIDTH)), "w": W0}, jnp.arange(MB)),
    # the output does not depend on the input: dx is zero
    "zero_dx": (lambda p, x: jnp.zeros((MB, 1)) + jnp.tanh(p["w"]).sum(0)[None], {"w": W0},
                _x()),
    # no parameters at all
    "no_parameters": (lambda p, x: jnp.sin(x) * 2.0, [], _x()),
    # bfloat16 weights and cotangents
    "bf16": (lambda w, x: jnp.tanh(x.astype(jnp.bfloat16) @ w), W0.astype(jnp.bfloat16), _x()),
    # a scalar output (a loss stage): the seed is a scalar
    "scalar_loss": (lambda ws, x: jnp.mean(_scanned(_layer)(ws, x) ** 2), jnp.stack(_weights()),
                    _x()),
    # a weight shared by every iteration of a scan: its gradient accumulates
    # in the weight scan's carry
    "shared_weight_scan": (lambda w, x: jax.lax.scan(lambda h, _: (_layer(w, h), None), x,
                                                     None, length=3)[0], W0, _x()),
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_backwards_split_bit_for_bit(name):
  f, params, x = ODD[name]
  sp, leaves, seed, fused = _split_pullback(f, params, x)
  (_, weight_half), got = _halves(sp, leaves, seed)
  _assert_bitwise(got, jax.jit(fused)(leaves, seed))
  if name in ("zero_dx", "no_parameters"):  # nothing on the cotangent feeds both halves
    assert sp.layout.size == 0, sp.layout
  if name == "integer_input":
    assert got[1].dtype == jax.dtypes.float0
  if name == "unused_and_none":
    np.testing.assert_array_equal(got[0]["unused"], 0.0)
  if name == "shared_weight_scan":
    assert sp.layout.shapes == ((3, MB, WIDTH),) and _count(weight_half) == 1


def test_an_effect_in_a_backward_runs_once():
  """A debug callback in a custom backward rule (no output needs it) ran in
  neither half: it now runs once, in the weight half."""
  calls = []

  @jax.custom_vjp
  def watched(h):
    return h

  def backward(_, g):
    jax.debug.callback(lambda g: calls.append(np.asarray(g).shape), g)
    return (g,)
  watched.defvjp(lambda h: (h, None), backward)
  sp, leaves, seed, _ = _split_pullback(lambda w, x: jnp.tanh(watched(x @ w)), W0, _x())
  dx, carried = sp.run_input(leaves, seed, width=max(1, sp.layout.size))
  jax.effects_barrier()
  assert calls == []
  sp.run_weight(carried, leaves, seed)
  jax.effects_barrier()
  assert calls == [(MB, WIDTH)]


def test_seeds_name_the_cotangent_among_the_arguments():
  """``seeds`` picks the cotangent; a value that depends only on the other
  arguments is recomputed by the weight half, not carried."""
  def fn(seed, w, x):
    h = jnp.tanh(x @ w)
    dh = seed * (1 - h * h)
    return x.T @ dh, dh @ w.T
  sp = halves.split(fn, _x(), W0, _x(), seeds=(0,))
  assert sp.layout.shapes == ((MB, WIDTH),)  # dh, not h
  dx, carried = sp.run_input(_x(), W0, _x(), width=sp.layout.size)
  np.testing.assert_array_equal(sp.run_weight(carried, _x(), W0, _x()), fn(_x(), W0, _x())[0])


# --- the carried buffer's slots ----------------------------------------------------


def _split_schedules():
  for S in range(2, 5):
    for M in range(2, 10):
      if M >= S:
        yield schedules.make_schedule("zb", S, M)
      for v in (1, 2):
        for defer in (False, True):
          yield _custom_split(S, M, v, defer)


def test_every_w_reads_the_carried_slot_its_own_b_wrote():
  """Replaying the tables of every zb and custom split schedule (S 2..4,
  M 2..9, 1 or 2 chunks, W right after B or deferred): the slot each W
  reads holds what the B of its (stage, microbatch) stored, not overwritten
  between; idle Bs write the trash slot."""
  count = 0
  for schedule in _split_schedules():
    rounds = pack(schedule)
    S = schedule.num_stages
    p = plan(rounds, list(range(S * schedule.virtual_stages)))
    t = p.tables
    held = {}  # (device, chunk, slot) -> (stage, microbatch)
    for r, row in enumerate(rounds.ops):
      for d, ops in enumerate(row):
        kinds = {op.kind: op for op in ops}
        if B in kinds:  # stored right after B, before the round's W reads
          op = kinds[B]
          assert t["b_carry"][r, d] < p.num_carry
          held[(d, op.chunk, t["b_carry"][r, d])] = (op.chunk * S + d, op.microbatch)
        else:
          assert t["b_carry"][r, d] == p.num_carry  # the trash slot
        if W in kinds:
          op = kinds[W]
          assert (t["w_chunk"][r, d], t["w_micro"][r, d]) == (op.chunk, op.microbatch)
          assert held.get((d, op.chunk, t["w_carry"][r, d])) == (
              op.chunk * S + d, op.microbatch), (schedule.name, S, schedule.num_microbatches, r, d)
    count += 1
  assert count == 21 + 3 * 8 * 4
