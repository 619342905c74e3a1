"""Pipeline parallelism equals the same layers run one after another on one device."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshnet
from meshnet import cli, losses
from meshnet.config import Config, MeshConfig, ModelConfig, PipelineConfig, TrainConfig
from meshnet.metrics import read_metrics
from meshnet.pipeline import make_pipeline, make_schedule
from meshnet.pipeline import schedules as sched
from meshnet.pipeline.plan import plan
from meshnet.pipeline.rounds import pack

import reference

TIGHT = dict(rtol=2e-5, atol=2e-6)
UNEQUAL = [64, 48, 40, 32, 24, 10]  # 5 layers of different shapes
DEEP = [64, 48, 40, 36, 32, 28, 24, 16, 10]  # 8 layers, for interleaved chunks


def _mesh(stage, data=None):
  data = data or max(1, 8 // stage // 2 * 2) if stage < 8 else 1
  data = min(data, 8 // stage)
  return meshnet.make_mesh(data=data, stage=stage, devices=jax.devices()[:data * stage])


@pytest.fixture(scope="module")
def digits():
  return meshnet.load_dataset("digits")


def _pipeline_vs_reference(widths, schedule, stages, microbatches, virtual, digits,
                           batch_per_micro=2, fill=0.0, poison_params=False, remat=False):
  model = meshnet.models.mlp(widths)
  mesh = _mesh(stages)
  data = mesh.shape["data"]
  pipe = make_pipeline(model, mesh, (widths[0],), schedule=schedule,
                       microbatches=microbatches, virtual_stages=virtual, remat=remat)
  params = model.init(jax.random.key(0))
  stacked = pipe.stack(params)
  if poison_params:  # NaN in every padding entry of the stacked parameters
    mask = np.zeros(stacked.shape, bool)
    S = stages
    for k, size in enumerate(pipe._sizes):
      mask[k % S, k // S, size:] = True
    stacked = jax.device_put(jnp.where(mask, jnp.nan, stacked), stacked.sharding)
  B = data * microbatches * batch_per_micro
  x, y = digits.x_train[:B], digits.y_train[:B]
  grad_fn = jax.jit(pipe.make_grad_fn(return_stats=True, _fill=fill))
  loss, grads, stats = grad_fn(stacked, (x, y), jax.random.key(1))
  ref_loss, ref_grads = reference.loss_and_grad(model, losses.cross_entropy, params, x, y)
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  unstacked = pipe.unstack(grads)
  chex.assert_trees_all_close(reference.to_numpy(unstacked), reference.to_numpy(ref_grads),
                              **TIGHT)
  return pipe, stats


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb"])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_schedules_match_single_device(schedule, stages, digits):
  microbatches = {2: 3, 3: 4, 4: 8}[stages]
  pipe, stats = _pipeline_vs_reference(UNEQUAL, schedule, stages, microbatches, 1, digits)
  # The executor ran exactly the table: every device all rounds, every op once.
  table = pipe.schedule.table
  np.testing.assert_array_equal(stats["rounds"], [pipe.rounds.num_rounds] * stages)
  np.testing.assert_array_equal(
      stats["ops"], [sum(row[d] is not None for row in table) for d in range(stages)])


@pytest.mark.parametrize("schedule, stages, virtual", [("1f1b", 3, 1), ("zb", 4, 1),
                                                      ("interleaved", 2, 2)])
def test_remat_recomputes_the_same_gradient(schedule, stages, virtual, digits):
  """--remat keeps stage inputs instead of residuals; NaN-poisoned buffers
  and padding show it reads nothing it did not write."""
  _pipeline_vs_reference(DEEP, schedule, stages, 2 * stages, virtual, digits, remat=True,
                         fill=float("nan"), poison_params=True)


@pytest.mark.parametrize("stages, virtual, microbatches", [
    (2, 2, 4), (2, 4, 4), (4, 2, 8),
    (2, 2, 3), (4, 2, 6), (4, 2, 9),  # M % S != 0: one round of 3 or 6; rounds of 5 and 4
])
def test_interleaved_matches_single_device(stages, virtual, microbatches, digits):
  pipe, stats = _pipeline_vs_reference(DEEP, "interleaved", stages, microbatches, virtual,
                                       digits)
  table = pipe.schedule.table
  np.testing.assert_array_equal(stats["rounds"], [pipe.rounds.num_rounds] * stages)
  np.testing.assert_array_equal(
      stats["ops"], [sum(row[d] is not None for row in table) for d in range(stages)])


def _assert_mse_pipeline_matches(pipe, params, x, y, key):
  """The pipeline's mse loss and gradient equal the model's on one device."""
  loss, grads = jax.jit(pipe.make_grad_fn(loss="mse"))(pipe.stack(params), (x, y), key)
  ref_loss, ref_grads = reference.loss_and_grad(pipe.model, losses.squared_error, params,
                                                x, y)
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(pipe.unstack(grads)),
                              reference.to_numpy(ref_grads), **TIGHT)


def test_xor_layers_on_two_stages_and_a_three_layer_net_on_three():
  for widths, stages in (([2, 4, 1], 2), ([2, 8, 4, 1], 3)):
    model = meshnet.models.mlp(widths)
    mesh = _mesh(stages, data=1)
    pipe = make_pipeline(model, mesh, (2,), schedule="1f1b", microbatches=stages)
    assert pipe.bounds == tuple(range(stages + 1))  # one layer per stage
    ds = meshnet.load_dataset("xor")
    x = np.tile(ds.x_train, (stages, 1))
    y = np.tile(ds.y_train, (stages, 1))
    _assert_mse_pipeline_matches(pipe, model.init(jax.random.key(3)), x, y,
                                 jax.random.key(0))


@pytest.mark.parametrize("schedule", ["1f1b", "zb"])
def test_nan_poisoned_padding_and_buffers_leak_nothing(schedule, digits):
  """Unwritten buffer entries and the parameter padding are NaN; a leak from
  an idle tick or a padded column would make the loss or a gradient NaN."""
  _pipeline_vs_reference(UNEQUAL, schedule, 4, 4, 1, digits, fill=float("nan"),
                         poison_params=True)


def test_training_steps_with_data_and_stage_equal_single_device(digits):
  """data=2, stage=4, 1F1B, Adam with clipping: parameters after 3 steps."""
  model = meshnet.models.mlp(UNEQUAL)
  optimizer = meshnet.make_optimizer(
      meshnet.OptimConfig(optimizer="adam", lr=1e-2, clip_norm=0.5), 3)
  mesh = meshnet.make_mesh(data=2, stage=4)
  pipe = make_pipeline(model, mesh, (64,), schedule="1f1b", microbatches=8)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0), pipeline=pipe)
  # The state is the model's own tree, as without a pipeline.
  assert [p["w"].shape for p in state.params] == [(64, 48), (48, 40), (40, 32), (32, 24),
                                                   (24, 10)]
  initial = reference.to_numpy(state.params)
  step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
  sampler = meshnet.BatchSampler(len(digits.x_train), 64, seed=1)
  batches = [(digits.x_train[i], digits.y_train[i]) for i in (next(sampler) for _ in range(3))]
  pipe_losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    pipe_losses.append(float(metrics["loss"]))
  ref_params, ref_losses = reference.train(model, losses.cross_entropy, optimizer, initial,
                                           batches)
  np.testing.assert_allclose(pipe_losses, ref_losses, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(state.params),
                              reference.to_numpy(ref_params), rtol=1e-4, atol=1e-6)


def test_run_trains_digits_on_data_2_stage_4():
  config = Config(
      mesh=MeshConfig(data=2, stage=4),
      model=ModelConfig(hidden=(128, 96, 64)),
      pipeline=PipelineConfig(schedule="1f1b", microbatches=8),
      optim=meshnet.OptimConfig(grad_accum=2),
      train=TrainConfig(steps=120, eval_every=120, progress=False),
  )
  result = meshnet.train.run(config, log=lambda _: None)
  assert result.eval["eval_accuracy"] >= 0.9
  assert [p["w"].shape for p in result.params] == [(64, 128), (128, 96), (96, 64), (64, 10)]


def test_meshnet_train_interleaved_with_5_microbatches_on_4_stages(tmp_path, capsys):
  """M % S != 0 through the command: accepted, the 23.1% bubble, and it trains."""
  metrics_file = tmp_path / "m.jsonl"
  assert cli.main([
      "train", "--devices", "4", "--mesh", "stage=4", "--schedule", "interleaved",
      "--microbatches", "5", "--virtual-stages", "2", "--hidden", "64,64,48,48,32,32,16",
      "--batch-size", "40", "--lr", "3e-3", "--steps", "40", "--log-every", "10",
      "--eval-every", "40", "--no-progress", "--metrics-file", str(metrics_file),
  ]) == 0
  captured = capsys.readouterr()
  assert "interleaved: S=4, M=5, v=2, 26 ticks, bubble 23.1%" in captured.out + captured.err
  records = read_metrics(str(metrics_file))
  train_losses = [r["loss"] for r in records if "loss" in r]
  assert len(train_losses) == 4 and train_losses[-1] < 0.7 * train_losses[0]
  assert [r["eval_accuracy"] for r in records if "eval_accuracy" in r][0] >= 0.6


def test_schedule_theory():
  for S, M in [(2, 3), (3, 6), (4, 4), (4, 8), (4, 16)]:
    theory = (S - 1) / (M + S - 1)
    for name in ("gpipe", "1f1b"):
      s = make_schedule(name, S, M)
      assert s.num_ticks == 2 * (M + S - 1)
      assert s.bubble == pytest.approx(theory)
    zb = make_schedule("zb", S, M)
    assert zb.bubble < 0.5 * theory  # about a third of 1F1B's
  for S, M, v in [(2, 4, 2), (4, 8, 2), (4, 16, 3)]:
    # interleaved: bubble (S-1)/(v M) of the ideal time
    s = make_schedule("interleaved", S, M, v)
    assert s.bubble / (1 - s.bubble) == pytest.approx((S - 1) / (v * M))


def _stash(name, S, M):
  """Residual slots (microbatches kept from forward to backward) per chunk."""
  schedule = make_schedule(name, S, M)
  return plan(pack(schedule), [0] * S).num_res


def _in_flight(schedule):
  """Per device, the most chunk activations held at once: forwards run whose
  backward has not."""
  most = []
  for d in range(schedule.num_stages):
    held = peak = 0
    for row in schedule.table:
      if row[d] is not None:
        held += {sched.F: 1, sched.B: -1}[row[d].kind]
        peak = max(peak, held)
    most.append(peak)
  return most


def test_interleaved_takes_any_microbatches_from_the_stage_count():
  """Every S <= 8, v <= 4, S <= M <= 4S + 3: a valid table with each op once,
  the bubble (S-1)/(vM+S-1) (no more than 1F1B's), bounded activations."""
  for S in range(1, 9):
    for v in range(1, 5):
      for M in range(S, 4 * S + 4):
        s = make_schedule("interleaved", S, M, v)
        sched.validate(s)
        ops = [(d, op) for row in s.table for d, op in enumerate(row) if op is not None]
        assert len(ops) == len(set(ops)) == 2 * S * v * M
        assert s.bubble == pytest.approx((S - 1) / (v * M + S - 1))
        assert s.bubble <= make_schedule("1f1b", S, M).bubble + 1e-12
        first_round = -(-M // (M // S))  # rounds of S to 2S - 1, the larger first
        in_flight = _in_flight(s)
        assert max(in_flight) == in_flight[0] == min((v - 1) * first_round + 2 * S - 1, v * M)
        assert max(in_flight) <= v * (2 * S - 1)


def test_interleaved_with_microbatches_a_multiple_of_stages_is_megatrons():
  """M % S == 0: Megatron's groups of S; device d warms up with
  2(S-d-1) + (v-1)S forwards, then runs the last chunk's backward of microbatch 0."""
  S, M, v = 4, 8, 2
  s = make_schedule("interleaved", S, M, v)
  forwards = [sched.Op(sched.F, g * S + i, c) for g in range(M // S) for c in range(v)
              for i in range(S)]
  for d in range(S):
    order = [row[d] for row in s.table if row[d] is not None]
    warmup = 2 * (S - d - 1) + (v - 1) * S
    assert order[:warmup + 2] == forwards[:warmup + 1] + [sched.Op(sched.B, 0, v - 1)]


def test_1f1b_stash_does_not_grow_with_microbatches():
  for M in (4, 8, 16, 32):
    assert _stash("1f1b", 4, M) <= 2 * 4 - 1
    assert _stash("gpipe", 4, M) == M
    assert _stash("zb", 4, M) <= 2 * 4


def test_custom_table_is_validated():
  F, B = sched.F, sched.B
  good = [[(F, 0), None], [(F, 1), (F, 0)], [None, (B, 0)], [(B, 0), (F, 1)], [None, (B, 1)],
          [(B, 1), None]]
  schedule = sched.custom(good, num_microbatches=2)
  assert schedule.num_ticks == 6
  early = [[(F, 0), (F, 0)]] + good[1:]
  with pytest.raises(meshnet.MeshnetError, match=r"tick 0, stage 1: F0 needs F0 on stage 0 "
                     "at least one tick earlier"):
    sched.custom(early, num_microbatches=2)
  backward_first = [[(B, 0), None]] + good
  with pytest.raises(meshnet.MeshnetError, match=r"tick 0, stage 0: B0 needs F0"):
    sched.custom(backward_first, num_microbatches=2)
  with pytest.raises(meshnet.MeshnetError, match="stage 0 never runs B1"):
    sched.custom(good[:-1], num_microbatches=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(widths=[64, 32, 10], stages=4), "4 pipeline stages but the model has only 2 layers"),
    (dict(schedule="1f1b", microbatches=2), "schedule 1f1b needs microbatches >= stages, "
     "got 2 < 4"),
    (dict(schedule="pipedream"), "unknown schedule 'pipedream'"),
    (dict(schedule="interleaved", microbatches=3, virtual=2), "schedule interleaved needs "
     r"microbatches >= stages, got 3 < 4; use --microbatches 4 or more"),
])
def test_bad_pipeline_input(kwargs, message):
  widths = kwargs.get("widths", DEEP)
  stages = kwargs.get("stages", 4)
  mesh = _mesh(stages)
  with pytest.raises(meshnet.MeshnetError, match=message):
    make_pipeline(meshnet.models.mlp(widths), mesh, (64,),
                  schedule=kwargs.get("schedule", "1f1b"),
                  microbatches=kwargs.get("microbatches", 4),
                  virtual_stages=kwargs.get("virtual", 1))


def test_batch_must_split_into_microbatches(digits):
  mesh = meshnet.make_mesh(data=2, stage=4)
  pipe = make_pipeline(meshnet.models.mlp(UNEQUAL), mesh, (64,), microbatches=8)
  grad_fn = pipe.make_grad_fn()
  stacked = pipe.stack(pipe.model.init(jax.random.key(0)))
  with pytest.raises(meshnet.MeshnetError, match=r"global batch size 24 is not divisible by "
                     r"data=2 x microbatches=8 = 16"):
    grad_fn(stacked, (digits.x_train[:24], digits.y_train[:24]), jax.random.key(0))


def test_timeline_text_and_png(tmp_path):
  schedule = make_schedule("zb", 4, 8)
  path = tmp_path / "zb.png"
  text = meshnet.pipeline.timeline(schedule, str(path))
  lines = text.splitlines()
  assert lines[0].startswith("zb: S=4, M=8, 27 ticks, bubble 11.1%")
  assert len(lines) == 5 and all(line.startswith(f"stage {d}:")
                                 for d, line in enumerate(lines[1:]))
  assert lines[1].split()[2:6] == ["F0", "F1", "F2", "F3"]
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_timeline_png_leaves_the_callers_matplotlib_backend(tmp_path):
  """Drawing a timeline in a notebook must not turn its inline plots off
  (pyplot's backend switched to Agg did)."""
  import matplotlib

  before = matplotlib.get_backend()
  matplotlib.use("svg")
  try:
    meshnet.pipeline.save_png(make_schedule("1f1b", 2, 4), str(tmp_path / "t.png"))
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)
  assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_identical_blocks_share_one_branch_whatever_the_depth(digits):
  """Middle stages of identical blocks compile to one branch, and a stage's
  identical blocks to one scan, so the program does not grow with depth or
  stage count; the result is still exact."""
  sizes = {}
  for depth in (16, 32):
    widths = [64] + [32] * (depth - 1) + [10]
    for stages in (2, 4):
      mesh = _mesh(stages, data=1)
      model = meshnet.models.mlp(widths)
      pipe = make_pipeline(model, mesh, (64,))
      expected = 2 if stages == 2 else 3  # first (reads x), middle blocks, last (loss)
      assert len(set(pipe.stage_groups)) == expected, (depth, stages, pipe.stage_groups)
      x, y = np.zeros((stages, 64), np.float32), np.zeros(stages, np.int32)
      program = jax.jit(pipe.make_grad_fn()).lower(
          pipe.stack(model.init(jax.random.key(0))), (x, y), jax.random.key(0)).as_text()
      sizes[(depth, stages)] = len(program)
  for stages in (2, 4):
    assert sizes[(32, stages)] < 1.01 * sizes[(16, stages)], sizes
  _pipeline_vs_reference([64] + [32] * 7 + [10], "1f1b", 4, 4, 1, digits)
  _pipeline_vs_reference([64] + [32] * 7 + [10], "zb", 2, 2, 1, digits)


def _closing_layers(consts):
  """Layers that differ only in an array each closes over."""
  def make(c):
    def init(key):
      return {"w": 0.3 * jax.random.normal(key, (16, 16))}

    def apply(p, x):
      return jnp.tanh(x @ p["w"]) * c[None, :]
    return meshnet.Model(init, apply)
  return meshnet.sequential([make(jnp.asarray(c, jnp.float32)) for c in consts])


def test_layers_that_close_over_different_arrays_are_not_merged():
  """Eight layers `tanh(x @ w) * const_i` print the same jaxpr; sharing their
  code must not drop the constants (it gave loss 22.98 for 56.06)."""
  x = jax.random.normal(jax.random.key(1), (8, 16))
  y = jnp.zeros((8, 16))
  for consts, merged in (([np.full(16, i + 1.0) for i in range(8)], False),
                         ([np.full(16, 2.0) for _ in range(8)], True)):
    model = _closing_layers(consts)
    mesh = _mesh(2, data=1)
    pipe = make_pipeline(model, mesh, (16,), schedule="1f1b", microbatches=2)
    assert (pipe._runs[0] == ((0, 4),)) == merged, pipe._runs  # equal arrays still share
    _assert_mse_pipeline_matches(pipe, model.init(jax.random.key(0)), x, y,
                                 jax.random.key(2))


def _inner_jit_layer(c):
  table = jnp.full((16,), c, jnp.float32)
  scale = jax.jit(lambda h: h * table[None, :])  # the constant lives in a nested program
  return meshnet.Model(lambda k: {"w": 0.3 * jax.random.normal(k, (16, 16))},
                       lambda p, x: scale(jnp.tanh(x @ p["w"])))


def _custom_vjp_layer(c):
  @jax.custom_vjp
  def reverse(h):
    return h

  reverse.defvjp(lambda h: (h, None), lambda _, g: (-c * g,))  # only the backward differs
  return meshnet.Model(lambda k: {"w": 0.3 * jax.random.normal(k, (16, 16))},
                       lambda p, x: reverse(jnp.tanh(x @ p["w"])))


def _key_closure_layer(c):
  projection = jax.random.key(int(c))  # a typed key closed over
  return meshnet.Model(
      lambda k: {"w": 0.3 * jax.random.normal(k, (16, 16))},
      lambda p, x: jnp.tanh(x @ p["w"]) @ jax.random.normal(projection, (16, 16)))


@pytest.mark.parametrize("make", [_inner_jit_layer, _custom_vjp_layer, _key_closure_layer])
@pytest.mark.parametrize("stages", [2, 4])
def test_layers_that_differ_where_a_jaxpr_does_not_print_are_not_merged(make, stages):
  """Constants of nested programs, custom derivative rules, closed-over keys."""
  model = meshnet.sequential([make(c) for c in (1.0, 5.0, 1.0, 1.0)])
  pipe = make_pipeline(model, _mesh(stages, data=1), (16,), schedule="gpipe",
                       microbatches=stages)
  x = jax.random.normal(jax.random.key(1), (8, 16))
  y = jax.random.normal(jax.random.key(2), (8, 16))
  _assert_mse_pipeline_matches(pipe, model.init(jax.random.key(0)), x, y,
                               jax.random.key(2))


def test_a_pipelined_model_needs_one_params_entry_per_layer():
  layer = meshnet.Model(lambda k: {"w": jnp.ones((4, 4))}, lambda p, x: x @ p["w"])
  model = meshnet.Model(lambda k: {"a": layer.init(k), "b": layer.init(k)},
                        lambda p, x: layer.apply(p["b"], layer.apply(p["a"], x)),
                        layers=(layer, layer))
  with pytest.raises(meshnet.MeshnetError, match="one entry per layer"):
    make_pipeline(model, _mesh(2, data=1), (4,))


def test_layers_that_differ_only_in_evaluation_are_not_merged():
  """Same code when training, different when not: not one branch."""
  def make(scale):
    def apply(p, x, *, train=False, key=None):
      return x @ p["w"] if train else scale * (x @ p["w"])
    return meshnet.Model(lambda k: {"w": jax.random.normal(k, (8, 8))}, apply)
  model = meshnet.sequential([make(1.0), make(2.0), make(3.0), make(4.0)])
  pipe = make_pipeline(model, _mesh(2, data=1), (8,), microbatches=2)
  assert pipe._runs == (((0, 1), (1, 2)), ((0, 1), (1, 2)))
  params = model.init(jax.random.key(0))
  x = np.ones((4, 8), np.float32)
  out = jax.jit(pipe.make_grad_fn(loss="mse", train=False))(
      pipe.stack(params), (x, np.zeros((4, 8), np.float32)), jax.random.key(0))[0]
  ref = np.mean(np.square(np.asarray(model.apply(params, x, train=False))))
  np.testing.assert_allclose(out, ref, rtol=2e-5)


def _rank_mask(params):
  return jax.tree.map(lambda a: a.ndim > 1, params)


def _path_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jax.tree_util.keystr(path).endswith("['w']"), params)


@pytest.mark.parametrize("name, make", [
    ("adamw rank mask", lambda: optax.adamw(1e-2, weight_decay=0.5, mask=_rank_mask)),
    ("adamw path mask", lambda: optax.adamw(1e-2, weight_decay=0.5, mask=_path_mask)),
    ("lamb", lambda: optax.lamb(1e-2)),
    ("lars", lambda: optax.lars(1e-1)),
    ("adafactor", lambda: optax.adafactor(1e-2, min_dim_size_to_factor=8)),
    ("clip + sgd", lambda: optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(0.5))),
])
def test_any_optax_transformation_updates_as_without_a_pipeline(name, make, digits):
  """The optimizer sees the real parameter tree under a pipeline: per-leaf
  rules (masks by rank or path, LAMB/LARS trust ratios, Adafactor's factored
  moments) give the unpipelined update (biases differed by 1.5e-4)."""
  model = meshnet.models.mlp([64, 32, 32, 10])
  optimizer = make()
  mesh = meshnet.make_mesh(data=2, stage=2, devices=jax.devices()[:4])
  pipe = make_pipeline(model, mesh, (64,), schedule="1f1b", microbatches=2)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0), pipeline=pipe)
  initial = reference.to_numpy(state.params)
  step = meshnet.make_train_step(model, optimizer, mesh, pipeline=pipe)
  sampler = meshnet.BatchSampler(len(digits.x_train), 32, seed=2)
  batches = [(digits.x_train[i], digits.y_train[i]) for i in (next(sampler) for _ in range(3))]
  for batch in batches:
    state, _ = step(state, batch)
  ref_params, _ = reference.train(model, losses.cross_entropy, optimizer, initial, batches)
  chex.assert_trees_all_close(reference.to_numpy(state.params),
                              reference.to_numpy(ref_params), rtol=1e-5, atol=1e-7)


def test_parameter_free_and_mixed_precision_layers_pipeline():
  """Two identical parameter-free layers form a run with nothing to scan
  over; bf16 and tuple parameters go through the stage's flat vector and
  come back with their dtypes."""
  def act():
    return meshnet.Model(lambda key: {}, lambda p, x: jnp.tanh(x))

  def dense(n_in, n_out, dtype=jnp.float32):
    def init(key):
      return (0.3 * jax.random.normal(key, (n_in, n_out))).astype(dtype), jnp.zeros(n_out)
    return meshnet.Model(init, lambda p, x: x @ p[0].astype(jnp.float32) + p[1][None, :])

  model = meshnet.sequential([dense(16, 16), act(), act(), dense(16, 16, jnp.bfloat16),
                              dense(16, 8)])
  pipe = make_pipeline(model, _mesh(2, data=1), (16,), schedule="zb", microbatches=2)
  params = model.init(jax.random.key(0))
  assert [type(p).__name__ for p in pipe.unstack(pipe.stack(params))][:2] == ["tuple", "dict"]
  assert pipe.unstack(pipe.stack(params))[3][0].dtype == jnp.bfloat16
  x, y = jax.random.normal(jax.random.key(1), (8, 16)), jnp.zeros((8, 8))
  loss, grads = jax.jit(pipe.make_grad_fn(loss="mse"))(pipe.stack(params), (x, y),
                                                         jax.random.key(2))
  ref_loss, ref_grads = reference.loss_and_grad(model, losses.squared_error, params, x, y)
  np.testing.assert_allclose(loss, ref_loss, **TIGHT)
  for got, want in zip(jax.tree.leaves(pipe.unstack(grads)), jax.tree.leaves(ref_grads)):
    assert got.dtype == want.dtype
    # bf16: the pipeline sums microbatch gradients in float32, the reference
    # rounds the whole batch's once: one bf16 step apart at most.
    tol = dict(atol=2e-3, rtol=1e-2) if want.dtype == jnp.bfloat16 else TIGHT
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
