"""The device mesh: axes ("data", "pipe", "tensor") and the sub-meshes of its pipeline stages and data replicas.

Owns building the mesh from the three parallel sizes and slicing it. ``tensor`` is the innermost (fastest-varying)
axis so a tensor-parallel group is made of neighbouring devices (one NVLink island, one TPU slice row). Sub-meshes
keep all three axis names (with size 1 on the axes sliced away), so one PartitionSpec works on any of them.

Device count rule (vLLM's): the mesh uses exactly ``T x P x D`` devices. When ``devices`` is not given, the first
``T x P x D`` of ``jax.devices()`` are used and the rest stay idle (so a test with 8 fake devices can build a 2-device
mesh); when ``devices`` is given, its length must equal the product. Too few devices is a ValueError naming the
numbers. Axes are ``Auto`` (GSPMD propagation), not ``Explicit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxllm.argument_checks import check_positive_int

MESH_AXES = ("data", "pipe", "tensor")
DATA_AXIS, PIPE_AXIS, TENSOR_AXIS = MESH_AXES


def make_mesh(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    data_parallel_size: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``(data, pipe, tensor)`` mesh of ``D x P x T`` devices; see the module docstring for the device rule."""
    sizes = {
        "tensor_parallel_size": tensor_parallel_size,
        "pipeline_parallel_size": pipeline_parallel_size,
        "data_parallel_size": data_parallel_size,
    }
    for name, value in sizes.items():
        check_positive_int(name, value)
    num_needed = tensor_parallel_size * pipeline_parallel_size * data_parallel_size
    described = (
        f"tensor_parallel_size={tensor_parallel_size} x pipeline_parallel_size={pipeline_parallel_size} x "
        f"data_parallel_size={data_parallel_size} = {num_needed} devices"
    )
    if devices is None:
        available = jax.devices()
        if num_needed > len(available):
            raise ValueError(f"{described}, but only {len(available)} {available[0].platform} device(s) are available")
        devices = available[:num_needed]
    elif len(devices) != num_needed:
        raise ValueError(f"{described}, but {len(devices)} device(s) were given")
    shape = (data_parallel_size, pipeline_parallel_size, tensor_parallel_size)
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh: Mesh, axis: str) -> int:
    """Size of ``axis`` in ``mesh`` (1 when the mesh lacks it)."""
    return int(mesh.shape.get(axis, 1))


def stage_meshes(mesh: Mesh) -> list[Mesh]:
    """One sub-mesh per pipeline stage: pipe index p, every data and tensor device, axes unchanged."""
    _check_axes(mesh)
    return [Mesh(mesh.devices[:, p : p + 1, :], MESH_AXES, axis_types=mesh.axis_types) for p in _range(mesh, 1)]


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One sub-mesh per data-parallel replica: data index d, every pipe and tensor device, axes unchanged."""
    _check_axes(mesh)
    return [Mesh(mesh.devices[d : d + 1], MESH_AXES, axis_types=mesh.axis_types) for d in _range(mesh, 0)]


def _range(mesh: Mesh, dim: int) -> range:
    return range(mesh.devices.shape[dim])


def _check_axes(mesh: Mesh) -> None:
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"expected a mesh with axes {MESH_AXES} (see sharding.make_mesh), got {mesh.axis_names}")


def describe(mesh: Mesh) -> str:
    """``data=1 pipe=2 tensor=4 (8 cpu devices)``: for logs and benchmark tables."""
    sizes = " ".join(f"{name}={axis_size(mesh, name)}" for name in MESH_AXES)
    return f"{sizes} ({mesh.devices.size} {mesh.devices.flat[0].platform} devices)"
