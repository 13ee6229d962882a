"""Quantized matmul benchmark: int8 / int4 / fp8 weights against a bf16 XLA matmul on the Llama-3.1-8B layer shapes.

    PYTHONPATH=. python3 benchmarks/quantized_matmul.py                 # the GPU run
    PYTHONPATH=. python3 benchmarks/quantized_matmul.py --sweep         # also time a few Pallas GPU kernel configs
    PYTHONPATH=. python3 benchmarks/quantized_matmul.py --smoke         # tiny sizes, interpret mode, on CPU

Shapes ``[M, K] x [K, N]`` with (K, N) in {(4096, 6144) fused qkv, (4096, 4096) o, (4096, 28672) fused gate_up,
(14336, 4096) down} and M in {1, 16, 64, 256, 4096}; bf16 activations and outputs. Each timed call multiplies the
same activations by several copies of the weight (>= 128 MB together even for int4, so the 50 MB L2 cannot hold
them) and the time per product is reported: weight-read bandwidth (values + scales bytes / time) for M <= 64,
TFLOP/s (2MKN / time) for every M, and the speed-up over the bf16 matmul. Times are medians over repeats after an
untimed warm-up; weights and activations are random normal (fixed seeds). ``--engine-xla-options`` compiles each
product with the options the engine gives a step of M tokens (on GPU: Triton GEMMs and the dot merger off above 64).
Each backend's output is compared with the reference op (relative norm error column). Prints a table and a JSON
record (device, jax version, commit, rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp

from benchmarks.common import environment, median_seconds, print_record
from jaxllm.quantization import METHODS, quantize_weight
from jaxllm.runner.xla_options import StepCompilerOptions
from pallas_kernels.quantized_matmul import quantized_matmul, reference, triton_gpu

LLAMA_8B_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
BATCH_ROWS = [1, 16, 64, 256, 4096]
SMOKE_SHAPES = [(256, 384)]
SMOKE_ROWS = [1, 16]
L2_DEFEAT_BYTES = 256 * 2**20
SWEEP_CONFIGS = {  # (block_m, block_n, block_k, num_k_splits, num_warps, num_stages); block_m follows M below 16
    "decode": [  # weight streaming: tile width (contiguous bytes per row), K step, K splits, warps
        (16, n, k, s, w, 4) for n in (64, 128, 256) for k in (256, 512) for s in (2, 4, 8) for w in (4, 8)
    ],
    "prefill": [
        (128, 128, 64, 1, 8, 3),
        (128, 128, 32, 1, 4, 4),
        (64, 128, 64, 1, 4, 3),
        (128, 256, 64, 1, 8, 3),
        (64, 64, 64, 1, 4, 4),
        (256, 128, 64, 1, 8, 3),
    ],
}


@dataclasses.dataclass
class Case:
    k: int
    n: int
    m: int
    method: str  # "bf16" for the baseline
    impl: str
    note: str = ""


def bf16_matmul(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def over_copies(product, compiler_options=None):
    """One jitted call multiplying ``x`` by every weight copy (distinct operands, so XLA keeps every product)."""
    return jax.jit(lambda x, weights: [product(x, w) for w in weights], compiler_options=compiler_options)


def make_weights(k, n, method, num_copies, seed=0):
    weights = []
    for copy in range(num_copies):
        w = jax.random.normal(jax.random.key(seed + copy), (k, n), jnp.bfloat16) * (k**-0.5)
        weights.append(w if method == "bf16" else quantize_weight(w, method))
        del w
    return weights


def weight_bytes(weight) -> int:
    """Bytes of one weight copy: a bf16 array, a QuantizedWeight, or a tuple of arrays (the bundled kernel's)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(weight))


@dataclasses.dataclass(frozen=True)
class Settings:
    methods: list
    impls: list
    num_copies: int
    sweep: bool
    repeats: int
    engine_xla_options: bool = False  # compile as the engine compiles a step of M tokens (runner.xla_options)
    int4_bit_convert: bool = False  # also time the Pallas int4 kernel with the bit convert flipped from its default


def time_case(case: Case, x, weights, product, reference_out, settings: Settings) -> dict:
    row = dataclasses.asdict(case)
    try:
        engine = StepCompilerOptions(jax.default_backend(), quantization=case.method)
        options = engine(case.m) if settings.engine_xla_options else None
        fn = over_copies(product, options)
        out = fn(x, weights)[0].astype(jnp.float32)
        expected = reference_out.astype(jnp.float32)
        err = jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected)
        seconds = median_seconds(fn, x, weights, repeats=settings.repeats, max_calls=1000) / len(weights)
    except Exception as exc:  # a failing backend must not hide the others' numbers
        return dict(row, error=f"{type(exc).__name__}: {exc}")
    flops = 2.0 * case.m * case.k * case.n
    row.update(time_us=seconds * 1e6, relative_error=float(err), tflop_per_s=flops / seconds / 1e12)
    if case.m <= 64:
        row["weight_gb_per_s"] = weight_bytes(weights[0]) / seconds / 1e9
    return row


BUNDLED_MIXED = "bundled_mgpu"  # --impls name of JAX's bundled Mosaic GPU int8 x bf16 kernel (int8 only)


def bundled_mixed_product(m: int):
    """``x @ W`` through JAX's bundled Hopper mixed-type matmul (``hopper_mixed_type_matmul_mgpu``), which multiplies
    an int8 LHS by a bf16 RHS: it computes ``(W^T [N, K]) @ (x^T [K, M'])`` with the rows of x padded to a tile
    (M' >= 64), then transposes back and applies the per-channel scales. Takes ``(W^T values, scales)``; the weight's
    transpose is made once, outside the timing; x's transpose and padding are inside it."""
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

    padded = max(64, 1 << (m - 1).bit_length())
    config = mixed.TuningConfig(  # two warpgroups split the weight's N (the kernel's M): every layer has plenty
        tile_m=128,
        tile_n=min(padded, 128),
        tile_k=64,
        max_concurrent_steps=4,
        wg_dimension=mixed.MatmulDimension.M,
    )

    def product(x, weight):
        values_t, scales = weight  # [N, K] int8, [N] f32
        x_t = jnp.pad(x, ((0, padded - m), (0, 0))).T  # [K, M']
        y_t = mixed.mixed_matmul_kernel(values_t, x_t, out_dtype=jnp.float32, config=config)  # [N, M']
        return (y_t[:, :m].T * scales[None, :]).astype(x.dtype)

    return product


def sweep_products(m, k, n, method):
    """(note, product) for each sweep config that tiles this K (int4 with the default group of 128). int4 steps by
    whole groups, so its block_k is swept as the groups per step instead (block_k 256 / 512: 1, 2 or 4 groups), with
    the bit convert as its default config has it for M rows."""
    for block_m, block_n, block_k, splits, warps, stages in SWEEP_CONFIGS["decode" if m <= 16 else "prefill"]:
        if method == "int4":
            variants = [(128, groups) for groups in ((1, 2) if block_k == 256 else (4,))]
        else:
            variants = [(min(block_k, k), 1)]
        for step_k, groups in variants:
            cfg = triton_gpu.KernelConfig(
                block_m,
                block_n,
                step_k,
                splits,
                warps,
                stages,
                int4_bit_convert=method == "int4" and triton_gpu.default_config(m, k, n, method, 128).int4_bit_convert,
                int4_groups_per_step=groups,
            )
            try:
                triton_gpu.check_config(cfg, method, k, 128 if method == "int4" else None)
            except ValueError:
                continue
            note = f"cfg m{block_m} n{block_n} k{step_k} g{groups} s{splits} w{warps} st{stages}"
            yield note, functools.partial(triton_gpu.quantized_matmul_triton, out_dtype=jnp.bfloat16, config=cfg)


def run_method(rows, k, n, m, method, weights, settings: Settings):
    x = jax.random.normal(jax.random.key(100 + m), (m, k), jnp.bfloat16)
    if method == "bf16":
        rows.append(
            time_case(Case(k, n, m, "bf16", "xla"), x, weights, bf16_matmul, bf16_matmul(x, weights[0]), settings)
        )
        return
    reference_out = quantized_matmul(x, weights[0], impl="reference")
    for impl in settings.impls:
        if impl == BUNDLED_MIXED:
            if method == "int8":
                transposed = [(jnp.asarray(w.values.T), w.scales) for w in weights]
                case = Case(k, n, m, method, impl, "x transposed in the timing")
                rows.append(time_case(case, x, transposed, bundled_mixed_product(m), reference_out, settings))
            continue
        product = functools.partial(quantized_matmul, impl=impl)
        rows.append(time_case(Case(k, n, m, method, impl), x, weights, product, reference_out, settings))
    if method == "fp8" and "xla" in settings.impls:  # what Hopper's fast fp8 accumulation would save
        product = functools.partial(reference.quantized_matmul_xla, out_dtype=x.dtype, fp8_fast_accumulation=True)
        case = Case(k, n, m, method, "xla", "fast accumulation")
        rows.append(time_case(case, x, weights, product, reference_out, settings))
    if method == "int4" and settings.int4_bit_convert and any(i.startswith("pallas_gpu") for i in settings.impls):
        interpret = "pallas_gpu_interpret" in settings.impls
        config = triton_gpu.default_config(m, k, n, method, weights[0].group_size, triton_gpu.num_cores(interpret))
        config = dataclasses.replace(config, int4_bit_convert=not config.int4_bit_convert)  # the default's opposite
        product = functools.partial(
            triton_gpu.quantized_matmul_triton, out_dtype=x.dtype, config=config, interpret=interpret
        )
        note = f"int4 bit convert {'on' if config.int4_bit_convert else 'off'}"
        case = Case(k, n, m, method, "pallas_gpu_interpret" if interpret else "pallas_gpu", note)
        rows.append(time_case(case, x, weights, product, reference_out, settings))
    for note, product in sweep_products(m, k, n, method) if settings.sweep else ():
        rows.append(time_case(Case(k, n, m, method, "pallas_gpu", note), x, weights, product, reference_out, settings))


def run_shape(rows, k, n, batch_rows, settings: Settings):
    for method in ("bf16", *settings.methods):
        weights = make_weights(k, n, method, settings.num_copies)
        for m in batch_rows:
            first = len(rows)
            run_method(rows, k, n, m, method, weights, settings)
            for row in rows[first:]:  # as each case finishes, so a run cut short still reports what it measured
                print_row(row, rows)
        del weights


TABLE_HEADER = (
    f"{'K x N':>12s} {'M':>5s} {'method':6s} {'impl':22s} {'time us':>9s} {'GB/s':>7s} {'TFLOP/s':>8s} "
    f"{'vs bf16':>7s} {'rel err':>8s}  note"
)


def print_row(r: dict, rows: list[dict]) -> None:
    head = f"{r['k']:>5d}x{r['n']:<6d} {r['m']:5d} {r['method']:6s} {r['impl']:22s}"
    if "error" in r:
        print(f"{head} FAILED: {r['error'][:100]}", flush=True)
        return
    baseline = next(
        (
            b["time_us"]
            for b in rows
            if b["method"] == "bf16" and "time_us" in b and (b["k"], b["n"], b["m"]) == (r["k"], r["n"], r["m"])
        ),
        float("nan"),
    )
    gbps = f"{r['weight_gb_per_s']:7.0f}" if "weight_gb_per_s" in r else f"{'':7s}"
    print(
        f"{head} {r['time_us']:9.1f} {gbps} {r['tflop_per_s']:8.2f} {baseline / r['time_us']:7.2f} "
        f"{r['relative_error']:8.1e}  {r['note']}",
        flush=True,
    )


def print_table(rows):
    print("\n" + TABLE_HEADER)
    for r in rows:
        print_row(r, rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes in interpret mode (CPU)")
    p.add_argument("--sweep", action="store_true", help="also time a few Pallas GPU kernel configs (GPU)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--impls",
        default=None,
        help=f"comma-separated impls (default: pallas_gpu,xla; smoke: interpret); {BUNDLED_MIXED}: JAX's bundled "
        "Mosaic GPU int8 x bf16 kernel (Hopper, int8 only)",
    )
    p.add_argument("--rows", default=None, help="comma-separated M values")
    p.add_argument("--shapes", default=None, help="comma-separated KxN weight shapes (default: the 8B layers')")
    p.add_argument("--json", default=None, help="also write the JSON record to this path")
    p.add_argument(
        "--int4-bit-convert",
        action="store_true",
        help="also time the Pallas int4 kernel with KernelConfig.int4_bit_convert the other way from its default",
    )
    p.add_argument(
        "--engine-xla-options",
        action="store_true",
        help="compile each product with the XLA options of an engine step of M tokens (default: XLA's own)",
    )
    args = p.parse_args(argv)
    if args.impls:
        impls = args.impls.split(",")
    else:
        impls = ["pallas_gpu_interpret", "xla"] if args.smoke else ["pallas_gpu", "xla"]
    shapes = SMOKE_SHAPES if args.smoke else LLAMA_8B_SHAPES
    if args.shapes:
        shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
    batch_rows = [int(m) for m in args.rows.split(",")] if args.rows else (SMOKE_ROWS if args.smoke else BATCH_ROWS)
    rows = []
    print(TABLE_HEADER, flush=True)
    for k, n in shapes:
        num_copies = 1 if args.smoke else max(2, min(16, -(-L2_DEFEAT_BYTES // (k * n))))  # int8 bytes per copy
        settings = Settings(
            args.methods.split(","),
            impls,
            num_copies,
            args.sweep and not args.smoke,
            3 if args.smoke else 7,
            args.engine_xla_options,
            args.int4_bit_convert,
        )
        run_shape(rows, k, n, batch_rows, settings)
    print_table(rows)
    record = dict(environment(), benchmark="quantized_matmul", smoke=args.smoke, rows=rows)
    print_record(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    return record


if __name__ == "__main__":
    main()
