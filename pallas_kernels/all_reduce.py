"""A one-shot all-reduce (sum) across one mesh axis as a Mosaic GPU kernel, for the small row-parallel sums of decode.

Called inside ``jax.shard_map``: each device passes its partial sum ``x [M, D]`` and gets back the sum over the
``axis_name`` devices. Each block of the kernel tells its peers' twin blocks that its operand is ready (a remote
semaphore), reads its slice of every device's operand over NVLink (``plgpu.remote_ref``), adds them in device order
(so every device rounds identically and the result stays replicated), writes its slice of the result and, before it
exits, waits until every peer has read its operand. It is one custom call: XLA can record it in the CUDA graph of the
step around it, where its own all-reduce kernel always ends the graph (``benchmarks/RESULTS.md``).

``all_reduce(x, axis_name, impl=)``: ``"pallas_gpu"`` (this kernel; NVIDIA Hopper, one process driving the mesh's
devices) or ``"xla"`` (``jax.lax.psum``, the reference). ``supports(shape, dtype)`` says which operands the kernel
takes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("xla", "pallas_gpu")
_LANES = 128  # threads of one warpgroup, which runs one block
_VECTOR = 8  # bf16 elements per 16-byte load
ROW_ELEMENTS = _LANES * _VECTOR * 2  # elements one block adds per loop step
MAX_BLOCKS = 16
MAX_OPERAND_BYTES = 4 << 20  # larger sums (prefill) stay with XLA, whose kernels are not launch-bound there


def supports(shape: tuple[int, ...], dtype) -> bool:
    """Whether the kernel takes an operand of ``shape`` / ``dtype`` (bf16 or f16, a whole number of rows)."""
    size = 1
    for dim in shape:
        size *= dim
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and size % ROW_ELEMENTS == 0


def all_reduce(x: jax.Array, axis_name: str, impl: str = "xla") -> jax.Array:
    """The sum of ``x`` over the devices of mesh axis ``axis_name`` (inside ``shard_map``), replicated on each."""
    if impl not in IMPLS:
        raise ValueError(f"unknown all_reduce impl {impl!r}; expected one of {IMPLS}")
    if impl == "xla":
        return lax.psum(x, axis_name)
    if not supports(x.shape, x.dtype):
        raise ValueError(
            f"the pallas_gpu all-reduce takes bf16/f16 operands of a multiple of {ROW_ELEMENTS} elements, "
            f"got {x.dtype} {x.shape}"
        )
    return _one_shot(x, axis_name)


def _one_shot(x: jax.Array, axis_name: str) -> jax.Array:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num_devices = lax.axis_size(axis_name)
    rows = x.size // ROW_ELEMENTS
    num_blocks = min(rows, MAX_BLOCKS)
    flat = x.reshape(rows, ROW_ELEMENTS)

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


all_reduce_xla = functools.partial(all_reduce, impl="xla")
