"""The experts' SwiGLU of one mixture-of-experts layer (``jaxllm.models.moe.routed_swiglu``) timed on its own.

    PYTHONPATH=. python3 benchmarks/moe_experts.py             # the GPU run: Qwen3-30B-A3B and Mixtral-8x7B layers
    PYTHONPATH=. python benchmarks/moe_experts.py --smoke      # tiny shapes on CPU

For each model's layer shape (bf16) and each number of tokens in a step, the tokens are routed to ``top_k`` experts
drawn at random (distinct per token) and the experts' SwiGLU runs as the model runs it, once per backend
(``--impls``, default the Pallas kernel and XLA's ``ragged_dot``). Reported per case: the median time, the expert
weights the step must read (the distinct experts chosen, gate + up + down) over that time (bandwidth: the bound at
small steps, against 2.95 TB/s on an H100) and the FLOP/s of the routed products (the bound at large steps, against
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
TOKENS = (1, 16, 256, 2048)
SMOKE_TOKENS = (1, 8)


def routed_case(seed: int, num_tokens: int, shape, dtype=jnp.bfloat16):
    num_experts, top_k, hidden, width = shape
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(num_tokens)]).astype(np.int32)
    weights = rng.dirichlet(np.ones(top_k), size=num_tokens).astype(np.float32)
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (num_tokens, hidden), jnp.float32).astype(dtype)
    w_gate, w_up = (
        (jax.random.normal(k, (num_experts, hidden, width), jnp.float32) * 0.02).astype(dtype) for k in keys[1:3]
    )
    w_down = (jax.random.normal(keys[3], (num_experts, width, hidden), jnp.float32) * 0.02).astype(dtype)
    return (x, jnp.asarray(ids), jnp.asarray(weights), w_gate, w_up, w_down), len(np.unique(ids))


def dense_swiglu(x, w_gate, w_up, w_down):
    gate = jnp.dot(x, w_gate, preferred_element_type=x.dtype)
    up = jnp.dot(x, w_up, preferred_element_type=x.dtype)
    return jnp.dot(jax.nn.silu(gate) * up, w_down, preferred_element_type=x.dtype)


def run(shapes, tokens, impls) -> list[dict]:
    rows = []
    for name, shape in shapes.items():
        num_experts, top_k, hidden, width = shape
        for num_tokens in tokens:
            args, distinct = routed_case(num_tokens, num_tokens, shape)
            rows_routed = num_tokens * top_k
            x_rows = jax.random.normal(jax.random.key(num_tokens), (rows_routed, hidden), jnp.float32)
            x_rows = x_rows.astype(jnp.bfloat16)
            dense_seconds = median_seconds(jax.jit(dense_swiglu), x_rows, args[3][0], args[4][0], args[5][0])
            weight_bytes = distinct * 3 * hidden * width * 2
            flops = 2 * rows_routed * 3 * hidden * width
            for impl in impls:
                grouped = jax.jit(functools.partial(routed_swiglu, num_experts=num_experts, impl=impl))
                seconds = median_seconds(grouped, *args)
                rows.append(
                    dict(
                        model=name,
                        tokens=num_tokens,
                        impl=impl,
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
    rows = run(SMOKE_SHAPES if args.smoke else SHAPES, SMOKE_TOKENS if args.smoke else TOKENS, impls)
    print(
        f"{'model':<15} {'tokens':>6} {'impl':<22} {'experts':>7} {'us':>10} {'dense us':>9} {'GB/s':>8} {'TFLOP/s':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:<15} {r['tokens']:>6} {r['impl']:<22} {r['experts_read']:>7} {r['us']:>10.1f} "
            f"{r['dense_us']:>9.1f} {r['weight_gbps']:>8.0f} {r['tflops']:>8.1f}"
        )
    record = {"benchmark": "moe_experts", **environment(), "rows": rows}
    print_record(record)
    return record


if __name__ == "__main__":
    main()
