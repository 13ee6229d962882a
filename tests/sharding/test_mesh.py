"""make_mesh: axis order, device use, sub-meshes and the errors a user can cause."""

import jax
import numpy as np
import pytest

from sharding import make_mesh
from sharding.mesh import MESH_AXES, describe, replica_meshes, stage_meshes
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES


def test_axes_and_shape():
    mesh = make_mesh(tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2)
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "pipe": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_tensor_is_the_innermost_axis_over_the_first_devices():
    mesh = make_mesh(tensor_parallel_size=4, pipeline_parallel_size=2)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert ids.tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7]]]


def test_uses_only_the_first_product_devices():
    mesh = make_mesh(tensor_parallel_size=2, pipeline_parallel_size=1)
    assert [d.id for d in mesh.devices.flat] == [0, 1]


def test_explicit_devices_are_used_in_order():
    devices = jax.devices()[::-1][:4]
    mesh = make_mesh(tensor_parallel_size=4, devices=devices)
    assert list(mesh.devices.flat) == devices


def test_too_few_devices_names_the_numbers():
    with pytest.raises(ValueError) as e:
        make_mesh(tensor_parallel_size=4, pipeline_parallel_size=2, data_parallel_size=2)
    message = str(e.value)
    assert "tensor_parallel_size=4" in message and "= 16 devices" in message and "only 8" in message


def test_explicit_devices_must_match_the_product():
    with pytest.raises(ValueError) as e:
        make_mesh(tensor_parallel_size=2, devices=jax.devices()[:3])
    assert "= 2 devices" in str(e.value) and "3 device(s) were given" in str(e.value)


@pytest.mark.parametrize(
    ("bad", "error_type"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_sizes_must_be_positive_ints(bad, error_type):
    with pytest.raises(error_type) as e:
        make_mesh(pipeline_parallel_size=bad)
    assert "pipeline_parallel_size" in str(e.value) and repr(bad) in str(e.value)


def test_stage_and_replica_meshes_partition_the_devices():
    mesh = make_mesh(tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2)
    stages = stage_meshes(mesh)
    replicas = replica_meshes(mesh)
    assert [dict(m.shape) for m in stages] == [{"data": 2, "pipe": 1, "tensor": 2}] * 2
    assert [dict(m.shape) for m in replicas] == [{"data": 1, "pipe": 2, "tensor": 2}] * 2
    for parts in (stages, replicas):
        ids = sorted(d.id for m in parts for d in m.devices.flat)
        assert ids == list(range(8))
    assert [d.id for d in stages[1].devices.flat] == [2, 3, 6, 7]
    assert describe(mesh) == "data=2 pipe=2 tensor=2 (8 cpu devices)"
