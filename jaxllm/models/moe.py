"""The sparse mixture-of-experts MLP of Mixtral, Qwen2-MoE and Qwen3-MoE.

Owns the router (a softmax over the experts' logits, each token's ``top_k`` experts, their weights optionally
renormalized) and the experts' SwiGLU as grouped matmuls over the step's (token, expert) pairs, in one of two ways
(``EXPERT_IMPLS``):

- ``pallas_gpu`` (the GPU default): ``pallas_kernels.grouped_matmul.plan_tiles`` sorts the pairs by expert and pads
  each expert's run to whole row tiles; the Pallas kernel multiplies each tile by its expert's weights, so a step
  reads each chosen expert's weights once per tile and never an unchosen one's (``reference`` /
  ``pallas_gpu_interpret``: the same plan with the pure-jnp product or the kernel interpreted, for tests). Steps of
  at most ``pair_path_max_tokens()`` tokens (decode buckets) whose pairs are no more than the experts skip the plan:
  each pair multiplies its row by its expert's weight on its own (``grouped_matmul.pair_swiglu`` / ``pair_matmul``,
  two launches and no sort), since at a few tokens the plan's device ops cost more than the products (``use_pairs``).
- ``ragged_dot`` (CPU and TPU): the pairs sorted by expert through ``jax.lax.ragged_dot``. XLA's GPU backend in
  jax 0.11.2 rewrites it into a product padded over every expert (H100, a Qwen3-30B-A3B layer's experts at 2,048
  tokens: 28.4 ms against the Pallas kernel's 1.26 ms; benchmarks/RESULTS.md), hence the kernel there.

The outputs are put back in token order and summed with the router's weights in float32. Qwen2-MoE's shared expert (a
dense SwiGLU every token runs, scaled by a sigmoid gate) is added on top, inside the same per-shard function, so
under tensor parallelism its partial sums join the experts' in the block's one all-reduce.

The expert weights are stacked ``[E, in, out]`` parameters (``ExpertLinear``); the loader fills one expert's slice
per checkpoint tensor (``...experts.{e}.gate_proj.weight``). Under tensor parallelism each device holds every
expert's share of the intermediate dimension (the ``expert_mlp`` axis, split as the dense MLP's ``mlp``), so the
router and the sort run replicated, the grouped matmuls need no communication, and the block ends in one all-reduce
of ``[T, D]`` (``per_shard`` summing over the split axis), as the dense MLP does. With expert parallelism
(``MoEConfig.expert_parallel``; ``sharding.rules`` then splits ``experts`` instead) each device holds ``E / T`` whole
experts: it runs the pairs routed to its own experts (``routed_swiglu``'s ``expert_offset``; the others take no slot,
tile or weight read) and the same one all-reduce adds the devices' outputs up.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.models import activation_sharding as act
from jaxllm.models.config import MoEConfig
from jaxllm.models.layers import Linear, SwiGLUMLP, dense_product, normal_init
from pallas_kernels import grouped_matmul as gmm

# The experts' projections as (gate, up, down) parameter names: Qwen's checkpoints say gate_proj / up_proj /
# down_proj, Mixtral's w1 / w3 / w2.
QWEN_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")

EXPERT_IMPLS = ("ragged_dot", "reference", "pallas_gpu", "pallas_gpu_interpret")
MAX_TILE_ROWS = 64  # the largest row tile plan_tiles pads experts' runs to
EXPERTS_IMPL_ENV = "JAXLLM_MOE_EXPERTS_IMPL"  # forces one of EXPERT_IMPLS (read when a step program is traced)
PAIR_PATH_MAX_TOKENS = 16  # steps of at most this many tokens (bucket size) run the per-pair products
PAIR_PATH_ENV = "JAXLLM_MOE_PAIR_PATH_MAX_TOKENS"  # overrides PAIR_PATH_MAX_TOKENS (0: always the tile plan)

EXPERT_IN = ("experts", "embed", "expert_mlp")  # [E, D, I] gate / up
EXPERT_OUT = ("experts", "expert_mlp", "embed")  # [E, I, D] down


class ExpertLinear(nnx.Module):
    """One projection of every expert: ``kernel [E, in, out]`` (expert ``e``'s slice is the transpose of its torch
    Linear weight)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, axes, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(normal_init(rngs, (num_experts, in_features, out_features), dtype), logical_axes=axes)


class Experts(nnx.Module):
    """Every expert's gate, up and down projections, as three ``ExpertLinear``s under the checkpoint's names."""

    def __init__(self, hidden_size: int, moe: MoEConfig, names: tuple[str, str, str], *, dtype, rngs: nnx.Rngs):
        experts = functools.partial(ExpertLinear, moe.num_experts, dtype=dtype, rngs=rngs)
        gate_name, up_name, down_name = names
        setattr(self, gate_name, experts(hidden_size, moe.intermediate_size, axes=EXPERT_IN))
        setattr(self, up_name, experts(hidden_size, moe.intermediate_size, axes=EXPERT_IN))
        setattr(self, down_name, experts(moe.intermediate_size, hidden_size, axes=EXPERT_OUT))


class SparseMoeBlock(nnx.Module):
    """Router ``gate`` (``[D, E]``) and ``experts`` (``ExpertLinear``s named as the checkpoint names them); with
    ``shared_expert_intermediate_size`` also Qwen2-MoE's ``shared_expert`` and ``shared_expert_gate``."""

    def __init__(self, hidden_size: int, moe: MoEConfig, *, dtype, rngs: nnx.Rngs, expert_names=QWEN_EXPERT_NAMES):
        self.num_experts, self.top_k, self.normalize_top_k = moe.num_experts, moe.top_k, moe.normalize_top_k
        self.experts_impl = None  # one of EXPERT_IMPLS; None: the platform's default
        # the router stays whole on every device (its own axis name: "experts" splits under expert parallelism)
        self.gate = Linear(hidden_size, moe.num_experts, axes=("embed", "router_experts"), dtype=dtype, rngs=rngs)
        self.expert_names = tuple(expert_names)
        self.experts = Experts(hidden_size, moe, self.expert_names, dtype=dtype, rngs=rngs)
        if moe.shared_expert_intermediate_size:
            self.shared_expert = SwiGLUMLP(hidden_size, moe.shared_expert_intermediate_size, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = Linear(hidden_size, 1, axes=("embed", "shared_gate"), dtype=dtype, rngs=rngs)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def router_logits(self, x: jax.Array) -> jax.Array:
        """``[T, E]`` in float32 at full precision (no TF32 on a GPU): a tiny product whose rounding would decide
        near-tied expert choices; 16-bit inputs multiply exactly either way."""
        kernel = self.gate.kernel.get_value()
        return jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

    def __call__(self, x: jax.Array, num_tokens: jax.Array | None = None) -> jax.Array:
        """``x [T, D]`` -> ``[T, D]``. ``num_tokens``: the step's real tokens (the rest of ``T`` is a bucket's
        padding, whose rows come out unspecified and whose experts are never read)."""
        expert_weights, expert_ids = route(self.router_logits(x), self.top_k, self.normalize_top_k)
        kernels = [getattr(self.experts, name).kernel.get_value() for name in self.expert_names]
        num_tokens = jnp.asarray(x.shape[0] if num_tokens is None else num_tokens, jnp.int32)
        args = [x, expert_ids, expert_weights, *kernels, num_tokens]
        in_axes = [act.HIDDEN, act.REPLICATED, act.REPLICATED, EXPERT_IN, EXPERT_IN, EXPERT_OUT, act.REPLICATED]
        if self.shared_expert is not None:  # summed into the experts' partial sums: one all-reduce for both
            shared = self.shared_expert
            args += [layer.kernel.get_value() for layer in (shared.gate_proj, shared.up_proj, shared.down_proj)]
            args.append(jax.nn.sigmoid(self.shared_expert_gate(x).astype(jnp.float32)))  # [T, 1]
            in_axes += [("embed", "mlp"), ("embed", "mlp"), ("mlp", "embed"), act.REPLICATED]
        expert_axis = act.mesh_axis("experts")  # the mesh axis whole experts split over (expert parallelism), or None
        (y,) = act.per_shard(
            functools.partial(
                _experts_and_shared, num_experts=self.num_experts, impl=self.experts_impl, expert_axis=expert_axis
            ),
            in_axes=in_axes,
            out_axes=(act.HIDDEN,),
            sum_over="experts" if expert_axis else "expert_mlp",  # a shared expert's "mlp" splits over the same axis
        )(*args)
        return act.constrain(y, act.HIDDEN)


def _experts_and_shared(
    x, expert_ids, expert_weights, w_gate, w_up, w_down, num_tokens, *shared, num_experts, impl, expert_axis=None
):
    """One shard's share of the block: the routed experts, plus ``shared = (gate, up, down, sigmoid gate [T, 1])``
    (Qwen2-MoE's shared expert, a SwiGLU of its own width) when given. A 1-tuple, for ``per_shard``. ``expert_axis``:
    the mesh axis the experts are split over (expert parallelism), whose index says which experts this shard holds."""
    offset = None if expert_axis is None else jax.lax.axis_index(expert_axis) * w_gate.shape[0]
    y = routed_swiglu(
        x,
        expert_ids,
        expert_weights,
        w_gate,
        w_up,
        w_down,
        num_tokens,
        num_experts=num_experts,
        impl=impl,
        expert_offset=offset,
    )
    if not shared:
        return (y,)
    gate_kernel, up_kernel, down_kernel, scale = shared
    out = dense_product(jax.nn.silu(dense_product(x, gate_kernel)) * dense_product(x, up_kernel), down_kernel)
    return ((y.astype(jnp.float32) + scale * out.astype(jnp.float32)).astype(x.dtype),)


def route(router_logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """``router_logits [T, E]`` -> float32 weights and int32 expert ids, each ``[T, top_k]``: the softmax over all
    experts (in float32), its ``top_k`` largest, renormalized to sum to 1 when ``normalize``."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def default_experts_impl(hidden: int, width: int, platform: str | None = None) -> str:
    """``$JAXLLM_MOE_EXPERTS_IMPL`` when set (one of ``EXPERT_IMPLS``; tests and A/B runs); else ``pallas_gpu`` on a
    GPU where the kernel tiles the dims (multiples of 16), ``ragged_dot`` elsewhere."""
    forced = os.environ.get(EXPERTS_IMPL_ENV)
    if forced:
        if forced not in EXPERT_IMPLS:
            raise ValueError(f"{EXPERTS_IMPL_ENV} must be one of {EXPERT_IMPLS}, got {forced!r}")
        return forced
    on_gpu = (platform or jax.default_backend()) == "gpu"
    return "pallas_gpu" if on_gpu and not hidden % gmm.MIN_DIM and not width % gmm.MIN_DIM else "ragged_dot"


def pair_path_max_tokens() -> int:
    """The largest step (in tokens, a bucket's size) whose experts run pair by pair instead of on the tile plan:
    ``$JAXLLM_MOE_PAIR_PATH_MAX_TOKENS`` when set (A/B runs; 0 turns the pair path off), else
    ``PAIR_PATH_MAX_TOKENS``."""
    value = os.environ.get(PAIR_PATH_ENV)
    if value is None:
        return PAIR_PATH_MAX_TOKENS
    if not value.isdigit():
        raise ValueError(f"{PAIR_PATH_ENV} must be a whole number of tokens (0 or more), got {value!r}")
    return int(value)


def use_pairs(bucket_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether a step of ``bucket_tokens`` runs the per-pair products: a bucket of at most
    ``pair_path_max_tokens()`` tokens whose pairs can all choose different experts (``bucket_tokens * top_k <=
    num_experts``), so reading one expert per pair reads no more than the tile plan's distinct experts could. On an
    H100 (benchmarks/RESULTS.md) Qwen3-30B-A3B's layer at batch 1 took 46.7 us against 85.5 us on the plan, and
    16 tokens about the same; Mixtral's 2 of 8 experts, whose 16 tokens' 32 pairs reread experts, 1.7x longer."""
    return bucket_tokens <= pair_path_max_tokens() and bucket_tokens * top_k <= num_experts


def tile_rows(num_pairs: int, num_experts: int) -> int:
    """The row tile for ``num_pairs`` routed rows: the next power of two above the rows an expert gets on average
    (when every chosen expert gets some), between 16 and ``MAX_TILE_ROWS``."""
    average = -(-num_pairs // min(num_experts, num_pairs))
    return min(MAX_TILE_ROWS, max(16, 1 << (average - 1).bit_length()))


def routed_swiglu(
    x,
    expert_ids,
    expert_weights,
    w_gate,
    w_up,
    w_down,
    num_tokens=None,
    *,
    num_experts: int,
    impl: str | None = None,
    pair_path: bool | None = None,
    expert_offset: jax.Array | int | None = None,
) -> jax.Array:
    """The experts' SwiGLU for every token: ``sum_k weight[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with
    ``e = expert_ids[t, k]``, as ``[T, D]`` in ``x``'s dtype. On a shard of the intermediate dimension it is that
    shard's partial sum. Each product accumulates in float32 and rounds to the weights' dtype (as ``Linear``; on the
    per-pair path the down product stays float32 up to the weighted sum). ``num_tokens`` (traced): only the first
    tokens are real; off ``ragged_dot`` the others run no expert (at batch 1 a bucket's padding tokens would otherwise
    add their own experts' weights to the step's reads). ``pair_path`` (not for ``ragged_dot``): the per-pair
    products (True) or the tile plan (False); None: ``use_pairs``. ``expert_offset`` (expert parallelism): the weights
    are experts ``[offset, offset + E_local)`` of ``num_experts``, and the result is this shard's partial sum over them:
    pairs routed elsewhere take no slot, tile or weight read and add nothing."""
    impl = impl or default_experts_impl(*w_gate.shape[1:])
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"experts impl must be one of {EXPERT_IMPLS}, got {impl!r}")
    bucket_tokens, top_k = expert_ids.shape  # the bucket's tokens; num_tokens of them are real
    flat_ids = expert_ids.reshape(-1)  # [T*k], pair p = token p // k's (p % k)-th expert
    dtype = w_gate.dtype
    num_pairs = None if num_tokens is None else num_tokens * top_k
    local_experts = w_gate.shape[0]  # num_experts, or this shard's under expert parallelism
    here = None
    if expert_offset is not None:  # another shard's pairs get the id past every local expert: no group, no tile
        local_ids = flat_ids - expert_offset
        here = (local_ids >= 0) & (local_ids < local_experts)
        flat_ids = jnp.where(here, local_ids, local_experts)
    if impl == "ragged_dot":
        out = _ragged_dot_swiglu(x.astype(dtype), flat_ids, top_k, w_gate, w_up, w_down, local_experts)
    elif pair_path or (pair_path is None and use_pairs(bucket_tokens, top_k, num_experts)):  # padding pairs: zeros
        if here is None:
            hidden = gmm.pair_swiglu(x, flat_ids, w_gate, w_up, num_pairs, top_k=top_k, impl=impl)
            out = gmm.pair_matmul(hidden, flat_ids, w_down, num_pairs, top_k=top_k, impl=impl)  # float32
        else:
            out = _local_pairs_swiglu(x, flat_ids, here, num_pairs, top_k, w_gate, w_up, w_down, impl)
    else:
        plan = gmm.plan_tiles(flat_ids, local_experts, tile_rows(flat_ids.shape[0], num_experts), num_pairs)
        rows = jnp.take(x.astype(dtype), plan.row_of_slot // top_k, axis=0)  # [P, D], each tile one expert's
        product = functools.partial(gmm.grouped_matmul, tile_groups=plan.tile_groups, block_m=plan.block_m, impl=impl)
        hidden = jax.nn.silu(product(rows, w_gate)) * product(rows, w_up)
        out = jnp.take(product(hidden, w_down), plan.slot_of_row, axis=0)  # [T*k, D] in pair order
        if num_pairs is not None:  # padding pairs read a slot that may be an unwritten row: zeros, never garbage
            out = jnp.where((jnp.arange(flat_ids.shape[0]) < num_pairs)[:, None], out, 0)
    if here is not None:  # another shard's pairs read slot 0's row back (the plan) or zeros: they add nothing here
        out = jnp.where(here[:, None], out, 0)
    out = out.reshape(bucket_tokens, top_k, -1)
    return jnp.einsum("tkd,tk->td", out.astype(jnp.float32), expert_weights).astype(x.dtype)


def _local_pairs_swiglu(x, local_ids, here, num_pairs, top_k: int, w_gate, w_up, w_down, impl: str) -> jax.Array:
    """The per-pair products of an expert-parallel shard: its own pairs (``here``, and real: before ``num_pairs``)
    moved to the front with their token rows, so the kernels' pair count stops after them and no other shard's pair
    reads a weight; float32 ``[T*k, D]`` back in pair order, zeros for the others."""
    if num_pairs is not None:
        here = here & (jnp.arange(here.shape[0]) < num_pairs)
    order = jnp.argsort(~here, stable=True)  # this shard's pairs first
    count = jnp.sum(here, dtype=jnp.int32)
    rows = jnp.take(x, order // top_k, axis=0)  # each pair's token row: one row per pair
    ids = jnp.minimum(local_ids[order], w_gate.shape[0] - 1)  # (the others, past count, are never read)
    hidden = gmm.pair_swiglu(rows, ids, w_gate, w_up, count, top_k=1, impl=impl)
    out = gmm.pair_matmul(hidden, ids, w_down, count, top_k=1, impl=impl)
    return jnp.take(out, jnp.argsort(order), axis=0)


def _ragged_dot_swiglu(x, flat_ids, top_k: int, w_gate, w_up, w_down, num_experts: int) -> jax.Array:
    """The pairs' expert outputs ``[T*k, D]`` (pair order) through ``jax.lax.ragged_dot`` over the pairs sorted by
    expert."""
    order = jnp.argsort(flat_ids, stable=True)  # pairs grouped by expert
    rows = jnp.take(x, order // top_k, axis=0)  # [T*k, D]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    dtype = w_gate.dtype
    gate = jax.lax.ragged_dot(rows, w_gate, group_sizes, preferred_element_type=dtype)
    up = jax.lax.ragged_dot(rows, w_up, group_sizes, preferred_element_type=dtype)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes, preferred_element_type=dtype)
    return jnp.take(out, jnp.argsort(order), axis=0)
