"""Pallas kernels for jaxllm, each an op with one public function, a pure-jnp reference and an ``impl=`` switch."""

from pallas_kernels.kv_cache_update import update_kv_cache
from pallas_kernels.ragged_paged_attention import ragged_paged_attention

__all__ = ["ragged_paged_attention", "update_kv_cache"]
