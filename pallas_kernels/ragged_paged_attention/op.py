"""The public ragged paged attention op: validates shapes and dispatches to a backend.

Layout (letters from STYLE.md): queries ``q [T, N, H]`` of a flat ragged batch; the paged cache
``k_cache, v_cache [P, L, K, H]`` already holds this step's new K/V (see ``pallas_kernels.update_kv_cache``);
``block_tables [S, M]``, ``seq_lens [S]`` (tokens of each request including this step's; 0 for padding rows),
``query_start_loc [S+1]`` (request s owns tokens ``query_start_loc[s]:query_start_loc[s+1]``). Token i of request s
sits at position ``seq_lens[s] - (query_start_loc[s+1] - i)`` and attends causally to positions ``<=`` its own.
Tokens past ``query_start_loc[S]`` are padding: their output is unspecified (finite) and must be ignored.
``max_query_len`` (static, optional) is a bound the caller knows on every request's query tokens this step, such as 1
in a decode-only step: the GPU backends then skip the launches no query can need (``takes_query_len_bound``), the
others ignore it. A query longer than the bound gets unspecified output.

An fp8 cache (float8_e4m3fn) holds ``K / k_scale`` and ``V / v_scale`` (see ``pallas_kernels.kv_cache_update``): every
backend loads fp8 tiles, converts them to q's dtype and computes as for a cache in that dtype; ``k_scale`` is folded
into the softmax scale and ``v_scale`` into the output normalisation, so the scales cost nothing. A cache in the
model's dtype runs exactly as before (the scales default to 1.0).

Backends (``impl=``): ``"reference"`` (pure jnp, any platform), ``"pallas_gpu"`` (Pallas Triton kernel,
``triton_gpu``), ``"pallas_gpu_interpret"`` (the same kernel body interpreted on CPU), ``"pallas_mosaic_gpu"`` (the
Triton short-query launch plus the Hopper Mosaic GPU kernel of ``mosaic_gpu`` for long-query tiles),
``"pallas_mosaic_gpu_interpret"`` (both in interpret mode on CPU), ``"pallas_tpu"`` and ``"pallas_tpu_interpret"``
(Pallas Mosaic kernel in ``mosaic_tpu``, imported only when asked for). By default: Hopper GPUs (compute capability
9.x) -> ``pallas_mosaic_gpu`` (prefill at 80% of cuDNN flash attention on an H100 against the Triton kernel's 52%),
other GPUs -> ``pallas_gpu``, TPU -> ``pallas_tpu`` when that module exists, otherwise ``reference``.
"""

from __future__ import annotations

import functools
import importlib.util
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.kv_cache_update import FP8_KV_DTYPE
from pallas_kernels.ragged_paged_attention import reference

IMPLS = (
    "reference",
    "pallas_gpu",
    "pallas_gpu_interpret",
    "pallas_mosaic_gpu",
    "pallas_mosaic_gpu_interpret",
    "pallas_tpu",
    "pallas_tpu_interpret",
)
_TPU_MODULE = "pallas_kernels.ragged_paged_attention.mosaic_tpu"


def _has_tpu_kernel() -> bool:
    return importlib.util.find_spec(_TPU_MODULE) is not None


def _is_hopper() -> bool:
    """The Mosaic GPU kernel multiplies with wgmma, which only compute capability 9.x (Hopper) has."""
    capability = str(getattr(jax.devices()[0], "compute_capability", "") or "")
    return capability.split(".")[0] == "9"


def _resolved_impl(impl: str | None) -> str:
    return impl or _default_impl()


def takes_query_len_bound(impl: str | None = None) -> bool:
    """Whether ``impl`` (None: this platform's default) does less work given ``max_query_len``: the GPU backends,
    whose decode-sized queries take a launch of their own, skip their long-query launch under a small bound."""
    return _resolved_impl(impl).startswith(("pallas_gpu", "pallas_mosaic_gpu"))


def _default_impl() -> str:
    platform = jax.default_backend()
    if platform == "gpu":
        return "pallas_mosaic_gpu" if _is_hopper() else "pallas_gpu"
    if platform == "tpu" and _has_tpu_kernel():
        return "pallas_tpu"
    return "reference"


def _validate(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [P, L, K, H], got {k_cache.shape} and {v_cache.shape}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    if jnp.dtype(k_cache.dtype).itemsize == 1 and k_cache.dtype != FP8_KV_DTYPE:
        raise TypeError(f"an 8-bit KV cache must be float8_e4m3fn, got {k_cache.dtype}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head dim of q ({head_dim}) and k_cache ({k_cache.shape[3]}) differ")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if block_tables.ndim != 2 or seq_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"block_tables [S, M] and seq_lens [S] disagree: {block_tables.shape}, {seq_lens.shape}")
    if query_start_loc.shape != (block_tables.shape[0] + 1,):
        raise ValueError(f"query_start_loc must be [S+1] = [{block_tables.shape[0] + 1}], got {query_start_loc.shape}")
    for name, array in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if not jnp.issubdtype(array.dtype, jnp.integer):
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")


def _validate_options(sm_scale, sliding_window, soft_cap, k_scale, v_scale, max_query_len) -> None:
    for name, scale in (("sm_scale", sm_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(scale, numbers.Real) or not 0 < scale < float("inf"):
            raise ValueError(f"{name} must be a positive finite Python number, got {scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, numbers.Integral) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if soft_cap is not None and (not isinstance(soft_cap, numbers.Real) or soft_cap <= 0):
        raise ValueError(f"soft_cap must be a positive number or None, got {soft_cap!r}")
    if max_query_len is not None and (not isinstance(max_query_len, numbers.Integral) or max_query_len < 1):
        raise ValueError(f"max_query_len must be a positive int or None, got {max_query_len!r}")


def _backend(impl: str):
    if impl == "reference":
        return reference.ragged_paged_attention_reference
    if impl.startswith("pallas_mosaic_gpu"):
        from pallas_kernels.ragged_paged_attention import mosaic_gpu

        return functools.partial(mosaic_gpu.ragged_paged_attention_mosaic, interpret=impl.endswith("_interpret"))
    if impl.startswith("pallas_gpu"):
        from pallas_kernels.ragged_paged_attention import triton_gpu

        return functools.partial(triton_gpu.ragged_paged_attention_triton, interpret=impl.endswith("_interpret"))
    if not _has_tpu_kernel():
        raise ValueError(f"impl {impl!r} needs {_TPU_MODULE}, which is not installed")
    mosaic_tpu = importlib.import_module(_TPU_MODULE)
    return functools.partial(mosaic_tpu.ragged_paged_attention_tpu, interpret=impl.endswith("_interpret"))


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale", "v_scale", "max_query_len", "impl"),
)
def ragged_paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_query_len: int | None = None,
    impl: str | None = None,
) -> jax.Array:
    """Causal attention of ragged queries to their own request's paged K/V. Returns ``[T, N, H]`` in q's dtype."""
    _validate(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    _validate_options(sm_scale, sliding_window, soft_cap, k_scale, v_scale, max_query_len)
    impl = _resolved_impl(impl)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
    bound = {"max_query_len": max_query_len} if takes_query_len_bound(impl) else {}
    return _backend(impl)(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        k_scale=k_scale,
        v_scale=v_scale,
        **bound,
    )
