"""LLMEngine's runners on a device mesh, from ``LLM(tensor_parallel_size=T, pipeline_parallel_size=P,
data_parallel_size=D)``: the mesh, each replica's weights loaded straight into their shards, KV cache sized for the
most loaded device, and one ``PipelineRunner`` per data-parallel replica.

Owns the device-count rule: ``T x P x D`` must divide the number of devices (the first ``T x P x D`` are used, as
``sharding.make_mesh`` does), else a ValueError naming the sizes. Must not touch the one-device path (``ModelRunner``,
built by ``jaxllm.engine.llm_engine``). KV budget: on CPU, or with ``num_gpu_blocks_override`` /
``kv_cache_memory_bytes``, ``jaxllm.engine.setup.num_kv_blocks`` with the per-device block cost; on an accelerator,
``gpu_memory_utilization`` of the device with the least memory left after the weights and one run of the largest
bucket (the memory peak, as vLLM profiles it; the compiled step's temporaries where no fresh peak is counted).
On GPUs unless ``JAXLLM_MESH_LAUNCH_THREAD=0`` (elsewhere only with ``=1``): each runner launches its steps from a
worker thread (``sharding.runner``; J8 at TP 4 on 4 x H200, alternating runs on one lease: 1.14x output tok/s,
batch-1 4.65-5.40 against 5.52-6.67 ms, benchmarks/RESULTS.md). Experimental: ``JAXLLM_STABLE_STAGE_OUTPUTS=1``
writes earlier pipeline stages' hidden states into donated buffers (not yet run on a GPU). On unless
``JAXLLM_STABLE_STEP_OUTPUTS=0``: the last stage writes its results into donated buffers
(``jaxllm.runner.stable_outputs``; J8 at TP 2 on 2 x H100: 10,120 -> 13,288 output tok/s).
"""

from __future__ import annotations

import functools
import logging

import jax
from jax.sharding import Mesh

from jaxllm.config import EngineConfig, ResolvedConfig, env_switch
from jaxllm.engine import setup
from jaxllm.loading.model_source import ModelSource
from jaxllm.models import ModelConfig
from jaxllm.runner.kv_cache import measured_device_memory
from jaxllm.runner.stable_outputs import stable_stage_outputs_enabled, stable_step_outputs_enabled
from jaxllm.runner.xla_options import StepCompilerOptions
from sharding.mesh import describe, make_mesh, replica_meshes
from sharding.model_sharding import expand_kv_heads, kv_bytes_per_block_per_device
from sharding.rules import param_placement
from sharding.runner import PipelineRunner, sampler_head

logger = logging.getLogger(__name__)

LAUNCH_THREAD_ENV = "JAXLLM_MESH_LAUNCH_THREAD"


def launch_thread_enabled(backend: str) -> bool:
    """``JAXLLM_MESH_LAUNCH_THREAD`` when set; unset, on for GPUs, whose multi-device execute returns only once every
    GPU's host thread has launched its share (the measured case), and off elsewhere (not measured on TPUs; on CPU
    the "devices" share the host's cores)."""
    setting = env_switch(LAUNCH_THREAD_ENV)
    return backend == "gpu" if setting is None else setting


def engine_mesh(config: EngineConfig) -> Mesh | None:
    """The ``(data, pipe, tensor)`` mesh the options ask for; None for one device (no parallelism asked)."""
    tensor, pipe, data = config.tensor_parallel_size, config.pipeline_parallel_size, config.data_parallel_size
    num_needed = tensor * pipe * data
    if num_needed == 1:
        return None
    devices = jax.devices()
    if len(devices) % num_needed:
        raise ValueError(
            f"tensor_parallel_size={tensor} x pipeline_parallel_size={pipe} x data_parallel_size={data} = "
            f"{num_needed} devices does not divide the {len(devices)} available {devices[0].platform} device(s)"
        )
    return make_mesh(tensor, pipe, data)


def load_replica_model(config: EngineConfig, source: ModelSource, model_config: ModelConfig, replica_mesh: Mesh):
    """One replica's model, every parameter created (dummy) or loaded straight onto its stage's shards (quantized
    weights like their kernels, scales along with them), its KV heads expanded when fewer than T."""
    placement = param_placement(replica_mesh, model_config)
    model = setup.load_model(config, source, model_config, placement=placement)
    return expand_kv_heads(model, replica_mesh)


def build_mesh_runners(
    config: EngineConfig, source: ModelSource, model_config: ModelConfig, kv_dtype, mesh: Mesh
) -> tuple[list[PipelineRunner], ResolvedConfig]:
    """One ``PipelineRunner`` per data-parallel replica of ``mesh``, all with one KV cache size; and that config."""
    per_block = kv_bytes_per_block_per_device(
        model_config, config.block_size, kv_dtype, config.tensor_parallel_size, config.pipeline_parallel_size
    )
    measure = (
        jax.default_backend() != "cpu"
        and config.num_gpu_blocks_override is None
        and config.kv_cache_memory_bytes is None
    )
    if measure:
        resolved = setup.resolve_limits(config, model_config, num_blocks=2)
    else:
        num_blocks = setup.num_kv_blocks(config, model_config, kv_dtype, bytes_per_block=per_block)
        resolved = setup.resolve_limits(config, model_config, num_blocks)
    runners = []
    compiler_options = StepCompilerOptions.for_engine(config, jax.default_backend())  # every replica's alike
    for index, replica_mesh in enumerate(replica_meshes(mesh)):
        model = load_replica_model(config, source, model_config, replica_mesh)
        runners.append(
            PipelineRunner(
                model,
                replica_mesh,
                resolved,
                kv_dtype,
                seed=config.seed + index,
                head_fn=functools.partial(sampler_head, logprobs_mode=config.logprobs_mode),
                compiler_options=compiler_options,
                launch_thread=launch_thread_enabled(jax.default_backend()),
                stable_step_outputs=stable_step_outputs_enabled(),
                stable_stage_outputs=stable_stage_outputs_enabled(),
            )
        )
    if measure:
        peaks_before = _peaks(mesh)
        for runner in runners:
            runner.profile_largest_bucket()
        num_blocks = _measured_num_blocks(config, mesh, per_block, runners, peaks_before)
        resolved = setup.with_num_blocks(resolved, num_blocks)
        for runner in runners:
            runner.resize_kv_cache(resolved)
    logger.info(
        "mesh %s: KV cache %d blocks of %d tokens per replica, %.3f GiB on the most loaded device",
        describe(mesh),
        resolved.num_blocks - 1,
        resolved.block_size,
        resolved.num_blocks * per_block / 2**30,
    )
    return runners, resolved


def _local_devices(mesh: Mesh) -> list:
    return [device for device in mesh.devices.flat if device.process_index == jax.process_index()]


def _peaks(mesh: Mesh) -> dict:
    """Each local device's allocator peak (None where none is counted), before the largest bucket's profile run."""
    return {device: measured_device_memory(device).peak for device in _local_devices(mesh)}


def _measured_num_blocks(
    config: EngineConfig, mesh: Mesh, bytes_per_block: int, runners: list[PipelineRunner], peaks_before: dict
) -> int:
    """Blocks that fit the device with the least memory left under ``gpu_memory_utilization`` after the largest step:
    after the allocator's peak where the profile run raised it above ``peaks_before``; otherwise after the memory in
    use plus the compiled largest step's temporaries. That covers allocators without statistics (no peak: XLA's VMM
    allocator) and a peak left by something else, such as an earlier engine of the same process (JAX's peak is never
    reset), which would otherwise leave this engine no room."""
    memories = {device: measured_device_memory(device) for device in _local_devices(mesh)}
    fresh_peaks = {
        device: memory.peak
        for device, memory in memories.items()
        if memory.peak is not None and (peaks_before.get(device) is None or memory.peak > peaks_before[device])
    }
    step_temp = 0
    if len(fresh_peaks) < len(memories):
        step_temp = max(runner.largest_step_temp_bytes() for runner in runners)
    budget = min(
        int(memory.limit * config.gpu_memory_utilization)
        - (fresh_peaks[device] if device in fresh_peaks else memory.in_use + step_temp)
        for device, memory in memories.items()
    )
    num_blocks = budget // bytes_per_block
    if num_blocks < 2:
        raise ValueError(
            f"KV cache budget of {budget} bytes on the most loaded device holds no block of {bytes_per_block} bytes "
            f"(gpu_memory_utilization={config.gpu_memory_utilization})"
        )
    return int(num_blocks)
