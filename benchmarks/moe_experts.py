"""The experts' SwiGLU of one mixture-of-experts layer (``jaxllm.models.moe.routed_swiglu``) timed on its own.

    PYTHONPATH=. python3 benchmarks/moe_experts.py             # the GPU run: Qwen3-30B-A3B and Mixtral-8x7B layers
    PYTHONPATH=. python benchmarks/moe_experts.py --smoke      # tiny shapes on CPU

For each model's layer shape (bf16) and each step (a bucket of tokens, of which the first are real, as the engine's
steps are: batch 1 is one real token in a bucket of 16), the real tokens are routed to ``top_k`` experts drawn at
random (distinct per token) and the experts' SwiGLU runs as the model runs it, once per backend (``--impls``,
default the Pallas kernels and XLA's ``ragged_dot``) and, for the Pallas kernels, once per path: ``tiles`` (the tile
plan and the grouped kernel) and, for buckets up to ``PAIR_PATH_BENCH_MAX`` tokens, ``pairs`` (the per-pair
products). Reported per case: the median time, the expert
weights the step must read (the distinct experts chosen, gate + up + down) over that time (bandwidth: the bound at
small steps, against 2.95 TB/s on an H100; each timed call runs ``ROTATIONS`` steps on other experts each, so the
weights come from memory, not L2) and the FLOP/s of the routed products (the bound at large steps, against
~800 TFLOP/s bf16). Beside them, ``dense``: one dense SwiGLU of the same total rows and one expert's width, what an
ideal grouped kernel could approach when compute-bound. Prints a table and a JSON record (device, jax version,
commit).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, median_seconds, print_record
from jaxllm.models.moe import routed_swiglu

# name -> (experts, top_k, hidden, expert width)
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
SMOKE_SHAPES = {"tiny": (8, 2, 64, 32)}  # multiples of 16: the kernel tiles them
STEPS = ((16, 1), (16, 4), (16, 16), (64, 64), (256, 256), (2048, 2048))  # (bucket tokens, real tokens)
SMOKE_STEPS = ((16, 1), (8, 8))
PAIR_PATH_BENCH_MAX = 256  # the largest bucket timed on the pair path
ROTATIONS = 16  # steps per timed call, each on other experts (see rotating)


def rotating(fn, num_experts: int, top_k: int):
    """``fn(x, ids, ...)`` run ``ROTATIONS`` times in one program, the ids shifted by ``top_k`` more experts each
    time, so back-to-back steps read other experts' weights from memory, as a model's layers do, rather than the
    last step's from L2 (one token's 8 Qwen3-30B-A3B experts are 75 MB, about L2's size). Unrolled (no loop
    bookkeeping between the steps) and chained: each step's input waits for the last step's output (``+ 0 *``), so
    XLA runs them one at a time and holds one step's temporaries, as in a model. Returns one scalar."""

    def run(x, ids, *rest):
        total = jnp.zeros((), jnp.float32)
        for r in range(ROTATIONS):
            first = fn(x, (ids + r * top_k) % num_experts, *rest)[0, 0].astype(jnp.float32)
            total += first
            x = x + (first * 0).astype(x.dtype)
        return total

    return run


def routed_case(seed: int, num_tokens: int, shape, dtype=jnp.bfloat16, num_real: int | None = None):
    """A step of ``num_tokens`` tokens, the first ``num_real`` (default all) routed at random; the rest (padding)
    route to expert 0, as they may in the engine. Returns the arrays and the number of experts the real ones read."""
    num_experts, top_k, hidden, width = shape
    num_real = num_tokens if num_real is None else num_real
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(num_tokens)]).astype(np.int32)
    ids[num_real:] = np.arange(top_k)
    weights = rng.dirichlet(np.ones(top_k), size=num_tokens).astype(np.float32)
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (num_tokens, hidden), jnp.float32).astype(dtype)
    w_gate, w_up = (
        (jax.random.normal(k, (num_experts, hidden, width), jnp.float32) * 0.02).astype(dtype) for k in keys[1:3]
    )
    w_down = (jax.random.normal(keys[3], (num_experts, width, hidden), jnp.float32) * 0.02).astype(dtype)
    return (x, jnp.asarray(ids), jnp.asarray(weights), w_gate, w_up, w_down), len(np.unique(ids[:num_real]))


def dense_swiglu(x, w_gate, w_up, w_down):
    gate = jnp.dot(x, w_gate, preferred_element_type=x.dtype)
    up = jnp.dot(x, w_up, preferred_element_type=x.dtype)
    return jnp.dot(jax.nn.silu(gate) * up, w_down, preferred_element_type=x.dtype)


def paths(impl: str, bucket: int) -> tuple[str, ...]:
    if impl == "ragged_dot":
        return ("sorted",)
    return ("tiles", "pairs") if bucket <= PAIR_PATH_BENCH_MAX else ("tiles",)


def run(shapes, steps, impls) -> list[dict]:
    rows = []
    for name, shape in shapes.items():
        num_experts, top_k, hidden, width = shape
        for bucket, num_tokens in steps:
            args, distinct = routed_case(num_tokens, bucket, shape, num_real=num_tokens)
            rows_routed = num_tokens * top_k
            x_rows = jax.random.normal(jax.random.key(num_tokens), (rows_routed, hidden), jnp.float32)
            x_rows = x_rows.astype(jnp.bfloat16)
            dense_seconds = median_seconds(jax.jit(dense_swiglu), x_rows, args[3][0], args[4][0], args[5][0])
            weight_bytes = distinct * 3 * hidden * width * 2
            flops = 2 * rows_routed * 3 * hidden * width
            for impl, path in ((i, p) for i in impls for p in paths(i, bucket)):
                options = dict(
                    num_experts=num_experts, impl=impl, pair_path=None if impl == "ragged_dot" else path == "pairs"
                )
                grouped = jax.jit(rotating(functools.partial(routed_swiglu, **options), num_experts, top_k))
                seconds = median_seconds(grouped, *args, jnp.int32(num_tokens)) / ROTATIONS
                rows.append(
                    dict(
                        model=name,
                        bucket=bucket,
                        tokens=num_tokens,
                        impl=impl,
                        path=path,
                        experts_read=distinct,
                        us=seconds * 1e6,
                        dense_us=dense_seconds * 1e6,
                        weight_gbps=weight_bytes / seconds / 1e9,
                        tflops=flops / seconds / 1e12,
                    )
                )
            del args
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU), interpreted kernel")
    parser.add_argument("--impls", help="comma-separated experts backends (default pallas_gpu,ragged_dot)")
    args = parser.parse_args(argv)
    impls = (args.impls or ("pallas_gpu_interpret,ragged_dot" if args.smoke else "pallas_gpu,ragged_dot")).split(",")
    rows = run(SMOKE_SHAPES if args.smoke else SHAPES, SMOKE_STEPS if args.smoke else STEPS, impls)
    print(
        f"{'model':<15} {'bucket':>6} {'tokens':>6} {'impl':<22} {'path':<6} {'experts':>7} {'us':>10} {'dense us':>9} "
        f"{'GB/s':>8} {'TFLOP/s':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:<15} {r['bucket']:>6} {r['tokens']:>6} {r['impl']:<22} {r['path']:<6} {r['experts_read']:>7} "
            f"{r['us']:>10.1f} "
            f"{r['dense_us']:>9.1f} {r['weight_gbps']:>8.0f} {r['tflops']:>8.1f}"
        )
    record = {"benchmark": "moe_experts", **environment(), "rows": rows}
    print_record(record)
    return record


if __name__ == "__main__":
    main()
