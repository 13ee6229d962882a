"""Pipeline stages of a decoder model: which layers each stage owns, and one stage's forward pass.

Owns the layer-to-stage map (contiguous ranges; earlier stages take the extra layers, because the last stage also
runs the final norm, lm_head and sampling) and ``stage_forward``: embed (first stage) -> its layers -> norm and
logits at the sampled rows (last stage). With one stage this is the whole model, so tensor parallelism alone runs
through the same code. The layers themselves are ``jaxllm.models`` modules, called unchanged; this module never
edits them. The residual stream ``[T, D]`` is kept replicated over ``tensor`` between layers (Megatron: one
all-reduce after o_proj and one after down_proj): the layers name their activations' logical axes
(``jaxllm.models.activation_sharding``) and ``sharding.pipeline`` installs the rules while tracing a stage.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxllm.models.activation_sharding import HIDDEN, constrain
from jaxllm.models.attention_metadata import AttentionMetadata
from jaxllm.models.decoder import run_layers
from jaxllm.models.layers import lm_head_logits
from jaxllm.models.rope import rope_cos_sin
from jaxllm.runner.prompt_logprobs import compute_prompt_logprobs


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one (extras to the first stages)."""
    if num_stages > num_layers:
        raise ValueError(f"pipeline_parallel_size={num_stages} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def stage_of_path(path: tuple, num_layers: int, num_stages: int) -> int:
    """Stage of a parameter path: ``model.layers.i.*`` -> i's stage, embeddings -> 0, norm and lm_head -> last."""
    if len(path) > 2 and path[:2] == ("model", "layers"):
        layer = int(path[2])
        for stage, layers in enumerate(stage_layer_ranges(num_layers, num_stages)):
            if layer in layers:
                return stage
        raise ValueError(f"layer {layer} out of range for a {num_layers}-layer model")
    if path[:2] == ("model", "embed_tokens"):
        return 0
    if path[:1] == ("lm_head",) or path[:2] == ("model", "norm"):
        return num_stages - 1
    raise ValueError(f"parameter {'.'.join(map(str, path))} belongs to no pipeline stage")


class StageModule(nnx.Module):
    """The part of a ``DecoderForCausalLM`` one stage runs; shares (not copies) the model's submodules."""

    def __init__(self, model, layers: range, *, is_first: bool, is_last: bool):
        self.config = model.config
        self.layer_indices = tuple(layers)
        self.embed_tokens = model.model.embed_tokens if is_first else None
        self.layers = nnx.List([model.model.layers[i] for i in layers])
        self.norm = model.model.norm if is_last else None
        tied = model.lm_head is None
        self.lm_head = model.lm_head if is_last and not tied else None
        # A tied lm_head reads the embedding table: the last stage needs it (copied there by the pipeline).
        self.tied_embedding = model.model.embed_tokens if is_last and tied else None

    @property
    def is_first(self) -> bool:
        return self.embed_tokens is not None

    @property
    def is_last(self) -> bool:
        return self.norm is not None


def compute_logits(stage: StageModule, hidden: jax.Array) -> jax.Array:
    """``hidden [S, D]`` -> float32 logits ``[S, V]``, as ``DecoderForCausalLM.compute_logits``."""
    return lm_head_logits(stage.lm_head, stage.tied_embedding, hidden)


def stage_forward(
    stage: StageModule,
    inputs: jax.Array,
    kv_caches,
    md: AttentionMetadata,
    logits_indices,
    prompt_targets: jax.Array | None = None,
    prompt_logprob_width: int | None = None,
):
    """One stage on one (micro)batch: ``inputs`` are token ids ``[T]`` (first stage) or hidden states ``[T, D]``.

    Returns ``(out, kv_caches)``: hidden states ``[T, D]``, or on the last stage float32 logits ``[S, V]`` at
    ``logits_indices``; with ``prompt_targets`` (last stage) ``out`` is ``(logits, PromptLogprobArrays)``
    (``jaxllm.runner.prompt_logprobs``).
    """
    config = stage.config
    cos, sin = rope_cos_sin(config.rope, config.head_dim, md.positions, md.context_lens)  # [T, H] each
    x = stage.embed_tokens(inputs) if stage.is_first else inputs  # [T, D]
    x = constrain(x, HIDDEN)  # replicated over tensor, as after every layer (the rules map both names to None)
    # the layers constrain their own activations by logical name
    x, new_caches = run_layers(stage.layers, x, kv_caches, md, cos, sin, constrain_between=False)
    if not stage.is_last:
        return x, new_caches
    hidden = stage.norm(x)  # [T, D]
    logits = compute_logits(stage, hidden[logits_indices])  # [S, V]
    if prompt_targets is None:
        return logits, new_caches
    head = functools.partial(compute_logits, stage)
    return (logits, compute_prompt_logprobs(head, hidden, prompt_targets, prompt_logprob_width)), new_caches
