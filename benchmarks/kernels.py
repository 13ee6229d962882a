"""Kernel benchmarks for ragged paged attention: decode K/V bandwidth, prefill FLOP/s, and a mixed batch.

    PYTHONPATH=. python3 benchmarks/kernels.py                   # the GPU run (H100: ceilings in BENCHMARKS.md)
    PYTHONPATH=. python3 benchmarks/kernels.py --sweep           # also time kernel configs and block sizes
    PYTHONPATH=. python benchmarks/kernels.py --smoke            # tiny sizes, interpret mode, on CPU

Decode: S requests x C cached tokens, one query token each, 32 query / 8 KV heads, head dim 128, bf16; achieved
bandwidth = K/V bytes the attention must read / time, beside JAX's bundled Triton ``paged_attention``. Prefill: 4
requests x 4096 tokens, causal, against cuDNN flash attention (``jax.nn.dot_product_attention``). Mixed: many
decodes plus one prefill chunk in one call. Prefill also runs JAX's bundled Mosaic GPU flash attention
(``attention_mgpu``, contiguous K/V): what the Hopper-native Pallas backend reaches on the same shapes. Times are
medians over repeats of many back-to-back calls after an untimed warm-up; cache data is random (never zeros) with
shuffled block tables. Prints one summary table and a JSON record (device, jax version, commit, shapes, timings).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import traceback
import warnings

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, median_seconds, print_record  # noqa: E402
from pallas_kernels.ragged_paged_attention import mosaic_gpu, ragged_paged_attention, triton_gpu  # noqa: E402

COPY_CEILING = 2.95e12  # bytes/s, H100 device copy (read + write), BENCHMARKS.md
CUDNN_ANCHOR = 656e12  # FLOP/s, cuDNN non-causal 4 x 4096 on the same H100, BENCHMARKS.md


def random_cache(key, num_blocks, block_size, num_kv_heads, head_dim, dtype, chunk_blocks=16384):
    """``[P, L, K, H]`` normal data, drawn in chunks so no single draw exceeds 2**31 elements."""
    pieces = []
    for start in range(0, num_blocks, chunk_blocks):
        count = min(chunk_blocks, num_blocks - start)
        key, sub = jax.random.split(key)
        pieces.append(jax.random.normal(sub, (count, block_size, num_kv_heads, head_dim), dtype))
    return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def make_batch(seed, query_lens, seq_lens, *, num_heads, num_kv_heads, head_dim, block_size, dtype=jnp.bfloat16):
    """Flat ragged batch plus a cache whose blocks are handed out in shuffled order (block 0 = null block)."""
    rng = np.random.default_rng(seed)
    query_lens, seq_lens = np.asarray(query_lens), np.asarray(seq_lens)
    blocks_per_request = -(-seq_lens // block_size)
    max_blocks = int(blocks_per_request.max())
    num_blocks = int(blocks_per_request.sum()) + 1
    order = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((len(seq_lens), max_blocks), np.int32)
    offsets = np.concatenate([[0], np.cumsum(blocks_per_request)])
    for request, count in enumerate(blocks_per_request):
        tables[request, :count] = order[offsets[request] : offsets[request] + count]
    key_q, key_k, key_v = jax.random.split(jax.random.key(seed), 3)
    num_tokens = int(query_lens.sum())
    cache_args = (num_blocks, block_size, num_kv_heads, head_dim, dtype)
    return dict(
        q=jax.random.normal(key_q, (num_tokens, num_heads, head_dim), dtype),
        k_cache=random_cache(key_k, *cache_args),
        v_cache=random_cache(key_v, *cache_args),
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray(seq_lens, jnp.int32),
        query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(query_lens)]), jnp.int32),
    )


def kv_bytes(batch) -> int:
    """Bytes of K and V the attention must read: every cached position of every request, once per KV head."""
    _, _, num_kv_heads, head_dim = batch["k_cache"].shape
    itemsize = batch["k_cache"].dtype.itemsize
    return int(np.sum(np.asarray(batch["seq_lens"]))) * num_kv_heads * head_dim * 2 * itemsize


def causal_flops(batch) -> float:
    """Matmul FLOPs of QK^T and PV over the visible (causal) pairs only."""
    starts, lens = np.asarray(batch["query_start_loc"]), np.asarray(batch["seq_lens"])
    _, num_heads, head_dim = batch["q"].shape
    pairs = 0
    for request, length in enumerate(lens):
        query_len = starts[request + 1] - starts[request]
        first = length - query_len  # position of the request's first query token
        pairs += query_len * (first + 1) + query_len * (query_len - 1) / 2
    return 4.0 * pairs * num_heads * head_dim


def ours(batch, impl, **configs):
    """Our op through ``impl``; with ``configs`` (kernel configs), the backend's entry called directly."""
    args = [batch[k] for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc")]
    head_dim = batch["q"].shape[-1]
    if configs:
        entry = (
            mosaic_gpu.ragged_paged_attention_mosaic
            if impl == "pallas_mosaic_gpu"
            else triton_gpu.ragged_paged_attention_triton
        )
        fn = jax.jit(functools.partial(entry, sm_scale=head_dim**-0.5, **configs))
    else:
        fn = functools.partial(ragged_paged_attention, sm_scale=head_dim**-0.5, impl=impl)
    return fn, args


MOSAIC_SWEEP = [(128, 2), (64, 2), (64, 3), (64, 4)]  # (block_kv, num_stages) of the Mosaic GPU long tiles


def dispatch_floor(batch, impl):
    """A trivial jitted call on the same queries: the host's per-call dispatch cost, below which no op can time."""
    del impl
    return jax.jit(lambda q: q * 2), [batch["q"]]


def bundled_paged_attention(batch, interpret):
    """JAX's bundled Triton decode kernel; it wants ``[K, P, L, H]`` pages (converted outside the timing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention as bundled
    pages = batch["block_tables"].shape[1]
    fn = jax.jit(functools.partial(bundled.paged_attention, k_splits=min(16, pages), interpret=interpret))
    k_pages = jnp.transpose(batch["k_cache"], (2, 0, 1, 3))
    v_pages = jnp.transpose(batch["v_cache"], (2, 0, 1, 3))
    return fn, [batch["q"], k_pages, v_pages, batch["block_tables"], batch["seq_lens"]]


def contiguous_qkv(batch, num_requests):
    """The prefill batch's queries as ``[B, S, N, H]`` and random contiguous K/V ``[B, S, K, H]`` of the same sizes."""
    q = batch["q"].reshape(num_requests, -1, *batch["q"].shape[1:])
    num_kv_heads, head_dim = batch["k_cache"].shape[2:]
    kv_shape = (num_requests, q.shape[1], num_kv_heads, head_dim)
    k = jax.random.normal(jax.random.key(7), kv_shape, q.dtype)
    v = jax.random.normal(jax.random.key(8), kv_shape, q.dtype)
    return [q, k, v]


def cudnn_prefill(batch, num_requests):
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"))
    return fn, contiguous_qkv(batch, num_requests)


def bundled_mosaic_prefill(batch, num_requests, block_kv=128):
    """JAX's bundled Mosaic GPU (Hopper wgmma/TMA) flash attention on contiguous K/V of the same shapes: what a
    Mosaic GPU kernel reaches here, for choosing the prefill kernel's backend."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
    fn = jax.jit(functools.partial(attention_mgpu.attention, config=config))
    # It takes float16 only (its softmax stages P in float16); the tensor cores run both 16-bit types at one rate.
    return fn, tuple(a.astype(jnp.float16) for a in contiguous_qkv(batch, num_requests))


def record(rows, case, impl, seconds, batch, note=""):
    row = dict(case=case, impl=impl, time_us=seconds * 1e6, note=note)
    row["kv_bytes"] = kv_bytes(batch)
    row["kv_tb_per_s"] = row["kv_bytes"] / seconds / 1e12
    row["tflop_per_s"] = causal_flops(batch) / seconds / 1e12
    rows.append(row)
    print(
        f"  {case:28s} {impl:34s} {row['time_us']:10.1f} us  {row['kv_tb_per_s']:6.2f} TB/s  "
        f"{row['tflop_per_s']:7.1f} TFLOP/s {note}",
        flush=True,
    )


def attempt(rows, case, impl, batch, build, *build_args, note="", **build_kwargs):
    """Time ``build(batch, ...)``'s function; a failure is logged and recorded, never fatal to the run."""
    try:
        fn, args = build(batch, *build_args, **build_kwargs)
        record(rows, case, impl, median_seconds(fn, *args), batch, note)
    except Exception as error:  # noqa: BLE001 - keep benchmarking the other cases
        traceback.print_exc()
        rows.append(dict(case=case, impl=impl, error=f"{type(error).__name__}: {error}"[:500]))


def run_decode(rows, sizes, geo, impl, interpret, with_reference):
    for num_requests, context in sizes:
        case = f"decode {num_requests}x{context}"
        batch = make_batch(0, [1] * num_requests, [context] * num_requests, **geo)
        attempt(rows, case, impl, batch, ours, impl)
        attempt(rows, case, "jax bundled paged_attention", batch, bundled_paged_attention, interpret)
        if with_reference:
            attempt(rows, case, "reference", batch, ours, "reference")
            attempt(rows, case, "(dispatch floor: jit(q * 2))", batch, dispatch_floor, impl)


def run_prefill(rows, num_requests, length, geo, impl, on_gpu):
    case = f"prefill {num_requests}x{length} causal"
    batch = make_batch(1, [length] * num_requests, [length] * num_requests, **geo)
    attempt(rows, case, impl, batch, ours, impl)
    if on_gpu:  # the Mosaic GPU kernel is timed on a GPU only (its interpret mode is a simulator, not a baseline)
        attempt(rows, case, "pallas_mosaic_gpu", batch, ours, "pallas_mosaic_gpu")
        attempt(rows, case, "cudnn dot_product_attention", batch, cudnn_prefill, num_requests)
        attempt(rows, case, "jax bundled Mosaic GPU attention", batch, bundled_mosaic_prefill, num_requests,
                note="float16, contiguous K/V")  # fmt: skip


def run_mixed(rows, num_decodes, context, chunk, geo, impl, with_reference):
    case = f"mixed {num_decodes}x{context} + chunk {chunk}"
    query_lens = [1] * num_decodes + [chunk]
    seq_lens = [context] * num_decodes + [2 * chunk]  # the chunk continues a cached prefix of equal length
    batch = make_batch(2, query_lens, seq_lens, **geo)
    attempt(rows, case, impl, batch, ours, impl)
    if impl == "pallas_gpu":  # compiled on a GPU: the Mosaic GPU long tiles beside the Triton ones
        attempt(rows, case, "pallas_mosaic_gpu", batch, ours, "pallas_mosaic_gpu")
    if with_reference:
        attempt(rows, case, "reference", batch, ours, "reference")


DECODE_SWEEP = [  # (block_kv, num_kv_splits, num_warps, num_stages) of the short-query launch
    (128, 1, 4, 3), (128, 2, 4, 3), (128, 4, 4, 3), (128, 8, 4, 3),
]  # fmt: skip
PREFILL_SWEEP = [  # (block_rows, block_kv, num_warps, num_stages) of the long-query launch
    *((256, kv, 8, st) for kv in (32, 64, 128) for st in (2, 3, 4)),
    *((128, kv, w, st) for kv in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)),
    *((64, kv, 4, st) for kv in (64, 128) for st in (2, 3)),
]
SWEEP_PARTS = ("decode", "prefill", "block_size")


def run_sweep(rows, geo, parts=SWEEP_PARTS):
    """Kernel configs for decode and prefill, and cache block sizes, on the GPU (``parts``: which of the three)."""
    config = triton_gpu.KernelConfig
    for num_requests, context in ((32, 2048), (8, 8192)) if "decode" in parts else ():
        batch = make_batch(0, [1] * num_requests, [context] * num_requests, **geo)
        case = f"sweep decode {num_requests}x{context}"
        for block_kv, splits, warps, stages in DECODE_SWEEP:
            short = config(16, block_kv, splits, warps, stages)
            note = f"short={block_kv}/s{splits}/w{warps}/st{stages}"
            attempt(rows, case, "pallas_gpu", batch, ours, None, note=note, short_config=short)
    batch = make_batch(1, [4096] * 4, [4096] * 4, **geo)
    for block_rows, block_kv, warps, stages in PREFILL_SWEEP if "prefill" in parts else ():
        long = config(block_rows, block_kv, 1, warps, stages)
        note = f"long={block_rows}/{block_kv}/w{warps}/st{stages}"
        attempt(rows, "sweep prefill 4x4096", "pallas_gpu", batch, ours, None, note=note, long_config=long)
    for block_size in (32, 64) if "block_size" in parts else ():
        sized = dict(geo, block_size=block_size)
        batch = make_batch(1, [4096] * 4, [4096] * 4, **sized)
        attempt(rows, "sweep prefill 4x4096", "pallas_gpu", batch, ours, "pallas_gpu", note=f"L={block_size}")
        batch = make_batch(0, [1] * 32, [4096] * 32, **sized)
        attempt(rows, "sweep decode 32x4096", "pallas_gpu", batch, ours, "pallas_gpu", note=f"L={block_size}")


def summary(rows):
    print("\nsummary (K/V bandwidth against the 2.95 TB/s copy ceiling; FLOP/s over causal pairs)")
    print(f"{'case':30s} {'impl':34s} {'time us':>10s} {'TB/s':>6s} {'%copy':>6s} {'TFLOP/s':>8s}  note")
    for row in rows:
        if "error" in row:
            print(f"{row['case']:30s} {row['impl']:34s} FAILED: {row['error'][:80]}")
            continue
        share = 100 * row["kv_tb_per_s"] * 1e12 / COPY_CEILING
        print(
            f"{row['case']:30s} {row['impl']:34s} {row['time_us']:10.1f} {row['kv_tb_per_s']:6.2f} {share:6.1f} "
            f"{row['tflop_per_s']:8.1f}  {row.get('note', '')}"
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes in interpret mode (CPU)")
    parser.add_argument(
        "--sweep",
        nargs="?",
        const=",".join(SWEEP_PARTS),
        default="",
        help=f"also time kernel configs and block sizes (GPU); optionally only some of {','.join(SWEEP_PARTS)}",
    )
    parser.add_argument("--sweep-only", action="store_true", help="skip the standard cases (with --sweep)")
    parser.add_argument("--json", default=None, help="also write the JSON record to this path")
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu" and not args.smoke
    impl = "pallas_gpu" if on_gpu else "pallas_gpu_interpret"
    geo = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=args.block_size)
    rows = []
    if args.smoke:
        geo = dict(num_heads=8, num_kv_heads=2, head_dim=64, block_size=16)
        run_decode(rows, [(4, 64)], geo, impl, interpret=True, with_reference=True)
        run_prefill(rows, 2, 48, geo, impl, on_gpu=False)
        run_mixed(rows, 3, 64, 24, geo, impl, with_reference=True)
    elif args.sweep_only:
        prefill = make_batch(1, [4096] * 4, [4096] * 4, **geo)
        attempt(rows, "prefill 4x4096 causal", "cudnn dot_product_attention", prefill, cudnn_prefill, 4)
        attempt(rows, "prefill 4x4096 causal", impl, prefill, ours, impl, note="default configs")
        for block_kv, num_stages in MOSAIC_SWEEP:
            note = f"Mosaic GPU long tiles: block_q 2x64, block_kv {block_kv}, {num_stages} stages"
            mosaic = mosaic_gpu.MosaicConfig(block_kv=block_kv, num_stages=num_stages)
            attempt(rows, "prefill 4x4096 causal", "pallas_mosaic_gpu", prefill, ours, "pallas_mosaic_gpu",
                    note=note, mosaic_config=mosaic)  # fmt: skip
        for block_kv in (64, 128):
            note = f"float16, contiguous K/V, block_kv {block_kv}"
            attempt(rows, "prefill 4x4096 causal", "jax bundled Mosaic GPU attention", prefill,
                    bundled_mosaic_prefill, 4, block_kv, note=note)  # fmt: skip
        del prefill
    else:
        sizes = [(32, 2048), (32, 4096), (32, 8192), (256, 2048), (256, 4096), (256, 8192)]
        run_decode(rows, sizes[:1], geo, impl, interpret=False, with_reference=True)
        run_decode(rows, sizes[1:], geo, impl, interpret=False, with_reference=False)
        run_prefill(rows, 4, 4096, geo, impl, on_gpu)
        run_mixed(rows, 64, 4096, 2048, geo, impl, with_reference=True)
        run_mixed(rows, 192, 2048, 512, geo, impl, with_reference=False)
    if args.sweep and not args.smoke:
        parts = args.sweep.split(",")
        unknown = sorted(set(parts) - set(SWEEP_PARTS))
        if unknown:
            parser.error(f"--sweep parts must be among {SWEEP_PARTS}, got {unknown}")
        run_sweep(rows, geo, parts)
    summary(rows)
    result = dict(environment(), benchmark="ragged_paged_attention", geometry=geo, smoke=args.smoke, rows=rows)
    print_record(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
    return result


if __name__ == "__main__":
    main()
