"""AttentionMetadata: the per-step ragged batch layout every attention layer reads (device arrays, a pytree)."""

from __future__ import annotations

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
