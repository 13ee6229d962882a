"""Logical axis names of activations, and the hook that turns them into sharding constraints on a device mesh.

Model code names the axes of the activations it makes (``constrain(x, ("tokens", "q_heads"))``), as parameters name
theirs with ``logical_axes`` metadata. Off a mesh nothing is installed and ``constrain`` returns its input unchanged.
``sharding`` installs its rules table and a stage's mesh while it traces that stage's program
(``with activation_sharding(mesh, rules):``); each name then maps through the table to a mesh axis and the activation
gets a ``with_sharding_constraint``. The table itself lives in ``sharding.rules``: this module knows no axis names.

Ops the partitioner cannot split (Pallas kernels are opaque custom calls, which GSPMD would feed whole, gathered
operands) go through ``per_shard``: with rules installed they run under ``jax.shard_map``, each device on its own
shard of the arguments as their logical axes place them (attention and the KV-cache write work per head, so no
communication is needed).

The sums over shards that ``per_shard`` makes (row-parallel products) are ``jax.lax.psum`` by default; with
``JAXLLM_PALLAS_ALL_REDUCE=1`` those a single GPU process can do with ``pallas_kernels.all_reduce``'s one-shot Mosaic
GPU kernel use it (small operands on a mesh of the process's devices in id order), so XLA can keep them inside the
step's CUDA graph; ``reduces_in_kernel`` says when an unquantized ``Linear`` should route its product here for that.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import env_switch
from pallas_kernels import all_reduce as all_reduce_kernel

HIDDEN = ("tokens", "embed")  # [T, D] residual stream
Q_HEADS = ("tokens", "q_heads")  # [T, N*H] query projection and attention output
KV_HEADS = ("tokens", "kv_heads")  # [T, K*H] key / value projections
MLP = ("tokens", "mlp")  # [T, I] SwiGLU intermediate
HEADS_Q = ("tokens", "q_heads", "head_dim")  # [T, N, H] queries and attention output
HEADS_KV = ("tokens", "kv_heads", "head_dim")  # [T, K, H] new keys / values
KV_CACHE = ("kv_blocks", "block_slots", "kv_heads", "head_dim")  # [P, L, K, H] one layer's paged K or V cache
REPLICATED = None  # an argument every shard gets whole (step metadata)

LogicalAxes = Sequence[str] | None
PALLAS_ALL_REDUCE_ENV = "JAXLLM_PALLAS_ALL_REDUCE"

_installed: contextvars.ContextVar[tuple[Mesh, Mapping[str, str | None]] | None] = contextvars.ContextVar(
    "jaxllm_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, str | None]) -> Iterator[None]:
    """Within the block, ``constrain`` places activations on ``mesh`` by ``rules`` (logical name -> mesh axis)."""
    token = _installed.set((mesh, rules))
    try:
        yield
    finally:
        _installed.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str]) -> jax.Array:
    """``x`` constrained to the sharding its logical axes map to; ``x`` itself when no rules are installed."""
    installed = _installed.get()
    if installed is None:
        return x
    mesh, rules = installed
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match an activation of shape {x.shape}")
    spec = PartitionSpec(*(rules[name] for name in logical_axes))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def mesh_axis(logical_axis: str) -> str | None:
    """The mesh axis the installed rules map ``logical_axis`` to; None off a mesh or where the rules do not split it."""
    installed = _installed.get()
    return None if installed is None else installed[1].get(logical_axis)


def per_shard(
    fn: Callable, in_axes: Sequence[LogicalAxes], out_axes: Sequence[LogicalAxes], sum_over: str | None = None
) -> Callable:
    """``fn`` run once per shard of the installed mesh (``jax.shard_map``); ``fn`` itself when none is installed.

    ``in_axes`` / ``out_axes`` give each positional argument / output (``fn`` returns a tuple) its logical axes
    (``REPLICATED`` for whole). ``fn`` must be correct on any shard the rules make, e.g. a per-head op on its
    device's heads. ``sum_over``: a logical axis that ``fn`` contracts (a matmul's K); when the rules split it, each
    shard's outputs are partial sums and are summed across the shards (``psum``).
    """
    installed = _installed.get()
    if installed is None:
        return fn
    mesh, rules = installed
    reduce_axis = rules[sum_over] if sum_over is not None else None
    per_device = fn
    if reduce_axis is not None:

        def per_device(*args):
            return tuple(_sum_over_shards(out, reduce_axis, mesh) for out in fn(*args))

    def spec(axes: LogicalAxes) -> PartitionSpec:
        return PartitionSpec() if axes is None else PartitionSpec(*(rules[name] for name in axes))

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=tuple(spec(axes) for axes in in_axes),
        out_specs=tuple(spec(axes) for axes in out_axes),
        check_vma=False,  # Pallas kernels do not declare how their outputs vary over the mesh
    )


def reduces_in_kernel(contracted_axis: str) -> bool:
    """Whether a product contracting ``contracted_axis`` should go through ``per_shard`` so that its sum over shards
    can be the Pallas all-reduce: the switch is on and the installed rules split that axis."""
    installed = _installed.get()
    if installed is None or not env_switch(PALLAS_ALL_REDUCE_ENV):
        return False
    mesh, rules = installed
    axis = rules.get(contracted_axis)
    return axis is not None and mesh.shape[axis] > 1


def _sum_over_shards(x: jax.Array, axis: str, mesh: Mesh) -> jax.Array:
    """``x`` summed over mesh axis ``axis`` inside ``shard_map``: the Pallas one-shot all-reduce where it applies (see
    the module docstring), else ``psum``."""
    return all_reduce_kernel.all_reduce(x, axis, impl=_all_reduce_impl(x, mesh))


def _all_reduce_impl(x: jax.Array, mesh: Mesh) -> str:
    if not env_switch(PALLAS_ALL_REDUCE_ENV):
        return "xla"
    devices = mesh.devices.ravel()
    one_gpu_process = all(d.platform == "gpu" and d.process_index == devices[0].process_index for d in devices)
    in_id_order = np.array_equal(mesh.device_ids.ravel(), np.arange(mesh.size))  # Mosaic GPU's rule for peer ids
    small = x.size * x.dtype.itemsize <= all_reduce_kernel.MAX_OPERAND_BYTES
    usable = one_gpu_process and in_id_order and small and all_reduce_kernel.supports(x.shape, x.dtype)
    return "pallas_gpu" if usable else "xla"
