"""The GPT model (meshnet.models.gpt): shapes, causality, stacked blocks and
their names, every unpipelined layout against one device, bf16, remat, and
the analytic FLOPs against XLA's count."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import meshnet
from meshnet import cli, compute, flops
from meshnet.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from meshnet.data import Dataset
from meshnet.models.gpt import GPT_SIZES, gpt, gpt_config
from meshnet.sharding import batch_sharding
from meshnet.train import run

import reference

TINY = dict(layers=2, heads=4, width=32, context=16)
TIGHT = dict(rtol=2e-5, atol=2e-6)
B, T, V = 8, 16, 256


def token_loss(logits_BxTxV, targets_BxT):
  """Per-sequence mean token cross-entropy ``[B, T, V], [B, T] -> [B]``,
  written out (log-softmax, pick the target) as the reference."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  return -jnp.mean(picked, axis=-1)


def _batches(n=3, seed=0):
  """``n`` next-token batches ``(x [B, T], y [B, T])`` of random bytes."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    seq = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    out.append((seq[:, :-1], seq[:, 1:]))
  return out


def _put(mesh, batch):
  return tuple(jax.device_put(a, batch_sharding(mesh)) for a in batch)


def _leaf_shapes(tree):
  return {jax.tree_util.keystr(p): tuple(a.shape)
          for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def test_shapes_and_stacked_leaves():
  model = gpt(None, **TINY)
  params = model.init(jax.random.key(0))
  x, _ = _batches(1)[0]
  logits = jax.jit(model.apply)(params, x)
  assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
  assert jax.eval_shape(model.apply, params, x[:, :5]).shape == (B, 5, V)  # shorter ok
  shapes = _leaf_shapes(params)
  D, H, K, F, L = 32, 4, 8, 128, 2
  assert shapes == {
      "['blocks']['attn']['out']": (L, H, K, D), "['blocks']['attn']['qkv']": (L, D, 3, H, K),
      "['blocks']['attn_norm']['bias']": (L, D), "['blocks']['attn_norm']['scale']": (L, D),
      "['blocks']['mlp']['down']": (L, F, D), "['blocks']['mlp']['up']": (L, D, F),
      "['blocks']['mlp_norm']['bias']": (L, D), "['blocks']['mlp_norm']['scale']": (L, D),
      "['embed']['positions']['table']": (T, D), "['embed']['tokens']['table']": (V, D),
      "['head']['norm']['bias']": (D,), "['head']['norm']['scale']": (D,),
      "['head']['w']": (D, V)}
  # Rotary positions have no table; a tied head no matrix; RMS norms no bias.
  other = gpt(None, **TINY, positions="rotary", tie_embeddings=True, norm="rms")
  shapes = _leaf_shapes(other.init(jax.random.key(0)))
  assert "['embed']['positions']['table']" not in shapes and "['head']['w']" not in shapes
  assert not any("bias" in name for name in shapes)
  assert jax.eval_shape(other.apply, other.init(jax.random.key(0)), x).shape == (B, T, V)


@pytest.mark.parametrize("options", [{}, dict(positions="rotary", norm="rms",
                                               tie_embeddings=True)],
                         ids=["learned", "rotary"])
def test_logical_axes_name_every_dimension(options):
  model = gpt(None, **TINY, **options)
  params = jax.eval_shape(model.init, jax.random.key(0))
  is_spec = lambda s: isinstance(s, P)
  assert (jax.tree.structure(model.logical_axes, is_leaf=is_spec)
          == jax.tree.structure(jax.tree.map(lambda _: P(), params), is_leaf=is_spec))
  for (path, spec), leaf in zip(
      jax.tree_util.tree_leaves_with_path(model.logical_axes, is_leaf=is_spec),
      jax.tree.leaves(params)):
    assert len(spec) == leaf.ndim, (jax.tree_util.keystr(path), spec, leaf.shape)
    assert (spec[0] == "layers") == (path[0].key == "blocks")
  names = model.logical_axes["blocks"]
  # Megatron pairs: column-split over heads/mlp, then row-split back to embed.
  assert names["attn"] == {"qkv": P("layers", "embed", None, "heads", "kv"),
                           "out": P("layers", "heads", "kv", "embed")}
  assert names["mlp"] == {"up": P("layers", "embed", "mlp"),
                          "down": P("layers", "mlp", "embed")}


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_a_later_token_does_not_change_earlier_logits(positions):
  model = gpt(None, **TINY, positions=positions)
  params = model.init(jax.random.key(0))
  x, _ = _batches(1)[0]
  t = 6
  changed = x.copy()
  changed[:, t + 1] = (changed[:, t + 1] + 1) % V
  before, after = model.apply(params, x), model.apply(params, changed)
  np.testing.assert_array_equal(before[:, :t + 1], after[:, :t + 1])
  assert np.abs(np.asarray(before[:, t + 1:] - after[:, t + 1:])).min(axis=-1).max() > 0


def test_the_compiled_program_does_not_grow_with_depth():
  x, _ = _batches(1)[0]

  def hlo_size(layers):
    model = gpt(None, **{**TINY, "layers": layers})
    params = jax.eval_shape(model.init, jax.random.key(0))
    return len(jax.jit(model.apply).lower(params, x).as_text().splitlines())

  assert hlo_size(12) == hlo_size(2)  # one scanned block, whatever the depth


LAYOUTS = [dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(fsdp=8)]


@pytest.fixture(scope="module")
def one_device():
  """The one-device references, shared by the layouts: loss and gradient of
  the first batch (plain ``jax.grad``), and 3 plain optax Adam steps from
  the state ``init_train_state`` builds."""
  model = gpt(None, **TINY)
  params = model.init(jax.random.key(0))
  batches = _batches(3)
  loss, grads = reference.loss_and_grad(model, token_loss, params, *batches[0])
  optimizer = optax.adam(1e-2)
  one = meshnet.make_mesh(data=1, devices=jax.devices()[:1])
  start = reference.to_numpy(
      meshnet.init_train_state(model, optimizer, one, jax.random.key(0)).params)
  trained, losses = reference.train(model, token_loss, optimizer, start, batches)
  return dict(model=model, params=params, batches=batches, loss=loss, grads=grads,
              optimizer=optimizer, start=start, trained=trained, losses=losses)


@pytest.mark.parametrize("axes", LAYOUTS,
                         ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_layout_gives_the_loss_gradient_and_adam_steps_of_one_device(axes, one_device):
  ref = one_device
  model, batches, optimizer = ref["model"], ref["batches"], ref["optimizer"]
  mesh = meshnet.make_mesh(**axes)
  loss, grads = jax.jit(meshnet.make_grad_fn(model, mesh, loss=token_loss))(
      ref["params"], _put(mesh, batches[0]), jax.random.key(1))
  np.testing.assert_allclose(loss, ref["loss"], **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(grads), reference.to_numpy(ref["grads"]),
                              **TIGHT)
  state = meshnet.init_train_state(model, optimizer, mesh, jax.random.key(0))
  chex.assert_trees_all_equal(reference.to_numpy(state.params), ref["start"])  # same init
  step = meshnet.make_train_step(model, optimizer, mesh, loss=token_loss)
  losses = []
  for batch in batches:
    state, metrics = step(state, _put(mesh, batch))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, ref["losses"], **TIGHT)
  # Adam divides by sqrt(v): on entries whose gradient is near 0 float32
  # rounding of the sum order moves the update by up to ~1% of a step (lr 1e-2).
  chex.assert_trees_all_close(reference.to_numpy(state.params),
                              reference.to_numpy(ref["trained"]), rtol=1e-4, atol=1e-4)
  if axes.get("tensor", 1) > 1:  # the Megatron pairs stay split over tensor
    blocks = state.params["blocks"]
    assert blocks["attn"]["qkv"].sharding.spec == P(None, "fsdp", None, "tensor")
    assert blocks["attn"]["out"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert blocks["mlp"]["up"].sharding.spec == P(None, "fsdp", "tensor")
    assert blocks["mlp"]["down"].sharding.spec == P(None, "tensor", "fsdp")
  if axes.get("fsdp", 1) == 8:  # every block leaf split over fsdp on its width
    assert state.params["blocks"]["attn"]["qkv"].sharding.spec == P(
        None, "fsdp", None, None, None)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_fused_attention_matches_plain_and_shards(positions):
  """``attention="fused"`` (``jax.nn.dot_product_attention``; XLA's lowering
  on CPU) gives the plain attention's logits and gradients, on one device and
  split over data x fsdp x tensor."""
  plain, fused = (gpt("tiny", positions=positions, attention=a) for a in ("plain", "fused"))
  params = plain.init(jax.random.key(0))
  seq = np.random.default_rng(2).integers(0, V, (8, GPT_SIZES["tiny"]["context"] + 1))
  batch = (seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32))
  np.testing.assert_allclose(fused.apply(params, batch[0]), plain.apply(params, batch[0]),
                             rtol=1e-5, atol=1e-5)
  one = meshnet.make_mesh(data=1, devices=jax.devices()[:1])
  ref = jax.jit(meshnet.make_grad_fn(plain, one, loss=token_loss))(
      params, _put(one, batch), jax.random.key(1))
  mesh = meshnet.make_mesh(data=2, fsdp=2, tensor=2)
  got = jax.jit(meshnet.make_grad_fn(fused, mesh, loss=token_loss))(
      params, _put(mesh, batch), jax.random.key(1))
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  chex.assert_trees_all_close(reference.to_numpy(got[1]), reference.to_numpy(ref[1]),
                              rtol=1e-4, atol=1e-6)


def test_dropout_masks_do_not_depend_on_the_layout():
  model = gpt(None, **TINY, dropout=0.1)
  params = model.init(jax.random.key(0))
  batch = _batches(1)[0]
  key = jax.random.key(4)
  results = []
  for axes in (dict(data=1), dict(data=2, fsdp=2, tensor=2)):
    n = int(np.prod(list(axes.values())))
    mesh = meshnet.make_mesh(**axes, devices=jax.devices()[:n])
    results.append(jax.jit(meshnet.make_grad_fn(model, mesh, loss=token_loss))(
        params, _put(mesh, batch), key))
  (l1, g1), (ln, gn) = results
  np.testing.assert_allclose(ln, l1, **TIGHT)
  chex.assert_trees_all_close(reference.to_numpy(gn), reference.to_numpy(g1), **TIGHT)
  no_dropout = reference.loss_and_grad(gpt(None, **TINY), token_loss, params, *batch)[0]
  assert abs(float(l1) - float(no_dropout)) > 1e-4  # dropout did act


def test_bf16_keeps_tokens_integer_and_stays_close():
  model = gpt(None, **TINY)
  params = model.init(jax.random.key(0))
  x, y = _batches(1)[0]
  assert compute.cast_floating(jnp.asarray(x), jnp.bfloat16).dtype == jnp.int32
  bf16 = compute.precision_model(model, "bf16")
  seen = {}

  def spy(params, x, **kw):  # what reaches the model inside the bf16 wrapper
    seen["x"], seen["w"] = x.dtype, params["blocks"]["mlp"]["up"].dtype
    return model.apply(params, x, **kw)

  spied = compute.precision_model(dataclasses.replace(model, apply=spy), "bf16")
  low = spied.apply(params, x)
  assert seen == {"x": jnp.int32, "w": jnp.bfloat16} and low.dtype == jnp.float32
  high = model.apply(params, x)
  assert float(jnp.max(jnp.abs(low - high))) < 0.05 * float(jnp.max(jnp.abs(high)))
  loss32 = float(jnp.mean(token_loss(high, y)))
  loss16 = float(jnp.mean(token_loss(bf16.apply(params, x), y)))
  assert abs(loss16 - loss32) < 0.01 * loss32
  # ... and through meshnet's step on a sharded mesh, gradients float32.
  mesh = meshnet.make_mesh(data=2, fsdp=2, tensor=2)
  loss, grads = jax.jit(meshnet.make_grad_fn(model, mesh, loss=token_loss, precision="bf16"))(
      params, _put(mesh, (x, y)), jax.random.key(0))
  assert abs(float(loss) - loss32) < 0.01 * loss32
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_block_remat_changes_memory_not_the_gradient():
  x, y = _batches(1, seed=2)[0]
  mesh = meshnet.make_mesh(data=1, devices=jax.devices()[:1])
  out = {}
  for remat in (False, True):
    model = gpt(None, **{**TINY, "layers": 4, "context": 16}, remat=remat)
    params = model.init(jax.random.key(0))
    fn = jax.jit(meshnet.make_grad_fn(model, mesh, loss=token_loss))
    batch = _put(mesh, (x, y))
    out[remat] = (fn(params, batch, jax.random.key(0)),
                  fn.lower(params, batch, jax.random.key(0)).compile()
                  .memory_analysis().temp_size_in_bytes)
  (ref, ref_temp), (got, temp) = out[False], out[True]
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
  chex.assert_trees_all_close(reference.to_numpy(got[1]), reference.to_numpy(ref[1]),
                              rtol=1e-5, atol=1e-6)
  assert temp < ref_temp


def _xla_flops(model, batch):
  """XLA's FLOP count of one compiled value_and_grad step on one device."""
  params = model.init(jax.random.key(0))

  def loss(params, x, y):
    return jnp.mean(token_loss(model.apply(params, x), y))

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, *batch).compile()
  return compiled.cost_analysis()["flops"]


def test_analytic_flops_agree_with_xla():
  """6N + 12LHQT against XLA's count of the compiled step of the tiny size.

  XLA's cost analysis counts a while loop's body once, not once per trip, so
  a scan over L stacked blocks is counted as one block. The comparison uses
  layers=1, where that is exact; with layers=2 XLA's count is the analytic
  one less one block's share (checked too, to show the accounting).
  """
  size = GPT_SIZES["tiny"]
  seq = np.random.default_rng(0).integers(0, V, (4, size["context"] + 1)).astype(np.int32)
  batch = (seq[:, :-1], seq[:, 1:])
  tokens = seq[:, :-1].size
  one = gpt_config("tiny", layers=1, embedding="gather")
  analytic_one = flops.gpt_flops_per_token(one) * tokens
  xla_one = _xla_flops(gpt("tiny", layers=1, embedding="gather"), batch)
  assert abs(xla_one / analytic_one - 1) < 0.10, (xla_one, analytic_one)
  two = gpt_config("tiny", layers=2, embedding="gather")
  per_block = (flops.gpt_flops_per_token(two) - flops.gpt_flops_per_token(one)) * tokens
  xla_two = _xla_flops(gpt("tiny", layers=2, embedding="gather"), batch)
  assert abs(xla_two / (flops.gpt_flops_per_token(two) * tokens - per_block) - 1) < 0.10


def test_onehot_embedding_costs_4VD_flops_per_token_and_matches_gather():
  """The one-hot embedding (``auto`` at V=256 on a GPU) is implementation work outside
  the model-FLOP count: its forward matmul and the table's gradient, 2 V D
  FLOPs per token each. Its logits equal the gather's and its gradients agree
  to float32 summation order."""
  size = GPT_SIZES["tiny"]
  seq = np.random.default_rng(1).integers(0, V, (4, size["context"] + 1)).astype(np.int32)
  batch = (seq[:, :-1], seq[:, 1:])
  gather = gpt("tiny", layers=1, embedding="gather")
  onehot = gpt("tiny", layers=1, embedding="onehot")
  extra = _xla_flops(onehot, batch) - _xla_flops(gather, batch)
  expected = 4 * V * size["width"] * seq[:, :-1].size
  assert abs(extra / expected - 1) < 0.05, (extra, expected)
  params = gather.init(jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(onehot.apply(params, batch[0])),
                                np.asarray(gather.apply(params, batch[0])))

  def grads(model):
    return jax.grad(lambda p: jnp.mean(token_loss(model.apply(p, batch[0]), batch[1])))(params)

  chex.assert_trees_all_close(reference.to_numpy(grads(onehot)),
                              reference.to_numpy(grads(gather)), rtol=1e-5, atol=1e-7)


def test_matmul_parameter_count_convention():
  for options in ({}, dict(tie_embeddings=True, norm="rms", positions="rotary")):
    cfg = gpt_config("tiny", **options)
    params = jax.eval_shape(gpt("tiny", **options).init, jax.random.key(0))
    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    lookups = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["embed"]))
    head = cfg.width * cfg.vocab if cfg.tie_embeddings else 0  # the tied table, as the head
    assert flops.gpt_matmul_params(cfg) == total - lookups + head
  small = gpt_config("small")
  assert flops.gpt_flops_per_token(small) == (
      6 * flops.gpt_matmul_params(small) + 12 * 12 * 12 * 64 * 1024)


def test_peak_table_and_mfu():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("TPU v6 lite") == 918e12
  assert flops.peak_flops("Some Other Accelerator") is None
  assert flops.peak_flops() is None  # these tests run on CPU
  assert flops.mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)
  with pytest.raises(meshnet.MeshnetError, match="must be > 0"):
    flops.mfu(1.0, 1.0, 0.0)


def _token_dataset(n=128, seq=16):
  rng = np.random.default_rng(0)
  data = rng.integers(0, 8, n * (seq + 1)).astype(np.int32).reshape(n, seq + 1)
  return Dataset("tokens", data[:96, :-1], data[:96, 1:], data[96:, :-1], data[96:, 1:],
                 token_loss, V)


def test_gpt_run_records_tokens_per_sec_and_mfu():
  peak = 1e11  # --peak-flops 100G per device, 8 devices
  config = Config(model=ModelConfig(name="gpt", **TINY),
                  data=DataConfig(batch_size=16),
                  optim=OptimConfig(lr=3e-3),
                  train=TrainConfig(steps=6, log_every=3, eval_every=6, progress=False,
                                    peak_flops=peak))
  lines = []
  result = run(config, dataset=_token_dataset(), log=lines.append)
  steps = [r for r in result.history if "loss" in r]
  assert [r["step"] for r in steps] == [3, 6]
  fpt = flops.gpt_flops_per_token(gpt_config(None, **TINY), 16)
  for r in steps:
    assert r["tokens_per_sec"] == pytest.approx(r["samples_per_sec"] * 16)
    assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * fpt / (peak * 8))
  assert any("MFLOP per token" in line and "mfu against 0.8 TFLOP/s" in line
             for line in lines)
  assert result.eval["eval_loss"] < np.log(V)  # it learned something of the 8 symbols
  # On a CPU without --peak-flops: tokens/s, no mfu.
  no_peak = flops.Throughput(16, fpt, None)
  assert no_peak.metrics(10.0) == {"tokens_per_sec": 160.0}
  assert "no mfu" in no_peak.describe()


def test_gpt_on_a_non_token_data_set_is_one_line(capsys):
  """(Without --dataset a gpt trains on the embedded text instead of digits.)"""
  assert cli.main(["train", "--model", "gpt", "--dataset", "xor", "--no-progress",
                   "--steps", "1"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert "--model gpt reads integer token sequences [N, T], but dataset xor" in err
  assert "--dataset text" in err


def test_gpt_flags_parse_into_the_config_and_override_the_size():
  args = cli.build_parser().parse_args([
      "train", "--model", "gpt", "--gpt-size", "small", "--layers", "3", "--heads", "6",
      "--width", "96", "--context", "32", "--positions", "rotary", "--tie-embeddings",
      "--peak-flops", "989T", "--attention", "fused"])
  config = cli.config_from_args(args)
  m = config.model
  assert (m.name, m.gpt_size, m.layers, m.heads, m.width, m.context, m.positions,
          m.tie_embeddings) == ("gpt", "small", 3, 6, 96, 32, "rotary", True)
  assert config.train.peak_flops == 989e12
  cfg = m.gpt_config()
  assert (cfg.layers, cfg.heads, cfg.width, cfg.context) == (3, 6, 96, 32)
  assert (m.attention, cfg.attention) == ("fused", "fused")
  assert ModelConfig(name="gpt", gpt_size="small").gpt_config().width == 768
  # meshnet plan keeps its own --layers (MLP widths).
  plan = cli.build_parser().parse_args(["plan", "--layers", "784,512,10"])
  assert plan.layers == (784, 512, 10)
  assert cli.config_from_args(plan, skip=cli._PLAN_OWN_FLAGS).model.layers is None


@pytest.mark.parametrize("fields, message", [
    (dict(gpt_size="huge"), "model.gpt_size='huge' must be one of tiny, mini, small"),
    (dict(width=102), "gpt width 102 is not divisible by heads 4"),
    (dict(layers=0), "model.layers=0 must be an integer >= 1"),
    (dict(positions="alibi"), "model.positions='alibi' must be one of learned, rotary"),
    (dict(attention="flash"), "model.attention='flash' must be one of plain, fused"),
])
def test_bad_gpt_settings_are_one_line(fields, message):
  with pytest.raises(meshnet.MeshnetError, match=message.replace("(", r"\(")):
    ModelConfig(name="gpt", **fields)


def test_a_sequence_longer_than_the_context_is_one_line():
  model = gpt(None, **TINY)
  params = model.init(jax.random.key(0))
  with pytest.raises(meshnet.MeshnetError, match="sequence of 17 tokens is longer than the "
                     "model's context 16"):
    model.apply(params, np.zeros((2, 17), np.int32))
  with pytest.raises(meshnet.MeshnetError, match="gpt takes integer tokens"):
    model.apply(params, np.zeros((2, 16), np.float32))
