"""One host-to-device copy per step: a pytree of host numpy arrays packed into one byte buffer, unpacked in-program.

A step's inputs are a few dozen small arrays (token ids, positions, slot mapping, block tables, sampling
parameters). Copied one by one, each is a separate host-to-device transfer per device, and on a multi-GPU mesh
their fixed costs add up to milliseconds of host time per step. ``pack`` lays every leaf's bytes end to end in one
``uint8`` buffer (so one transfer per device), each leaf starting at a multiple of ``LEAF_ALIGNMENT`` bytes, and
returns a ``PackedLayout``: the tree structure and each leaf's dtype, shape and byte offset. The alignment matters
because XLA may hand a leaf to a kernel in place, as a view into the buffer, and a Mosaic GPU kernel refuses an input
that does not start on 256 bytes (``INVALID_ARGUMENT: Input buffer 1 is not 256-byte aligned``, H200, jax 0.11.2,
when the block tables sat 192 bytes into the buffer). The layout is hashable and is passed to the jitted program as a
static argument; ``unpack`` slices and bitcasts the buffer back into the same pytree inside the program (a few fused
slices).
``place`` copies several programs' packed buffers in one ``jax.device_put`` call (one call's host overhead per step,
not one per program): a mesh's runner places them on its stages' devices that way. The one-device runner skips it and
passes the numpy buffers to its jitted calls, whose C++ path copies them for a tenth of the host time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LEAF_ALIGNMENT = 256  # bytes; XLA's GPU buffers start on this, and Mosaic GPU kernels require it of their inputs


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    treedef: object  # jax.tree_util.PyTreeDef (hashable)
    leaves: tuple[tuple[np.dtype, tuple[int, ...], int], ...]  # (dtype, shape, byte offset) per leaf

    @property
    def num_bytes(self) -> int:
        if not self.leaves:
            return 0
        dtype, shape, offset = self.leaves[-1]
        return offset + math.prod(shape) * dtype.itemsize


def pack(tree) -> tuple[np.ndarray, PackedLayout]:
    """``tree``'s leaves (numpy arrays or scalars) as one ``uint8`` buffer, each at an offset that is a multiple of
    ``LEAF_ALIGNMENT``, and the layout to rebuild it. (Each leaf's bytes via ``tobytes`` and one join: a step's ~20
    leaves pack in ~10 us on a 2-core CPU host, against ~80 us through numpy views and ``concatenate``; it runs twice
    per step.)"""
    leaves, treedef = jax.tree.flatten(tree)
    parts, specs, offset = [], [], 0
    for leaf in leaves:
        array = np.asarray(leaf)
        dtype = array.dtype
        if dtype.kind not in "biuf":
            raise TypeError(f"cannot pack a leaf of dtype {dtype} (shape {array.shape})")
        raw = array.tobytes()  # C order, whatever the array's strides
        if offset % LEAF_ALIGNMENT:
            gap = LEAF_ALIGNMENT - offset % LEAF_ALIGNMENT
            parts.append(bytes(gap))
            offset += gap
        specs.append((dtype, array.shape, offset))
        parts.append(raw)
        offset += len(raw)
    return np.frombuffer(b"".join(parts), np.uint8), PackedLayout(treedef, tuple(specs))


@dataclasses.dataclass(frozen=True)
class Packed:
    """One program's step arrays packed: the buffer (host bytes from ``of``; a device array once ``place``d) and the
    layout its program unpacks it by."""

    buffer: np.ndarray | jax.Array
    layout: PackedLayout

    @classmethod
    def of(cls, tree) -> Packed:
        return cls(*pack(tree))


def place(packed: Sequence[Packed], placements) -> list[Packed]:
    """Host-packed buffers copied to their devices in one ``jax.device_put`` call; ``placements``: one sharding or
    device per buffer, or one for all (None: the default device)."""
    if isinstance(placements, Sequence):
        placements = list(placements)
    buffers = jax.device_put([p.buffer for p in packed], placements)
    return [Packed(buffer, p.layout) for buffer, p in zip(buffers, packed, strict=True)]


def unpack(buffer: jax.Array, layout: PackedLayout):
    """The pytree ``pack`` packed, from its buffer (traced inside a jitted program)."""
    leaves = []
    for dtype, shape, offset in layout.leaves:
        size = math.prod(shape)
        raw = jax.lax.slice(buffer, (offset,), (offset + size * dtype.itemsize,))
        if dtype == np.bool_:
            value = raw != 0
        elif dtype.itemsize == 1:
            value = jax.lax.bitcast_convert_type(raw, dtype)
        else:
            value = jax.lax.bitcast_convert_type(raw.reshape(size, dtype.itemsize), dtype)
        leaves.append(jnp.reshape(value, shape))
    return jax.tree.unflatten(layout.treedef, leaves)
