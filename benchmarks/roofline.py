"""The hardware floor of a job: prefill FLOPs at the matmul rate, then decode bytes (weights + K/V) at the bandwidth.

    python benchmarks/roofline.py --job J8                    # with the H100 ceilings of shared/BENCHMARKS.md
    python benchmarks/roofline.py --job J8 --model benchmarks/configs/qwen3-30b-a3b   # J8's lengths, another shape
    PYTHONPATH=. python3 benchmarks/roofline.py --job J8 --measure   # measure the two ceilings on this device first

Every throughput result is reported as a fraction of this floor. A mixture of experts' prefill counts each token's
``top_k`` experts; its decode steps read the experts the step's tokens reach (nearly all of them for J8's 256
sequences, uniform routing assumed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

from benchmarks.common import JOBS, Job
from jaxllm.models.config import ModelConfig

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
    # A mixture of experts (``jaxllm.models.config.MoEConfig``): its sparse layers' MLPs are ``top_k`` of
    # ``num_experts`` SwiGLUs of width ``expert_width`` (plus a shared one of ``shared_width``) and a router.
    num_experts: int = 0
    top_k: int = 0
    expert_width: int = 0
    shared_width: int = 0
    num_sparse_layers: int = 0

    @classmethod
    def from_config(cls, model_dir: str) -> Shape:
        c = ModelConfig.from_hf_config(json.loads((pathlib.Path(model_dir) / "config.json").read_text()))
        experts = {}
        if c.moe is not None:
            experts = dict(
                num_experts=c.moe.num_experts,
                top_k=c.moe.top_k,
                expert_width=c.moe.intermediate_size,
                shared_width=c.moe.shared_expert_intermediate_size,
                num_sparse_layers=len(c.moe.sparse_layers),
            )
        return cls(
            num_layers=c.num_layers,
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            vocab=c.vocab_size,
            tied=c.tie_word_embeddings,
            **experts,
        )

    def matmul_params(self, experts_per_layer: float | None = None) -> float:
        """Parameters the matmuls use: the layers and the lm_head (the embedding is a gather). A sparse layer
        counts ``experts_per_layer`` experts (default ``top_k``, what one token multiplies)."""
        attention = self.hidden * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        dense_mlp = 3 * self.hidden * self.intermediate
        experts = self.top_k if experts_per_layer is None else experts_per_layer
        sparse_mlp = experts * 3 * self.hidden * self.expert_width + 3 * self.hidden * self.shared_width
        sparse_mlp += self.hidden * self.num_experts  # the router
        num_dense = self.num_layers - self.num_sparse_layers
        return (
            self.num_layers * attention + num_dense * dense_mlp + self.num_sparse_layers * sparse_mlp
        ) + self.vocab * self.hidden

    def experts_read(self, num_tokens: int) -> float:
        """Expected distinct experts a sparse layer reads for ``num_tokens`` tokens routed uniformly at random."""
        if not self.num_experts:
            return 0.0
        return self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** num_tokens)

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def floor_seconds(shape: Shape, job: Job, flops: float, bytes_per_s: float, itemsize: int = 2) -> dict:
    """Prefill: every prompt token's matmul FLOPs (its ``top_k`` experts in a sparse layer) plus causal attention.
    Decode: per step, the weights (in a sparse layer the experts the batch's tokens reach) and the K/V cache read."""
    prompt_tokens = job.num_prompts * job.input_len
    attention_flops = 2 * 2 * shape.num_layers * shape.num_heads * shape.head_dim * job.input_len**2 / 2
    prefill_flops = 2 * shape.matmul_params() * prompt_tokens + attention_flops * job.num_prompts
    weight_bytes = shape.matmul_params(shape.experts_read(job.num_prompts)) * itemsize
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
    p.add_argument("--model", help="a directory with config.json: the job's lengths on this model's shape")
    p.add_argument("--flops", type=float, default=H100_MATMUL_FLOPS)
    p.add_argument("--bandwidth", type=float, default=H100_COPY_BYTES_PER_S)
    p.add_argument("--measure", action="store_true", help="measure matmul FLOP/s and copy bandwidth here first")
    args = p.parse_args(argv)
    flops, bandwidth = measure_ceilings() if args.measure else (args.flops, args.bandwidth)
    job = JOBS[args.job]
    model_dir = args.model or job.model_config
    result = floor_seconds(Shape.from_config(model_dir), job, flops, bandwidth)
    result.update(job=job.name, model=model_dir, matmul_flops=flops, bandwidth=bandwidth)
    print(
        f"{job.name}: floor {result['floor_s']:.2f} s (prefill {result['prefill_s']:.2f} s + decode "
        f"{result['decode_s']:.2f} s), at most {result['max_output_tokens_per_s']:.0f} output tok/s "
        f"[{flops / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s]"
    )
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
