"""Pending tokens on a mesh: which results of the step in flight feed each microbatch of the next step.

With async scheduling (``jaxllm.engine.engine_core``) a step is dispatched before the one in flight has finished, and
a request's last token may still be pending: sampled by that step, on the device (``StepBatch.prev_index``). The
in-flight step ran as one or more microbatches, each with a ``token_ids`` result of R rows
(``PipelinedModel.pending_rows``); ``PipelineRunner`` numbers their rows flat, microbatch j's row r as j * R + r.

A microbatch whose pending tokens all come from one result reads that result alone. On a pipeline that is what lets
the stages overlap across steps: the next step's microbatch 0 needs only the previous step's microbatch 0, which
leaves the last stage while its microbatch 1 is still there. A decode-only step keeps its requests in order, and so in
the same microbatches, step after step. When the cuts between microbatches move (requests finish or join), a
microbatch may need tokens of several results; ``merge_pending``, a small program on the last stage's devices,
gathers them into one array of R rows first (compiled per number of results read, at the engine's warm-up).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PendingFeed:
    """Where one microbatch's pending tokens come from."""

    sources: tuple[int, ...]  # the in-flight step's microbatches read (empty: nothing pending)
    prev_index: np.ndarray | None  # [T] row of the fed array per token, -1 none (None when nothing is pending)
    merge_index: np.ndarray | None  # [R] flat rows to gather when several results feed it, else None


def plan_feed(flat_prev_index: np.ndarray | None, rows_per_result: int) -> PendingFeed:
    """The feed of a microbatch whose ``prev_index`` holds flat rows (j * R + r) of the in-flight step's results."""
    if flat_prev_index is None:
        return PendingFeed((), None, None)
    pending = flat_prev_index >= 0
    flat = flat_prev_index[pending]
    sources = tuple(sorted(set((flat // rows_per_result).tolist())))
    if not sources:
        return PendingFeed((), None, None)
    if len(sources) == 1:
        local = np.where(pending, flat_prev_index - sources[0] * rows_per_result, -1).astype(np.int32)
        return PendingFeed(sources, local, None)
    if flat.size > rows_per_result:
        raise ValueError(f"{flat.size} pending tokens in one microbatch exceed the {rows_per_result} rows of a result")
    merge_index = np.zeros(rows_per_result, np.int32)
    merge_index[: flat.size] = flat
    local = np.full(flat_prev_index.shape, -1, np.int32)
    local[pending] = np.arange(flat.size, dtype=np.int32)
    return PendingFeed(sources, local, merge_index)


@jax.jit
def merge_pending(token_ids: tuple, merge_index: jax.Array) -> jax.Array:
    """The rows ``merge_index`` (flat over the results, in order) of the results' ``token_ids``."""
    return jnp.concatenate(token_ids)[merge_index]


def warm_up_merges(num_microbatches: int, rows_per_result: int, sharding) -> None:
    """Compiles ``merge_pending`` for every number of results a step of up to ``num_microbatches`` can merge, on the
    last stage's devices (``sharding``), so no merge compiles while requests are being served."""
    zeros = jax.device_put(np.zeros(rows_per_result, np.int32), sharding)
    for num_results in range(2, num_microbatches + 1):
        jax.block_until_ready(merge_pending((zeros,) * num_results, np.zeros(rows_per_result, np.int32)))


def fed_tokens(feed: PendingFeed, results: list[dict] | None) -> jax.Array | None:
    """The array a microbatch's pending tokens are read from: one result's ``token_ids``, or several merged; None when
    nothing is pending."""
    if not feed.sources:
        return None
    if feed.merge_index is None:
        return results[feed.sources[0]]["token_ids"]
    return merge_pending(tuple(r["token_ids"] for r in results), feed.merge_index)
