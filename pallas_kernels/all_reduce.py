"""A one-shot all-reduce (sum) across one mesh axis as a Mosaic GPU kernel, for the small row-parallel sums of decode.

Called inside ``jax.shard_map``: each device passes its partial sum ``x [M, D]`` and gets back the sum over the
``axis_name`` devices. Each block of the kernel tells its peers' twin blocks that its operand is ready (a remote
semaphore), reads its slice of every device's operand over NVLink (``plgpu.remote_ref``), adds them in device order
(so every device rounds identically and the result stays replicated), writes its slice of the result and, before it
exits, waits until every peer has read its operand. It is one custom call: XLA can record it in the CUDA graph of the
step around it, where its own all-reduce kernel always ends the graph (``benchmarks/RESULTS.md``).

``all_reduce(x, axis_name, impl=)``: ``"pallas_gpu"`` (this kernel; NVIDIA Hopper, one process driving the mesh's
devices, which must be in device-id order) or ``"xla"`` (``jax.lax.psum``, the reference). ``supports(shape, dtype)``
says which operands the kernel takes.

Measured in jax 0.11.2 (``benchmarks/RESULTS.md``, session 24): correct and inside the graph, but slower than XLA's
own all-reduce there, because XLA re-runs each kernel's peer-address exchange (a host rendezvous and a copy) and a
cross-device barrier kernel on every execution, and a graph's launch costs the host about the same per kernel node
however the nodes are grouped. Hence opt-in (``JAXLLM_PALLAS_ALL_REDUCE``, ``jaxllm.models.activation_sharding``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("xla", "pallas_gpu")
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_LANES = 128  # threads of one warpgroup, which runs one block
_LOADS_PER_ROW = 2  # 16-byte loads per thread per row
MAX_BLOCKS = 16
MAX_OPERAND_BYTES = 4 << 20  # larger sums (prefill) stay with XLA, whose kernels are not launch-bound there


def row_elements(dtype) -> int:
    """Elements one block adds per loop step: every thread of the warpgroup makes ``_LOADS_PER_ROW`` 16-byte loads."""
    return _LANES * _LOADS_PER_ROW * 16 // jnp.dtype(dtype).itemsize


def supports(shape: tuple[int, ...], dtype) -> bool:
    """Whether the kernel takes an operand of ``shape`` / ``dtype``: one of ``DTYPES``, whole rows of the kernel."""
    return jnp.dtype(dtype) in DTYPES and math.prod(shape) % row_elements(dtype) == 0


def all_reduce(x: jax.Array, axis_name: str, impl: str = "xla") -> jax.Array:
    """The sum of ``x`` over the devices of mesh axis ``axis_name`` (inside ``shard_map``), replicated on each."""
    if impl not in IMPLS:
        raise ValueError(f"unknown all_reduce impl {impl!r}; expected one of {IMPLS}")
    if impl == "xla":
        return lax.psum(x, axis_name)
    if jnp.dtype(x.dtype) not in DTYPES:
        raise ValueError(f"the pallas_gpu all-reduce takes {[str(d) for d in DTYPES]} operands, got {x.dtype}")
    if not supports(x.shape, x.dtype):
        raise ValueError(
            f"the pallas_gpu all-reduce takes a multiple of {row_elements(x.dtype)} {x.dtype} elements, got {x.shape}"
        )
    return _one_shot(x, axis_name)


def _one_shot(x: jax.Array, axis_name: str) -> jax.Array:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num_devices = lax.axis_size(axis_name)
    rows = x.size // row_elements(x.dtype)
    num_blocks = min(rows, MAX_BLOCKS)
    flat = x.reshape(rows, row_elements(x.dtype))

    def kernel(x_ref, y_ref, ready, done):
        me = lax.axis_index(axis_name)
        block = lax.axis_index("blocks")
        peers = [lax.rem(me + offset, num_devices) for offset in range(1, num_devices)]
        for peer in peers:
            pl.semaphore_signal(ready, device_id={axis_name: peer})
        pl.semaphore_wait(ready, num_devices - 1)

        @pl.loop(block, rows, step=num_blocks)
        def _add_row(row):
            total = None
            for device in range(num_devices):  # device order: every device rounds the same way
                part = plgpu.remote_ref(x_ref, {axis_name: device})[pl.ds(row, 1), :].astype(jnp.float32)
                total = part if total is None else total + part
            y_ref[pl.ds(row, 1), :] = total.astype(y_ref.dtype)

        for peer in peers:
            pl.semaphore_signal(done, device_id={axis_name: peer})
        pl.semaphore_wait(done, num_devices - 1)

    reduced = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(flat.shape, flat.dtype),
        grid=(num_blocks,),
        grid_names=("blocks",),
        scratch_types=[plgpu.SemaphoreType.REGULAR, plgpu.SemaphoreType.REGULAR],
    )(flat)
    return reduced.reshape(x.shape)
