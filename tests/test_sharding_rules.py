"""Logical axis names -> mesh axes: the rules table, the default FSDP rule,
the built-in MLP's names on real 8-device meshes, and one-line errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import meshnet
from meshnet.sharding import DEFAULT_RULES, default_fsdp_spec, logical_to_mesh, param_specs

MESHES = [
    dict(fsdp=8),
    dict(data=2, fsdp=4),
    dict(data=2, fsdp=2, tensor=2),
    dict(tensor=2, stage=4),
    dict(fsdp=2, stage=2, tensor=2),
]


def _mesh(**axes):
  return meshnet.make_mesh(**{"data": -1, **axes})


def _shapes(model):
  return jax.eval_shape(model.init, jax.random.key(0))


def _split(shape, spec, mesh):
  """The per-device shape of an array of ``shape`` laid out by ``spec``."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  out = []
  for size, entry in zip(shape, spec):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    out.append(size // math.prod(mesh.shape[a] for a in axes))
  return tuple(out)


@pytest.mark.parametrize("logical, expected", [
    (P("layers", "embed", "mlp"), P("stage", "fsdp", "tensor")),
    (P("vocab", "embed"), P("tensor", "fsdp")),
    (P("batch", None), P(("data", "fsdp"), None)),
    (P("embed", "heads", "kv"), P("fsdp", "tensor", None)),
    (P("mlp", "heads"), P("tensor", None)),  # tensor at most once: the first rule wins
    (P("norm",), P(None)),  # a name no rule knows is not split
    (P(None, "tensor"), P(None, "tensor")),  # a mesh axis name stays on its axis
    (P(), P()),
])
def test_default_rules_map_names(logical, expected):
  assert logical_to_mesh(logical) == expected
  assert logical_to_mesh(logical, DEFAULT_RULES) == expected


def test_rules_take_precedence_in_order_with_fallbacks():
  # ``embed`` prefers tensor; when mlp has taken tensor, it falls back to fsdp.
  rules = (("mlp", "tensor"), ("embed", "tensor"), ("embed", "fsdp"))
  assert logical_to_mesh(P("embed", "mlp"), rules) == P("fsdp", "tensor")
  assert logical_to_mesh(P("embed", None), rules) == P("tensor", None)
  # A user's rule put first overrides the default for that name only.
  no_tensor = (("mlp", None),) + DEFAULT_RULES
  assert logical_to_mesh(P("embed", "mlp"), no_tensor) == P("fsdp", None)
  assert logical_to_mesh(P("vocab"), no_tensor) == P("tensor")


def test_override_rules_change_param_specs_of_the_mlp():
  model = meshnet.models.mlp([64, 256, 128, 10])
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  default = param_specs(model, _shapes(model), mesh)
  assert default[0] == {"w": P("fsdp", "tensor"), "b": P("tensor")}
  assert default[1] == {"w": P("tensor", "fsdp"), "b": P("fsdp")}
  assert default[2] == {"w": P("fsdp", None), "b": P(None)}
  zero3_only = param_specs(model, _shapes(model), mesh, rules=(("mlp", None),) + DEFAULT_RULES)
  assert zero3_only[0] == {"w": P("fsdp", None), "b": P(None)}
  assert zero3_only[1] == {"w": P(None, "fsdp"), "b": P("fsdp")}
  tensor_for_embed = param_specs(model, _shapes(model), mesh,
                                 rules=(("embed", "tensor"), ("mlp", "fsdp")))
  assert tensor_for_embed[1] == {"w": P("fsdp", "tensor"), "b": P("tensor")}


@pytest.mark.parametrize("shape, fsdp, expected", [
    ((7,), 2, P(None)),
    ((7,), 8, P(None)),
    ((6, 10), 2, P(None, "fsdp")),  # the largest dimension that divides
    ((6, 10), 4, P(None, None)),
    ((3, 5, 8), 2, P(None, None, "fsdp")),
    ((3, 5, 8), 4, P(None, None, "fsdp")),
    ((3, 5, 8), 8, P(None, None, "fsdp")),
    ((16, 12), 4, P("fsdp", None)),
    ((8, 8), 8, P("fsdp", None)),  # ties: the first
    ((12, 8), 8, P(None, "fsdp")),  # 12 is larger but 8 does not divide it
    ((), 8, P()),
    ((6, 10), 1, P(None, None)),
])
def test_default_fsdp_rule(shape, fsdp, expected):
  assert default_fsdp_spec(shape, fsdp) == expected


@pytest.mark.parametrize("fsdp", [2, 4, 8])
def test_custom_model_without_names_gets_fsdp_only(fsdp):
  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"a": jax.random.normal(k1, (7,)), "b": jax.random.normal(k2, (6, 10)),
            "c": jax.random.normal(k3, (3, 5, 8))}

  model = meshnet.Model(init, lambda p, x: x)
  assert model.logical_axes is None
  mesh = _mesh(fsdp=fsdp, tensor=2 if fsdp < 8 else 1)  # tensor is never used without names
  params = model.init(jax.random.key(0))
  shardings = meshnet.param_shardings(model, params, mesh)
  placed = jax.device_put(params, shardings)
  expected = {"a": (7,), "b": (6, 5) if fsdp == 2 else (6, 10), "c": (3, 5, 8 // fsdp)}
  for name, array in placed.items():
    assert array.addressable_shards[0].data.shape == expected[name], name
    np.testing.assert_array_equal(np.asarray(array), np.asarray(params[name]))


@pytest.mark.parametrize("inputs, hidden", [(64, (256, 128)), (784, (256, 128)),
                                            (784, (512, 256, 128))])
@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_mlp_names_place_real_arrays_on_eight_devices(inputs, hidden, axes):
  model = meshnet.models.mlp([inputs, *hidden, 10])
  mesh = _mesh(**axes)
  params = model.init(jax.random.key(0))
  specs = param_specs(model, params, mesh)
  placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                               is_leaf=lambda x: isinstance(x, P)))
  n = len(params)
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  for i, (layer, placed_layer) in enumerate(zip(params, placed)):
    fan_in, fan_out = layer["w"].shape
    if i == n - 1:  # output layer: input width over fsdp, classes whole
      w_shard, b_shard = (fan_in // fsdp, fan_out), (fan_out,)
    elif i % 2 == 0:  # column-split
      w_shard, b_shard = (fan_in // fsdp, fan_out // tensor), (fan_out // tensor,)
    else:  # row-split
      w_shard, b_shard = (fan_in // tensor, fan_out // fsdp), (fan_out // fsdp,)
    for name, shard in (("w", w_shard), ("b", b_shard)):
      array = placed_layer[name]
      assert _split(array.shape, specs[i][name], mesh) == shard
      assert {s.data.shape for s in array.addressable_shards} == {shard}, (i, name)
      assert array.sharding.spec == specs[i][name]  # (tensor > 1 is Auto: not in the type)
      np.testing.assert_array_equal(np.asarray(array), np.asarray(layer[name]))


def test_mlp_width_that_fsdp_does_not_divide_is_one_line_error():
  model = meshnet.models.mlp([64, 100, 10])
  with pytest.raises(meshnet.MeshnetError) as info:
    param_specs(model, _shapes(model), _mesh(fsdp=8))
  message = str(info.value)
  assert message == (
      "parameter [1]['w'] dimension 0 (logical 'embed') has size 100, which fsdp=8 does "
      "not divide; make it a multiple of 8, choose a mesh whose fsdp divides 100, or pass "
      "rules that do not split 'embed' (e.g. ('embed', None))")
  # The fixes it names work.
  param_specs(meshnet.models.mlp([64, 104, 10]), _shapes(meshnet.models.mlp([64, 104, 10])),
              _mesh(fsdp=8))
  specs = param_specs(model, _shapes(model), _mesh(fsdp=8), rules=(("embed", None),) +
                      DEFAULT_RULES)
  assert specs[1]["w"] == P(None, None)
  # Deeper: the row-split layer's output width (its bias first) lands on fsdp too.
  deep = meshnet.models.mlp([64, 256, 100, 10])
  with pytest.raises(meshnet.MeshnetError, match=r"parameter \[1\]\['b'\] dimension 0 "
                     r"\(logical 'embed'\) has size 100, which fsdp=8"):
    param_specs(deep, _shapes(deep), _mesh(fsdp=8))


def test_error_names_every_axis_of_a_split_dimension():
  logical = {"x": P("batch", "mlp")}
  shapes = {"x": jax.ShapeDtypeStruct((6, 4), jnp.float32)}
  with pytest.raises(meshnet.MeshnetError, match=r"^parameter \['x'\] dimension 0 \(logical "
                     r"'batch'\) has size 6, which data=2 x fsdp=4 does not divide; make it a "
                     r"multiple of 8, choose a mesh whose data x fsdp divides 6"):
    param_specs(logical, shapes, _mesh(data=2, fsdp=4))
  shapes = {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
  assert param_specs(logical, shapes, _mesh(data=2, fsdp=2, tensor=2))["x"] == P(
      ("data", "fsdp"), "tensor")


def test_stacked_blocks_split_layers_over_stage():
  logical = {"w": P("layers", "embed", "mlp"), "scale": P("layers", None)}
  params = {"w": jnp.arange(4 * 16 * 32, dtype=jnp.float32).reshape(4, 16, 32),
            "scale": jnp.ones((4, 16))}
  mesh = _mesh(fsdp=2, stage=2, tensor=2)
  specs = param_specs(logical, params, mesh)
  assert specs == {"w": P("stage", "fsdp", "tensor"), "scale": P("stage", None)}
  placed = jax.device_put(params, meshnet.param_shardings(logical, params, mesh))
  assert placed["w"].addressable_shards[0].data.shape == (2, 8, 16)
  assert placed["scale"].addressable_shards[0].data.shape == (2, 16)
  # Axes of size 1 are left out: on data=8 nothing is split.
  assert param_specs(logical, params, _mesh(data=8)) == {"w": P(None, None, None),
                                                         "scale": P(None, None)}


def test_sequential_composes_layer_names():
  named = meshnet.models.mlp([8, 16])  # one layer: the output layer
  plain = meshnet.Model(lambda key: {"k": jnp.zeros((16, 4))}, lambda p, x: x @ p["k"])
  model = meshnet.sequential([named.layers[0], plain])
  assert model.logical_axes == [{"w": P("embed", None), "b": P(None)}, None]
  specs = param_specs(model, _shapes(model), _mesh(fsdp=4, tensor=2))
  assert specs == [{"w": P("fsdp", None), "b": P(None)}, {"k": P("fsdp", None)}]
  assert meshnet.sequential([plain, plain]).logical_axes is None
  both = meshnet.sequential([model, plain])  # nested: a layer's names are a list
  assert both.logical_axes == [model.logical_axes, None]


@pytest.mark.parametrize("logical, message", [
    ({"w": ("embed", "mlp")}, r"has 'embed' at \['w'\]\[0\]; its leaves must be "
                              r"jax.sharding.PartitionSpec"),
    ({"w": "embed"}, r"has 'embed' at \['w'\]"),
])
def test_model_refuses_names_that_are_not_specs(logical, message):
  with pytest.raises(meshnet.MeshnetError, match=message):
    meshnet.Model(lambda key: {"w": jnp.zeros((2, 2))}, lambda p, x: x, logical_axes=logical)


def test_mismatched_names_are_one_line_errors():
  shapes = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
  mesh = _mesh(fsdp=2)
  with pytest.raises(meshnet.MeshnetError) as info:
    param_specs({"v": P("embed")}, shapes, mesh)
  assert str(info.value) == (
      "logical axes have no entry for parameter ['w']: at the root they have ['v']; give one "
      "PartitionSpec or None per parameter, in a tree of params' structure")
  with pytest.raises(meshnet.MeshnetError, match=r"^logical axes name \['b'\], which params "
                     "do not have"):
    param_specs({"w": P("embed"), "b": None}, shapes, mesh)
  with pytest.raises(meshnet.MeshnetError, match=r"parameter \['w'\] has shape \(8, 8\) but "
                     r"logical axes P\('layers', 'embed', 'mlp'\) name 3"):
    param_specs({"w": P("layers", "embed", "mlp")}, shapes, mesh)
  with pytest.raises(meshnet.MeshnetError, match=r"logical axes P\('embed',\) at \['a'\] "
                     "stand for a subtree of params"):
    param_specs({"a": P("embed")}, {"a": shapes}, mesh)
  with pytest.raises(meshnet.MeshnetError, match="names 'embed' twice"):
    logical_to_mesh(P("embed", "embed"))
  # A list where params have a tuple is the same tree for names; None covers a subtree.
  assert param_specs([None, [P("embed")]], (shapes, (shapes["w"],)), mesh) == (
      {"w": P("fsdp", None)}, (P("fsdp", None),))


@pytest.mark.parametrize("rules, message", [
    ((("embed", "model"),), r"names mesh axis 'model'; meshnet's axes are data, fsdp, "
                            "stage, tensor"),
    ((("embed",),), r"must be a \(logical name, mesh axes\) pair"),
    ("embed", r"must be a sequence of \(logical name, mesh axes\) pairs"),
    ((("embed", ("fsdp", "fsdp")),), "names a mesh axis twice"),
])
def test_bad_rules_are_one_line_errors(rules, message):
  with pytest.raises(meshnet.MeshnetError, match=message):
    logical_to_mesh(P("embed"), rules)
