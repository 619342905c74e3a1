"""The executor's plan: schedules packed into lockstep rounds, and the vjp
residuals a stage keeps from its forward to its backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshnet
from meshnet.pipeline import make_pipeline, make_schedule, residuals
from meshnet.pipeline.rounds import KINDS, pack
from meshnet.pipeline.schedules import _dependencies


def _cases():
  for name in ("gpipe", "1f1b", "zb", "interleaved"):
    for S in (1, 2, 3, 4, 8):
      for M in sorted({S, S + 1, 2 * S, 4 * S}):
        yield name, S, M, 2 if name == "interleaved" else 1


def test_rounds_run_every_op_once_after_its_inputs():
  for name, S, M, v in _cases():
    schedule = make_schedule(name, S, M, v)
    rounds = pack(schedule)
    seen = {}
    for r, row in enumerate(rounds.ops):
      for d, ops in enumerate(row):
        kinds = [op.kind for op in ops]
        assert kinds == sorted(set(kinds), key=KINDS.index), (name, S, M, r, d, ops)
        for op in ops:
          assert (d, op) not in seen
          seen[(d, op)] = (r, KINDS.index(op.kind))
    for (d, op), (r, phase) in seen.items():
      for dep in _dependencies(op, d, S, v, schedule.split_backward):
        dep_round, dep_phase = seen[dep]
        if dep[0] == d:  # same device: earlier, or earlier in the same round
          assert (dep_round, dep_phase) < (r, phase), (name, S, M, op, dep)
        else:  # another device: sent at the end of an earlier round
          assert dep_round < r, (name, S, M, op, dep)
    table_ops = {(d, op) for row in schedule.table for d, op in enumerate(row) if op}
    assert set(seen) == table_ops


def test_lockstep_rounds_lose_nothing_to_the_timed_schedule():
  """GPipe, 1F1B and interleaved reach their asynchronous timed bubble in
  rounds (1F1B's 2 (S - d - 1) warm-up makes that possible); ZB-H1 beats
  1F1B, and at S=2 is what the issue's 2-process goal needs."""
  for name, S, M, v in _cases():
    schedule = make_schedule(name, S, M, v)
    rounds = pack(schedule)
    if name != "zb":
      assert rounds.bubble == pytest.approx(schedule.bubble), (name, S, M)
    elif S > 1:
      assert rounds.bubble < pack(make_schedule("1f1b", S, M)).bubble, (name, S, M)
  one_f_one_b = pack(make_schedule("1f1b", 2, 8))
  assert one_f_one_b.speedup == pytest.approx(2 * (1 - 1 / 9))
  assert one_f_one_b.num_rounds == 10  # 8 rounds of F+B on both devices, plus ramp


# --- residuals ------------------------------------------------------------------

def _check_rebuilt_pullback(fn, flat, x, *data):
  """The pullback rebuilt from packed stored leaves and leaves recomputed on
  zero inputs equals jax.vjp's; returns the layout."""
  lay = residuals.layout(fn, flat, x, *data)
  out, leaves = residuals.leaves_fn(fn)(flat, x, *data)
  vector = residuals.pack(leaves, lay, lay.size + 3)
  zero_data = [jnp.zeros_like(a) for a in data]
  _, recomputed = residuals.leaves_fn(fn)(flat, jnp.zeros_like(x), *zero_data)
  rebuilt = residuals.pullback(lay, residuals.unpack(vector, lay), recomputed)
  ct = jax.random.normal(jax.random.key(5), out.shape, out.dtype)
  expected = jax.vjp(lambda f, a: fn(f, a, *data), flat, x)[1](ct)
  for got, want in zip(rebuilt(ct), expected):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  return lay


def test_a_stage_keeps_activations_not_weights():
  model = meshnet.models.mlp([64, 256, 256, 256, 10])
  mesh = meshnet.make_mesh(stage=2, data=1, devices=jax.devices()[:2])
  pipe = make_pipeline(model, mesh, (64,), schedule="1f1b", microbatches=2)
  stacked = np.asarray(pipe.stack(model.init(jax.random.key(0))))
  mb = 8
  x = jax.random.normal(jax.random.key(1), (mb, pipe.activation_width))
  y = jnp.arange(mb) % 10
  for k in range(2):
    fn = lambda f, a, y, k=k: (
        pipe._stage_forward(k, f, a, None, True) if k == 0 else
        jnp.mean(meshnet.losses.cross_entropy(pipe._stage_forward(k, f, a, None, True), y)))
    lay = _check_rebuilt_pullback(fn, jnp.asarray(stacked[k, 0]), x, y)
    # Two 256-wide layers per stage: an input and a mask per layer, no weights.
    assert lay.size <= 2 * 2 * mb * pipe.activation_width
    # Each per example, [mb, ...] (the input a dense layer keeps is
    # [width, mb] on CPU: meshnet.nn.matmul keeps it transposed).
    assert all(mb in s for s in lay.shapes), lay.shapes


def test_values_that_depend_on_the_input_only_through_control_flow_are_kept():
  """A weight chosen by a branch on the input, scaled a number of times the
  input decides, or carried through a scan with the input: recomputing it
  from zero inputs would give another value, so it must be stored."""
  w = jax.random.normal(jax.random.key(0), (4, 4))
  x = jax.random.normal(jax.random.key(1), (3, 4)) + 2.0  # sum > 0

  def branch(w, x):
    scale = jax.lax.cond(x.sum() > 0, lambda: 2.0 * w, lambda: -3.0 * w)
    return jnp.tanh(x @ scale)

  def loop(w, x):
    n = jnp.minimum(jnp.abs(x.sum()).astype(jnp.int32), 5)
    # The factor's only link to x is the loop's trip count.
    _, factor = jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 1.5),
                                   (0, jnp.float32(1.0)))
    return jnp.sin(x @ (w * factor))

  def carried(w, x):
    def body(carry, _):
      h, v = carry
      return (jnp.tanh(h @ v), v + h[:1].T @ h[:1]), None
    (h, _), _ = jax.lax.scan(body, (x, w), None, length=3)
    return h

  @jax.custom_vjp
  def clipped(a):
    return jnp.clip(a, -1, 1)
  clipped.defvjp(lambda a: (clipped(a), a), lambda a, g: (g * (jnp.abs(a) < 1),))

  def custom(w, x):
    return clipped(jax.jit(lambda a, b: a @ b)(x, w))

  for fn in (branch, loop, carried, custom):
    _check_rebuilt_pullback(fn, w, x)


def test_keys_and_labels_count_as_per_microbatch_inputs():
  w = jax.random.normal(jax.random.key(0), (4, 4))
  x = jax.random.normal(jax.random.key(1), (3, 4))
  keys = jax.random.key_data(jax.random.split(jax.random.key(2), 3))
  y = jnp.array([0, 2, 3])

  def fn(w, x, keys, y):
    keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.wrap_key_data(k), 0.5, (4,)))(
        keys)
    h = jnp.where(keep, x @ w, 0.0) * 2.0
    return jnp.mean(meshnet.losses.cross_entropy(h, y))

  lay = _check_rebuilt_pullback(fn, w, x, keys, y)
  assert lay.stored  # the mask is kept


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint16", "bfloat16", "float16",
                                   "float32", "int32", "uint32"])
def test_packed_residuals_are_bit_exact(dtype):
  values = np.array([0, 1, 3, 255, 7, 65535, 2, 9], np.int64)
  if dtype == "bool":
    leaf = jnp.asarray(values % 2 == 1)
  elif dtype in ("bfloat16", "float16", "float32"):
    leaf = jnp.asarray([0.0, -0.0, 1.5, np.inf, -np.inf, np.nan, 1e-7, -3.25], dtype)
  else:
    leaf = jnp.asarray(values % np.iinfo(dtype).max, dtype)
  leaf = leaf.reshape(2, 4)
  lay = residuals.Layout(None, (0,), ((2, 4),), (leaf.dtype,), (0,), 8)
  (back,) = residuals.unpack(residuals.pack([leaf], lay, 11), lay)
  assert back.dtype == leaf.dtype and back.shape == leaf.shape
  as_bits = lambda a: np.asarray(a).view(np.uint8) if a.dtype != jnp.bool_ else np.asarray(a)
  np.testing.assert_array_equal(as_bits(back), as_bits(leaf))


def test_rounds_timed_with_each_stages_own_op_costs():
  """Unequal stages: each round lasts as long as its busiest device's own
  ops (1F1B, S=2, M=2: rounds F0 | -, F1 | F0 B0, B0 | F1 B1, B1 | -)."""
  rounds = pack(make_schedule("1f1b", 2, 2))
  assert rounds.timed() == (sum(rounds.round_times()), 12.0)  # F = 1, B = 2
  seconds = {("F", 0): 1.0, ("B", 0): 1.0, ("F", 1): 2.0, ("B", 1): 3.0}
  assert rounds.round_times(seconds) == [1.0, 5.0, 5.0, 1.0]
  assert rounds.timed(seconds) == (12.0, 14.0)
  # interleaved: device d's chunk c is virtual stage c * S + d. Rounds:
  # F0 | -, F1 | F0, F0.1 | F1, F1.1 | F0.1 B0.1, B0.1 | F1.1 B1.1, ...
  inter = pack(make_schedule("interleaved", 2, 2, 2))
  costs = {(kind, k): (10.0 ** k if kind == "F" else 0.0) for kind in ("F", "B")
           for k in range(4)}
  assert inter.round_times(costs) == [1.0, 10.0, 100.0, 1000.0, 1000.0, 0.0, 0.0, 0.0]
  assert inter.timed(costs)[1] == 2 * (1 + 10 + 100 + 1000)  # every F of M = 2
  with pytest.raises(meshnet.MeshnetError, match=r"lack \[\('B', 0\), \('B', 1\), \('F', 1\)\]"):
    rounds.timed({("F", 0): 1.0})
