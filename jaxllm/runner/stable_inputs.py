"""Step inputs read from a device buffer that keeps its address across steps (experimental; no gain measured).

Owns the ``JAXLLM_STABLE_STEP_INPUTS`` switch, the traced copy and the host-side buffers; the mesh runners' stage
programs use it (``sharding.pipeline``). A step's inputs cross to the device as one packed buffer
(``jaxllm.runner.packed_transfer``), a new device buffer every step; with async scheduling two of them alternate,
since step N+1's is made while step N still holds its own. XLA's GPU runtime re-records and updates a CUDA graph
whenever a buffer its commands use has moved, and on a tensor-parallel mesh the all-reduces cut a step into many
graphs (65 for the Llama-3.1-8B shape), most of which read the step's arrays (positions, slot mapping, block tables).
With the switch on, a program first copies the packed buffer into a buffer of its own that is donated into every call
(so it comes back at the same address) and reads the step's arrays from that copy; only the graph holding the copy
sees the moving buffer. The copy buffer is ``STAGING_SLACK`` bytes longer than the packed one: a copy into a buffer of
the same size is a full-size dynamic-update-slice, which XLA's simplifier replaces by the update itself, and then every
read went to the moving input again (the compiled program's only change was a copy at its end). An optimization
barrier keeps XLA from forwarding the reads to the input. A one-device step is one graph, which reads the moving input
(and writes moving outputs) whatever this does, so the one-device runner does not use it.

Measured (benchmarks/RESULTS.md, 2 x H100, the 8B shape at TP 2, batch 1, async scheduling): the packed input is not
what moves. With the copy working, each GPU still updated 33 of its 65 graphs every step, each layer's graph with two
moved allocations, as without the switch; with async scheduling off, no graph was updated. Kept off by default.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxllm.config import env_switch

STABLE_STEP_INPUTS_ENV = "JAXLLM_STABLE_STEP_INPUTS"
STAGING_SLACK = 16  # bytes the copy buffer has beyond the packed one, so the copy is not a full-size update


def stable_step_inputs_enabled() -> bool:
    """``JAXLLM_STABLE_STEP_INPUTS=1``; ValueError for a value other than 0 or 1."""
    return bool(env_switch(STABLE_STEP_INPUTS_ENV))


def read_through_copy(packed: jax.Array, staging: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """(traced) ``(what to unpack, the staging buffer to return)``: ``packed`` itself without a staging buffer, else
    ``staging`` with ``packed`` written over its first bytes (``unpack`` reads only those)."""
    if staging is None:
        return packed, None
    if staging.shape[0] != packed.shape[0] + STAGING_SLACK:
        raise ValueError(f"staging buffer of {staging.shape[0]} bytes for {packed.shape[0]} packed bytes")
    staging = jax.lax.optimization_barrier(jax.lax.dynamic_update_slice(staging, packed, (0,)))
    return staging, staging


class StagingBuffers:
    """One donated copy buffer per packed size (buckets pack to different sizes), on ``sharding``'s devices."""

    def __init__(self, enabled: bool, sharding=None):
        self.enabled, self.sharding = enabled, sharding
        self.buffers: dict[int, jax.Array] = {}

    def get(self, num_bytes: int) -> jax.Array | None:
        """The buffer to pass (and donate) for a packed buffer of ``num_bytes``; None when off."""
        if not self.enabled:
            return None
        if num_bytes not in self.buffers:
            self.buffers[num_bytes] = jax.device_put(np.zeros(num_bytes + STAGING_SLACK, np.uint8), self.sharding)
        return self.buffers[num_bytes]

    def keep(self, staging: jax.Array | None) -> None:
        """Keeps the program's returned buffer (the donated one's successor) for the next call of its size."""
        if staging is not None:
            self.buffers[staging.shape[0] - STAGING_SLACK] = staging
