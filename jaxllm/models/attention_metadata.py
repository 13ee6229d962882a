"""AttentionMetadata: the per-step ragged batch layout every attention layer reads (device arrays, a pytree).

``max_query_len`` is static (part of the tree's structure, not a leaf): a bound the host knows on every request's
query tokens, 1 in a decode-only step, which lets the attention kernels skip their long-query launch
(``pallas_kernels.ragged_paged_attention``). Each value compiles its own step program.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import struct


@struct.dataclass
class AttentionMetadata:
    positions: jax.Array  # [T] int32, absolute position of each token in its request
    slot_mapping: jax.Array  # [T] int32, cache slot of each token's new K/V (padding -> null block 0)
    context_lens: jax.Array  # [T] int32, length of each token's request after this step (dynamic rope)
    block_tables: jax.Array  # [S, M] int32
    seq_lens: jax.Array  # [S] int32, tokens of each request after this step (0 for padding rows)
    query_start_loc: jax.Array  # [S+1] int32
    max_query_len: int | None = struct.field(pytree_node=False, default=None)  # None: up to T


ARRAY_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionMetadata) if f.metadata.get("pytree_node", True))
"""The names of ``AttentionMetadata``'s array fields (its leaves), in order."""
