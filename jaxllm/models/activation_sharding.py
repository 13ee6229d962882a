"""Logical axis names of activations, and the hook that turns them into sharding constraints on a device mesh.

Model code names the axes of the activations it makes (``constrain(x, ("tokens", "q_heads"))``), as parameters name
theirs with ``logical_axes`` metadata. Off a mesh nothing is installed and ``constrain`` returns its input unchanged.
``sharding`` installs its rules table and a stage's mesh while it traces that stage's program
(``with activation_sharding(mesh, rules):``); each name then maps through the table to a mesh axis and the activation
gets a ``with_sharding_constraint``. The table itself lives in ``sharding.rules``: this module knows no axis names.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

HIDDEN = ("tokens", "embed")  # [T, D] residual stream
Q_HEADS = ("tokens", "q_heads")  # [T, N*H] query projection and attention output
KV_HEADS = ("tokens", "kv_heads")  # [T, K*H] key / value projections
MLP = ("tokens", "mlp")  # [T, I] SwiGLU intermediate

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
