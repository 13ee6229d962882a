"""Diagnostic: XLA's memory analysis of the engine step (arguments, outputs, aliased, temporaries) at two cache sizes.

PYTHONPATH=. python3 -m benchmarks.memory_probe --model benchmarks/configs/llama-3.2-1b
"""

import argparse
import logging

import jax

from jaxllm import LLMEngine


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/configs/llama-3.2-1b")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    engine = LLMEngine.from_engine_args(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_model_len=2048,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks_override=2048,
    )
    runner = engine.runner
    print(
        "memory_stats after warm-up", {k: v for k, v in jax.local_devices()[0].memory_stats().items() if "bytes" in k}
    )
    for num_blocks in (2049, 4097):
        bucket = runner.config.token_buckets[-1]
        import jax.numpy as jnp

        from jaxllm.runner.model_runner import empty_step_batch
        from jaxllm.sampling import build_sampling_metadata

        rows = runner.config.request_rows_for(bucket)
        batch = empty_step_batch(bucket, rows, runner.config.max_blocks_per_request)
        shape = (num_blocks, runner.config.block_size, runner.model_config.num_kv_heads, runner.model_config.head_dim)
        kv = [(jax.ShapeDtypeStruct(shape, runner.kv_dtype),) * 2 for _ in range(runner.model_config.num_layers)]
        compiled = runner._jitted_step.lower(
            runner.params, kv, runner._batch_arrays(batch), build_sampling_metadata([], rows), jnp.int32(0)
        ).compile()
        m = compiled.memory_analysis()
        print(
            num_blocks,
            "arg",
            m.argument_size_in_bytes / 1e9,
            "out",
            m.output_size_in_bytes / 1e9,
            "alias",
            m.alias_size_in_bytes / 1e9,
            "temp",
            m.temp_size_in_bytes / 1e9,
            "GB",
        )
        text = compiled.as_text()
        print(
            "input_output_alias" in text,
            text.count(" copy("),
            [l[:200] for l in text.splitlines() if "input_output_alias" in l][:1],
        )


if __name__ == "__main__":
    main()
