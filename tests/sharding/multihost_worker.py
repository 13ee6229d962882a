"""One process of the two-process tests: joins the job, runs a tiny model at TP=4 over both hosts, prints tokens.

Run by ``test_distributed.py`` (never collected: the name does not start with ``test_``). Usage:
    python -m tests.sharding.multihost_worker COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID [engine|llm]
``engine`` drives ``sharding.ShardedEngine`` directly; ``llm`` goes through the public
``LLM(model=<fixture dir>, tensor_parallel_size=4)``, as a user's multi-host script does.
Each process must see 2 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2). The last stdout line is
``TOKENS <json>``: greedy output ids per request.
"""

from __future__ import annotations

import json
import sys

from sharding.distributed import describe_processes, initialize_distributed, shutdown_distributed

LLM_PROMPTS = [list(range(1, n)) for n in (5, 20, 33)]  # 33 tokens: chunked under the 16-token budget


def llm_options() -> dict:
    return dict(
        model="tests/fixtures/models/llama",
        dtype="float32",
        skip_tokenizer_init=True,
        max_model_len=128,
        max_num_batched_tokens=16,
        num_gpu_blocks_override=64,
    )


def llm_tokens(llm) -> list[list[int]]:
    from jaxllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for p in LLM_PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def main(coordinator_address: str, num_processes: int, process_id: int, mode: str = "engine") -> None:
    initialize_distributed(coordinator_address, num_processes, process_id, initialization_timeout=120)
    if mode == "llm":
        from jaxllm import LLM

        print(describe_processes(), flush=True)
        tokens = llm_tokens(LLM(**llm_options(), tensor_parallel_size=4))
        print("TOKENS " + json.dumps(tokens), flush=True)
        shutdown_distributed()
        return
    import jax.numpy as jnp  # after joining: nothing may touch a device before initialize

    from jaxllm.models import ModelConfig, get_model_class
    from sharding import ShardedEngine, build_sharded_model, make_mesh
    from sharding.engine import generate
    from tests.sharding.helpers import (
        FAST_COMPILE,
        GREEDY,
        mixed_prompts,
        random_hf_tensors,
        resolved_config,
        tiny_hf_config,
    )

    print(describe_processes(), flush=True)
    config = ModelConfig.from_hf_config(tiny_hf_config())
    mesh = make_mesh(tensor_parallel_size=4)  # 2 devices of each process
    model = build_sharded_model(
        get_model_class(config.architecture), config, jnp.float32, mesh, tensors=random_hf_tensors(config)
    )
    resolved = resolved_config()
    engine = ShardedEngine.from_model(
        model, mesh, resolved, jnp.float32, runner_kwargs={"compiler_options": FAST_COMPILE}
    )
    outputs = generate(engine, mixed_prompts(config.vocab_size), GREEDY)
    print("TOKENS " + json.dumps(outputs, sort_keys=True), flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
