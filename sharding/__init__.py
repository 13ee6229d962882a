"""jaxllm's mapping of tensor and pipeline parallelism onto a ``jax.sharding.Mesh`` (axes data, pipe, tensor)."""

from sharding.data_parallel import DataParallelEngine
from sharding.distributed import initialize_distributed
from sharding.engine import ShardedEngine
from sharding.engine_runners import build_mesh_runners, engine_mesh
from sharding.mesh import make_mesh, replica_meshes, stage_meshes
from sharding.model_sharding import build_sharded_model, expand_kv_heads, shard_model
from sharding.pipeline import PipelinedModel
from sharding.rules import LOGICAL_AXIS_RULES, kv_cache_sharding, logical_to_spec, param_placement
from sharding.runner import PipelineRunner

__all__ = [
    "LOGICAL_AXIS_RULES",
    "DataParallelEngine",
    "PipelineRunner",
    "PipelinedModel",
    "ShardedEngine",
    "build_mesh_runners",
    "build_sharded_model",
    "engine_mesh",
    "expand_kv_heads",
    "initialize_distributed",
    "kv_cache_sharding",
    "logical_to_spec",
    "make_mesh",
    "param_placement",
    "replica_meshes",
    "shard_model",
    "stage_meshes",
]
