"""Ragged paged attention: one op for mixed prefill and decode over a paged KV cache.

Public entry point ``ragged_paged_attention``; backends are chosen with ``impl=`` or, by default, by platform.
"""

from pallas_kernels.ragged_paged_attention.op import ragged_paged_attention, takes_query_len_bound

__all__ = ["ragged_paged_attention", "takes_query_len_bound"]
