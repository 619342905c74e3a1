"""make_mesh, describe_mesh, device selection and MeshConfig parsing."""

import jax
import pytest

import meshnet
from meshnet.config import MeshConfig
from meshnet.mesh import resolve_axis_sizes, select_devices


@pytest.mark.parametrize("axes, expected", [
    ({"data": -1}, {"data": 8, "fsdp": 1, "stage": 1, "tensor": 1}),
    ({"data": 2, "stage": 4}, {"data": 2, "fsdp": 1, "stage": 4, "tensor": 1}),
    ({"data": 2, "fsdp": 2, "stage": -1}, {"data": 2, "fsdp": 2, "stage": 2, "tensor": 1}),
    ({"tensor": 8}, {"data": 1, "fsdp": 1, "stage": 1, "tensor": 8}),
])
def test_make_mesh_shapes(axes, expected):
  mesh = meshnet.make_mesh(**axes)
  assert dict(mesh.shape) == expected
  assert mesh.axis_names == meshnet.AXES
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_a_subset_and_one_device():
  mesh = meshnet.make_mesh(devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "stage": 1, "tensor": 1}
  mesh = meshnet.make_mesh(data=-1, devices=jax.devices()[2:6])
  assert mesh.shape["data"] == 4
  assert [d.id for d in mesh.devices.flat] == [2, 3, 4, 5]


@pytest.mark.parametrize("axes, message", [
    ({"data": 3}, r"mesh data=3 uses 3 devices but there are 8"),
    ({"data": 3, "stage": -1}, r"needs a multiple of 3 devices but there are 8"),
    ({"data": -1, "stage": -1}, r"only one mesh axis may be -1"),
    ({"pipeline": 2}, r"unknown mesh axis 'pipeline'; meshnet's axes are data, fsdp"),
    ({"data": 0}, r"data=0 must be >= 1"),
])
def test_make_mesh_errors_name_the_numbers(axes, message):
  with pytest.raises(meshnet.MeshnetError, match=message):
    meshnet.make_mesh(**axes)


def test_resolve_axis_sizes_is_pure_arithmetic():
  assert resolve_axis_sizes(16, stage=4, data=4) == {"data": 4, "fsdp": 1, "stage": 4,
                                                     "tensor": 1}
  assert resolve_axis_sizes(16, data=-1, stage=4)["data"] == 4
  with pytest.raises(meshnet.MeshnetError, match="uses 4 devices but there are 16"):
    resolve_axis_sizes(16, stage=4)


def test_describe_mesh_lists_every_device_with_coordinates():
  mesh = meshnet.make_mesh(data=2, stage=4)
  text = meshnet.describe_mesh(mesh)
  lines = text.splitlines()
  assert lines[0] == "mesh data=2 fsdp=1 stage=4 tensor=1: 8 cpu devices, 1 process"
  assert len(lines) == 9
  for position, device in zip([(d, s) for d in range(2) for s in range(4)],
                              mesh.devices.flat):
    assert f"data={position[0]} stage={position[1]} -> device {device.id} (process 0)" in text


def test_select_devices_uses_a_subset_once_jax_has_started():
  assert len(select_devices(None)) == 8
  assert [d.id for d in select_devices(4)] == [0, 1, 2, 3]
  with pytest.raises(meshnet.MeshnetError, match="devices=16 but JAX already started with 8"):
    select_devices(16)


def test_set_cpu_device_count_after_start():
  meshnet.set_cpu_device_count(8)  # what JAX has: fine
  with pytest.raises(meshnet.MeshnetError, match="cannot simulate 4 CPU devices: JAX "
                     "already started with 8"):
    meshnet.set_cpu_device_count(4)


@pytest.mark.parametrize("text, expected", [
    ("data=4,stage=2", dict(data=4, stage=2)),
    ("stage=2", dict(data=-1, stage=2)),
    ("data=2,tensor=-1", dict(data=2, tensor=-1)),
    ("fsdp=-1", dict(data=1, fsdp=-1)),
    ("", dict(data=-1)),
])
def test_mesh_config_parse(text, expected):
  config = MeshConfig.parse(text)
  for axis in meshnet.AXES:
    assert getattr(config, axis) == expected.get(axis, 1)


@pytest.mark.parametrize("text, message", [
    ("data4", r"bad mesh entry 'data4'"),
    ("pipe=2", r"bad mesh entry 'pipe=2'"),
    ("data=x", r"mesh size 'x' for data is not an integer"),
])
def test_mesh_config_parse_errors(text, message):
  with pytest.raises(meshnet.MeshnetError, match=message):
    MeshConfig.parse(text)
