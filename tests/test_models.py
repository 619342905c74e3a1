"""Models as pure functions; optimizers and schedules from config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import meshnet
from meshnet.optim import make_schedule


def test_mnist_mlp_shapes_and_dropout():
  model = meshnet.models.mlp([784, 512, 256, 128, 10], dropout=0.2)
  params = model.init(jax.random.key(0))
  assert [(l["w"].shape, l["b"].shape) for l in params] == [
      ((784, 512), (512,)), ((512, 256), (256,)), ((256, 128), (128,)), ((128, 10), (10,))]
  x = jax.random.uniform(jax.random.key(1), (32, 784))
  eval_out = model.apply(params, x)
  assert eval_out.shape == (32, 10)
  np.testing.assert_array_equal(model.apply(params, x, train=False, key=jax.random.key(2)),
                                eval_out)  # no dropout when not training
  a = model.apply(params, x, train=True, key=jax.random.key(2))
  b = model.apply(params, x, train=True, key=jax.random.key(3))
  assert not np.allclose(a, b) and not np.allclose(a, eval_out)
  np.testing.assert_array_equal(a, model.apply(params, x, train=True, key=jax.random.key(2)))
  with pytest.raises(meshnet.MeshnetError, match="needs a key when train=True"):
    model.apply(params, x, train=True)


def test_mlp_matches_a_hand_written_forward():
  model = meshnet.models.mlp([4, 3, 1], activation="sigmoid", output_activation="sigmoid")
  params = model.init(jax.random.key(0))
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  sig = lambda z: 1 / (1 + np.exp(-z))
  (l1, l2) = jax.device_get(params)
  expected = sig(sig(x @ l1["w"] + l1["b"]) @ l2["w"] + l2["b"])
  np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-5)


def test_init_scale_follows_fan_in():
  params = meshnet.models.mlp([1000, 1000, 10]).init(jax.random.key(0))
  np.testing.assert_allclose(np.std(params[0]["w"]), np.sqrt(2 / 1000), rtol=0.02)  # relu
  np.testing.assert_allclose(np.std(params[1]["w"]), np.sqrt(1 / 1000), rtol=0.1)


@pytest.mark.parametrize("widths, message", [
    ([10], "need an input and an output size"),
    ([3, 0, 2], "need an input and an output size"),
])
def test_mlp_bad_widths(widths, message):
  with pytest.raises(meshnet.MeshnetError, match=message):
    meshnet.models.mlp(widths)


def test_model_accepts_apply_without_train_and_key():
  model = meshnet.Model(lambda key: {"w": jnp.ones((2, 2))}, lambda p, x: x @ p["w"])
  out = model.apply(model.init(None), jnp.ones((3, 2)), train=True, key=jax.random.key(0))
  np.testing.assert_array_equal(out, 2 * np.ones((3, 2)))
  with pytest.raises(TypeError):
    meshnet.Model(None, None)


def test_warmup_cosine_schedule():
  config = meshnet.OptimConfig(lr=0.1, lr_schedule="warmup_cosine", warmup_steps=10)
  schedule = make_schedule(config, 110)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(5), 0.05, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 0.1, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.05, rtol=1e-5)  # half-way down the cosine
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-7)
  with pytest.raises(meshnet.MeshnetError, match=r"warmup_steps=200 must be in \[0, 110\)"):
    make_schedule(meshnet.OptimConfig(lr_schedule="warmup_cosine", warmup_steps=200), 110)


@pytest.mark.parametrize("name, expected", [
    ("sgd", lambda p, g: p - 0.1 * g),
    ("momentum", lambda p, g: p - 0.1 * g),  # first step: velocity = g
    ("adam", lambda p, g: p - 0.1 * np.sign(g)),  # first step: m/sqrt(v) = sign(g)
])
def test_first_optimizer_step(name, expected):
  optimizer = meshnet.make_optimizer(meshnet.OptimConfig(optimizer=name, lr=0.1), 10)
  p = jnp.array([1.0, -2.0, 3.0])
  g = jnp.array([0.5, -0.25, 2.0])
  updates, _ = optimizer.update(g, optimizer.init(p), p)
  np.testing.assert_allclose(optax.apply_updates(p, updates), expected(np.asarray(p),
                                                                       np.asarray(g)),
                             rtol=1e-5)


def test_weight_decay():
  p, g = jnp.array([1.0, -2.0]), jnp.zeros(2)
  sgd = meshnet.make_optimizer(meshnet.OptimConfig("sgd", lr=0.1, weight_decay=0.5), 10)
  updates, _ = sgd.update(g, sgd.init(p), p)
  np.testing.assert_allclose(optax.apply_updates(p, updates), p * (1 - 0.1 * 0.5))
  adamw = meshnet.make_optimizer(meshnet.OptimConfig("adamw", lr=0.1, weight_decay=0.5), 10)
  updates, _ = adamw.update(g, adamw.init(p), p)
  np.testing.assert_allclose(optax.apply_updates(p, updates), p * (1 - 0.1 * 0.5), rtol=1e-6)


# ----------------------------------------------------------------------------
# Flax models bring their own logical names


def _digits(n=32):
  ds = meshnet.load_dataset("digits")
  return ds.x_train[:n], ds.y_train[:n]


def _cross_entropy(logits, y):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _linen_net():
  import flax.linen as linen

  class Net(linen.Module):
    @linen.compact
    def __call__(self, x):
      named = linen.with_logical_partitioning
      h = linen.Dense(32, kernel_init=named(linen.initializers.lecun_normal(), ("embed", "mlp")),
                      bias_init=named(linen.initializers.zeros_init(), ("mlp",)))(x)
      return linen.Dense(10)(linen.relu(h))

  return Net()


def test_from_flax_reads_logical_partitioning_and_unboxes():
  from flax.core import meta

  x, y = _digits()
  net = _linen_net()
  model = meshnet.from_flax(net, x[:1])
  assert model.logical_axes == {
      "Dense_0": {"kernel": P("embed", "mlp"), "bias": P("mlp")},
      "Dense_1": {"kernel": None, "bias": None}}
  params = model.init(jax.random.key(0))
  leaves = jax.tree.leaves(params, is_leaf=lambda l: isinstance(l, meta.AxisMetadata))
  assert all(isinstance(l, jax.Array) for l in leaves) and len(leaves) == 4
  boxed = net.init(jax.random.key(0), x[:1])
  np.testing.assert_array_equal(model.apply(params, x), net.apply(boxed, x))

  mesh = meshnet.make_mesh(data=2, fsdp=2, tensor=2)
  specs = meshnet.param_specs(model, params, mesh)
  assert specs == {"Dense_0": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
                   # no names: the default rule, the largest dimension fsdp divides
                   "Dense_1": {"kernel": P("fsdp", None), "bias": P("fsdp")}}
  placed = jax.device_put(params, meshnet.param_shardings(model, params, mesh))
  assert placed["Dense_0"]["kernel"].addressable_shards[0].data.shape == (32, 16)

  # Plain arrays train like one device (data=2): the boxes are gone from the state.
  data2 = meshnet.make_mesh(data=2, devices=jax.devices()[:2])
  loss, grads = jax.jit(meshnet.make_grad_fn(model, data2))(
      params, jax.device_put((x, y), meshnet.sharding.batch_sharding(data2)),
      jax.random.key(1))
  ref_loss, ref_grads = jax.value_and_grad(
      lambda p: _cross_entropy(net.apply({"params": p}, x), y))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               grads, ref_grads)


def _nnx_mlp_class():
  from flax import nnx

  class NnxMLP(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
      named = nnx.with_partitioning
      self.up = nnx.Linear(64, 32, rngs=rngs,
                           kernel_init=named(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                           bias_init=named(nnx.initializers.zeros_init(), ("mlp",)))
      self.down = nnx.Linear(32, 10, rngs=rngs,
                             kernel_init=named(nnx.initializers.lecun_normal(), ("mlp", None)))
      self.scale = nnx.Param(jnp.ones((64,)), out_sharding=("embed",))  # raw metadata
      self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
      return self.down(self.drop(jax.nn.relu(self.up(x * self.scale[None, :]))))

  return NnxMLP


def test_from_nnx_names_map_through_the_rules():
  model = meshnet.from_nnx(_nnx_mlp_class())
  assert model.logical_axes == {
      "up": {"kernel": P("embed", "mlp"), "bias": P("mlp")},
      "down": {"kernel": P("mlp", None), "bias": None},
      "scale": P("embed")}
  params = model.init(jax.random.key(0))
  assert jax.tree.map(jnp.shape, params) == {
      "up": {"kernel": (64, 32), "bias": (32,)}, "down": {"kernel": (32, 10), "bias": (10,)},
      "scale": (64,)}
  mesh = meshnet.make_mesh(data=2, fsdp=2, tensor=2)
  placed = jax.device_put(params, meshnet.param_shardings(model, params, mesh))
  shard = lambda a: a.addressable_shards[0].data.shape
  assert jax.tree.map(shard, placed) == {
      "up": {"kernel": (32, 16), "bias": (16,)}, "down": {"kernel": (16, 10), "bias": (5,)},
      "scale": (32,)}
  no_tensor = meshnet.param_specs(model, params, mesh, rules=(("mlp", None),) +
                                  meshnet.DEFAULT_RULES)
  assert no_tensor["up"] == {"kernel": P("fsdp", None), "bias": P(None)}


def test_from_nnx_step_on_data2_equals_the_nnx_gradient_on_one_device():
  from flax import nnx

  NnxMLP = _nnx_mlp_class()
  model = meshnet.from_nnx(NnxMLP)
  x, y = _digits()
  mesh = meshnet.make_mesh(data=2, devices=jax.devices()[:2])
  lr = 0.5
  optimizer = optax.sgd(lr)
  key = jax.random.key(7)
  state = meshnet.init_train_state(model, optimizer, mesh, key)
  before = jax.device_get(state.params)
  step = meshnet.make_train_step(model, optimizer, mesh, donate=False)
  state, metrics = step(state, jax.device_put((x, y), meshnet.sharding.batch_sharding(mesh)))

  # The same module, built by NNX itself from the same key, differentiated by NNX.
  with nnx.use_eager_sharding(False):
    module = NnxMLP(nnx.Rngs(jax.random.split(key)[0]))
  native = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, native)
  loss, grads = nnx.value_and_grad(lambda m: _cross_entropy(m(x), y))(module)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  jax.tree.map(lambda b, a, g: np.testing.assert_allclose((b - a) / lr, g, rtol=1e-4,
                                                          atol=1e-6),
               before, jax.device_get(state.params), nnx.to_pure_dict(grads))


def test_from_nnx_dropout_uses_the_key_when_training_only():
  from flax import nnx

  NnxMLP = _nnx_mlp_class()
  model = meshnet.from_nnx(lambda rngs: NnxMLP(rngs, dropout=0.5))
  params = model.init(jax.random.key(0))
  x, _ = _digits(4)
  with nnx.use_eager_sharding(False):
    module = NnxMLP(nnx.Rngs(0), dropout=0.5)
  module.eval()
  np.testing.assert_allclose(model.apply(params, x), module(x), rtol=1e-6)
  apply = jax.jit(lambda p, x, k: model.apply(p, x, train=True, key=k))
  a, b = apply(params, x, jax.random.key(1)), apply(params, x, jax.random.key(2))
  assert not np.allclose(a, b) and not np.allclose(a, module(x))
  np.testing.assert_array_equal(a, apply(params, x, jax.random.key(1)))
  # Under meshnet's step each example draws its own mask: any data size gives the same.
  x, y = _digits(16)
  grads = []
  for data in (1, 2):
    mesh = meshnet.make_mesh(data=data, devices=jax.devices()[:data])
    batch = jax.device_put((x, y), meshnet.sharding.batch_sharding(mesh))
    grads.append(jax.jit(meshnet.make_grad_fn(model, mesh))(params, batch, jax.random.key(3)))
  np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


def test_from_nnx_refuses_a_built_module_and_batch_statistics():
  from flax import nnx

  with pytest.raises(meshnet.MeshnetError, match=r"from_nnx got a built Linear module; pass "
                     r"the function that builds it from rngs"):
    meshnet.from_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))

  class WithBatchNorm(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.norm(x)

  with pytest.raises(meshnet.MeshnetError, match=r"norm.mean is an nnx.BatchStat"):
    meshnet.from_nnx(WithBatchNorm)
