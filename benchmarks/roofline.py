"""The hardware floor of a job: prefill FLOPs at the matmul rate, then decode bytes (weights + K/V) at the bandwidth.

    python benchmarks/roofline.py --job J8                    # with the H100 ceilings of shared/BENCHMARKS.md
    PYTHONPATH=. python3 benchmarks/roofline.py --job J8 --measure   # measure the two ceilings on this device first

Every throughput result is reported as a fraction of this floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

from benchmarks.common import JOBS, Job

H100_MATMUL_FLOPS = 802e12  # bf16 8192^3 through JAX (shared/BENCHMARKS.md)
H100_COPY_BYTES_PER_S = 2.95e12  # device copy, read + write (shared/BENCHMARKS.md)


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, model_dir: str) -> Shape:
        c = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
        heads = c["num_attention_heads"]
        return cls(
            c["num_hidden_layers"],
            c["hidden_size"],
            c["intermediate_size"],
            heads,
            c.get("num_key_value_heads", heads),
            c.get("head_dim") or c["hidden_size"] // heads,
            c["vocab_size"],
            bool(c.get("tie_word_embeddings", False)),
        )

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attn + 3 * self.hidden * self.intermediate

    @property
    def matmul_params(self) -> int:
        """Parameters that every token multiplies: the layers and the lm_head (the embedding is a gather)."""
        return self.num_layers * self.layer_params + self.vocab * self.hidden

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def floor_seconds(shape: Shape, job: Job, flops: float, bytes_per_s: float, itemsize: int = 2) -> dict:
    prompt_tokens = job.num_prompts * job.input_len
    attention_flops = 2 * 2 * shape.num_layers * shape.num_heads * shape.head_dim * job.input_len**2 / 2
    prefill_flops = 2 * shape.matmul_params * prompt_tokens + attention_flops * job.num_prompts
    weight_bytes = shape.matmul_params * itemsize
    mean_context = job.input_len + job.output_len / 2
    kv_bytes_per_step = job.num_prompts * mean_context * shape.kv_bytes_per_token(itemsize)
    decode_bytes = job.output_len * (weight_bytes + kv_bytes_per_step)
    prefill_s, decode_s = prefill_flops / flops, decode_bytes / bytes_per_s
    total = prefill_s + decode_s
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "floor_s": total,
        "max_output_tokens_per_s": job.num_prompts * job.output_len / total,
    }


def measure_ceilings() -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)
    copy = jax.jit(lambda x: x + 1)
    big = jax.random.normal(jax.random.key(2), (1 << 30,), jnp.bfloat16)
    results = []
    for fn, args, work in ((matmul, (a, b), 2 * 8192**3), (copy, (big,), 2 * big.nbytes)):
        fn(*args).block_until_ready()
        start = time.perf_counter()
        for _ in range(20):
            out = fn(*args)
        out.block_until_ready()
        results.append(work * 20 / (time.perf_counter() - start))
    return results[0], results[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), default="J8")
    p.add_argument("--flops", type=float, default=H100_MATMUL_FLOPS)
    p.add_argument("--bandwidth", type=float, default=H100_COPY_BYTES_PER_S)
    p.add_argument("--measure", action="store_true", help="measure matmul FLOP/s and copy bandwidth here first")
    args = p.parse_args(argv)
    flops, bandwidth = measure_ceilings() if args.measure else (args.flops, args.bandwidth)
    job = JOBS[args.job]
    result = floor_seconds(Shape.from_config(job.model_config), job, flops, bandwidth)
    result.update(job=job.name, matmul_flops=flops, bandwidth=bandwidth)
    print(
        f"{job.name}: floor {result['floor_s']:.2f} s (prefill {result['prefill_s']:.2f} s + decode "
        f"{result['decode_s']:.2f} s), at most {result['max_output_tokens_per_s']:.0f} output tok/s "
        f"[{flops / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s]"
    )
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
