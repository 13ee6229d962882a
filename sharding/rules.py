"""The one table from logical axis names to mesh axes, and the shardings derived from it.

Megatron-style tensor parallelism: the head, MLP and vocab dimensions are split over ``tensor`` (q/k/v, gate/up and
lm_head column-parallel; o_proj and down_proj row-parallel, so each block ends in one all-reduce that GSPMD inserts),
the model dimension and norms are replicated. The KV cache ``[P, L, K, H]`` is split over KV heads like k/v_proj.

Parameters are placed on their pipeline stage's sub-mesh (see ``sharding.stages``), so ``param_placement`` is both the
loader's placement callback and the pipeline's layer-to-stage map. What is validated, and why:

- ``num_heads % T`` must be 0: ``q_heads`` is the fused ``N*H`` dim of q_proj, and a split that is not head-aligned
  would cut a head in two.
- ``intermediate_size % T`` must be 0, and so must a mixture of experts' expert (and shared expert) width: the
  experts are split like the dense MLP, each device holding its share of every expert, not whole experts. With
  expert parallelism (``MoEConfig.expert_parallel``, from vLLM's ``enable_expert_parallel=True``) each device holds
  ``E / T`` whole experts instead, so ``num_experts % T`` must be 0 and the expert width need not divide (a shared
  expert is still split like the dense MLP).
- ``vocab_size % T != 0``: the vocab dim is replicated (uneven shards are not placeable); vLLM pads the vocab instead.
- KV heads: ``K % T == 0`` splits them. ``T % K == 0`` (fewer KV heads than T) replicates each KV head ``T/K`` times
  as vLLM does (see ``sharding.kv_heads``): every device then holds exactly one KV head of the cache, instead of all
  K heads when the cache is replicated; k/v_proj are placed replicated here and expanded afterwards. Any other
  combination (e.g. K=3, T=2) is a ValueError, as in vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import PIPE_AXIS, TENSOR_AXIS, axis_size, stage_meshes
from sharding.stages import stage_of_path

logger = logging.getLogger(__name__)

# Logical axis name -> mesh axis (None: replicated). Parameter names come from ``jaxllm.models.layers``.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": TENSOR_AXIS,
    "embed": None,
    "q_heads": TENSOR_AXIS,
    "kv_heads": TENSOR_AXIS,
    "mlp": TENSOR_AXIS,
    "experts": None,  # every device holds its share of every expert's intermediate dim ("expert_mlp") ...
    "expert_mlp": TENSOR_AXIS,  # ... unless expert parallel: then "experts" splits and this does not (model_rules)
    "router_experts": None,  # the router's [D, E]: every device routes every token
    "shared_gate": None,  # Qwen2-MoE's one-output shared-expert gate
    "norm": None,
    # activations and the KV cache
    "tokens": None,
    "requests": None,
    "kv_blocks": None,
    "block_slots": None,
    "head_dim": None,
}
KV_CACHE_AXES = ("kv_blocks", "block_slots", "kv_heads", "head_dim")  # [P, L, K, H]
Placement = Callable[[tuple, nnx.Variable], NamedSharding]


def activation_rules(model_config, mesh: Mesh) -> dict[str, str | None]:
    """The table for one stage's activations (installed by ``sharding.pipeline`` while tracing the stage): the
    model's rules at the mesh's tensor size. ``model_config`` is the one after any KV-head expansion, so its KV heads
    always split over ``tensor``."""
    return model_rules(model_config, axis_size(mesh, TENSOR_AXIS))


def logical_to_spec(logical_axes: Sequence[str], rules: dict[str, str | None] | None = None) -> PartitionSpec:
    """``("embed", "mlp")`` -> ``PartitionSpec(None, "tensor")`` through the rules table."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    unknown = [name for name in logical_axes if name not in rules]
    if unknown:
        raise ValueError(f"logical axis name(s) {unknown} have no rule; known: {sorted(rules)}")
    return PartitionSpec(*(rules[name] for name in logical_axes))


def kv_head_replicas(num_kv_heads: int, tensor_size: int) -> int:
    """How many copies of each KV head tensor parallelism keeps: 1 when K % T == 0, else T / K."""
    if num_kv_heads % tensor_size == 0:
        return 1
    if tensor_size % num_kv_heads == 0:
        return tensor_size // num_kv_heads
    raise ValueError(
        f"num_kv_heads={num_kv_heads} and tensor_parallel_size={tensor_size}: one must divide the other "
        "(split the KV heads, or replicate each KV head T/K times)"
    )


def model_rules(model_config, tensor_size: int) -> dict[str, str | None]:
    """The rules table adjusted for one model at one tensor size; ValueError when the model cannot be split."""
    c = model_config
    if c.num_heads % tensor_size:
        raise ValueError(
            f"num_heads={c.num_heads} is not divisible by tensor_parallel_size={tensor_size}: the q_proj output "
            f"(num_heads * head_dim = {c.num_heads * c.head_dim}) would be split inside a head"
        )
    expert_parallel = c.moe is not None and c.moe.expert_parallel
    widths = {"intermediate_size": c.intermediate_size}
    if c.moe is not None:
        if expert_parallel:
            widths["num_experts"] = c.moe.num_experts  # whole experts per device
        else:
            widths["moe_intermediate_size"] = c.moe.intermediate_size
        widths["shared_expert_intermediate_size"] = c.moe.shared_expert_intermediate_size
    for name, width in widths.items():
        if width % tensor_size:
            raise ValueError(
                f"{name}={width} is not divisible by tensor_parallel_size={tensor_size}"
                + (" (expert parallelism splits whole experts)" if name == "num_experts" else "")
            )
    rules = dict(LOGICAL_AXIS_RULES)
    if expert_parallel:
        rules["experts"], rules["expert_mlp"] = TENSOR_AXIS, None
    if kv_head_replicas(c.num_kv_heads, tensor_size) > 1:
        rules["kv_heads"] = None  # placed whole, then expanded to T heads by sharding.kv_heads.expand_kv_heads
    if c.vocab_size % tensor_size:
        logger.warning("vocab_size=%d is not divisible by tensor size %d: vocab replicated", c.vocab_size, tensor_size)
        rules["vocab"] = None
    return rules


def param_placement(mesh: Mesh, model_config) -> Placement:
    """The loader's placement callback: each parameter on its pipeline stage's sub-mesh, split by the rules.

    ``mesh`` is one replica's mesh (or a mesh whose ``data`` axis the parameters are replicated over).
    """
    tensor_size = axis_size(mesh, TENSOR_AXIS)
    rules = model_rules(model_config, tensor_size)
    meshes = stage_meshes(mesh)

    def placement(path: tuple, variable: nnx.Variable) -> NamedSharding:
        stage = stage_of_path(path, model_config.num_layers, len(meshes))
        logical_axes = getattr(variable, "logical_axes", None)
        if logical_axes is None:
            raise ValueError(f"parameter {'.'.join(map(str, path))} has no logical_axes metadata")
        spec = logical_to_spec(logical_axes, rules)
        _check_divisible(path, variable.get_value().shape, spec, tensor_size)
        return NamedSharding(meshes[stage], spec)

    return placement


def _check_divisible(path, shape, spec: PartitionSpec, tensor_size: int) -> None:
    for dim, axis in zip(shape, spec, strict=False):
        if axis is not None and dim % tensor_size:
            raise ValueError(
                f"parameter {'.'.join(map(str, path))} of shape {tuple(shape)} cannot be split {tensor_size} ways "
                f"along a dim of size {dim}"
            )


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of one ``[P, L, K, H]`` cache array: split over KV heads (K is already a multiple of T)."""
    return NamedSharding(mesh, logical_to_spec(KV_CACHE_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_single_replica(mesh: Mesh) -> None:
    if axis_size(mesh, "data") != 1:
        raise ValueError(
            f"this needs one replica's mesh (data=1), got data={axis_size(mesh, 'data')}; "
            "split it with sharding.mesh.replica_meshes"
        )


def num_stages(mesh: Mesh) -> int:
    return axis_size(mesh, PIPE_AXIS)
