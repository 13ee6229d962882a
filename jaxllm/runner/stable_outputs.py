"""Step results written into donated buffers no intermediate value shares (on by default on meshes).

Owns the ``JAXLLM_STABLE_STEP_OUTPUTS`` switch (``=0`` turns it off), the traced write and the pool of result buffers;
the mesh runners' last stage and head use them (``sharding.pipeline``). XLA's buffer assignment puts intermediate values
whose lives end before a result is computed into that result's allocation: in jaxllm's compiled stage program (CPU) the
padded sampled ids' allocation also holds the sampler's intermediates and layers' RMSNorm values. A result allocation is
new in every call, and with async scheduling step N+1's results are allocated while step N's are still held, so they
alternate between addresses. XLA's GPU runtime updates a CUDA graph whenever an allocation its commands use has moved,
so each graph holding such an intermediate was updated every step: on 2 x H100 (benchmarks/RESULTS.md) the 8B shape's
tensor-parallel-2 step updated 33 of each GPU's 65 graphs every step, and none with this switch on, which took J8's
engine at TP 2 from 10,120 to 13,288 output tok/s and its batch-1 step from 8.18 to 4.89 ms (one lease).

The mesh head's program (the sampler after the last stage) takes one donated buffer per non-empty result, and the last
stage's program one for its logits (released once the head's call that reads it is dispatched), each ``ROW_SLACK`` rows
longer, and writes the result into its first rows (a dynamic-update-slice; XLA's simplifier folds a full-size one into
the result itself). The buffer's value is live from the program's start to that write, so no intermediate can share its
allocation. The returned results are the buffers (rows past the result's are stale). A buffer goes back to the pool once
the runner has read its values (``release``); the next call of the same shapes takes and donates it, so in steady state
two sets per shape (and pipeline microbatch) alternate. The one-device ``ModelRunner`` does not use this (its forward
and sampler graphs are updated every step too, ~0.09 ms in all at batch 1 on an H100).

``JAXLLM_STABLE_STAGE_OUTPUTS=1`` (experimental, off, not yet run on a GPU) does the same for the hidden states every
other pipeline stage hands on: in the CPU buffer assignment of a two-stage tiny Llama, stage 0's output allocation
also holds the layer loop's values, and with two microbatches in flight two such outputs are live at once. A stage's
set goes back to its pool once the next stage's call that reads it has been dispatched.
"""

from __future__ import annotations

import math
import threading

import jax
import numpy as np

from jaxllm.config import env_switch

STABLE_STEP_OUTPUTS_ENV = "JAXLLM_STABLE_STEP_OUTPUTS"
STABLE_STAGE_OUTPUTS_ENV = "JAXLLM_STABLE_STAGE_OUTPUTS"
ROW_SLACK = 1  # rows each result buffer has beyond its result, so the write is not a full-size update


def stable_step_outputs_enabled() -> bool:
    """On unless ``JAXLLM_STABLE_STEP_OUTPUTS=0``; ValueError for a value other than 0 or 1."""
    return env_switch(STABLE_STEP_OUTPUTS_ENV) is not False


def stable_stage_outputs_enabled() -> bool:
    """``JAXLLM_STABLE_STAGE_OUTPUTS=1`` (experimental, off); ValueError for a value other than 0 or 1."""
    return bool(env_switch(STABLE_STAGE_OUTPUTS_ENV))


def write_into(buffers: dict | None, results: dict) -> dict:
    """(traced) ``results`` with each one that has a buffer written into that buffer's first rows."""
    if buffers is None:
        return results
    written = dict(results)
    for key, buffer in buffers.items():
        value = results[key]
        if buffer.shape != (value.shape[0] + ROW_SLACK, *value.shape[1:]) or buffer.dtype != value.dtype:
            have, need = f"{buffer.dtype}{list(buffer.shape)}", f"{value.dtype}{list(value.shape)}"
            raise ValueError(f"result buffer {key!r} of {have} for a result of {need}")
        written[key] = jax.lax.dynamic_update_slice(buffer, value, (0,) * value.ndim)
    return written


def _key(shapes: dict) -> tuple:
    """A set's pool key: each non-empty entry's name, shape and dtype (``shapes``: ShapeDtypeStructs or arrays). Runs
    on the launch path twice a call: the dtype object itself, not its ``.name`` (which numpy computes in Python)."""
    return tuple(sorted((name, tuple(s.shape), np.dtype(s.dtype)) for name, s in shapes.items()))


class ResultBuffers:
    """Free result buffers by shapes, on ``sharding``'s devices; a set is taken for one call and released after.
    ``take`` and ``release`` may run on different threads (the mesh runner's launch thread takes, its caller
    releases)."""

    def __init__(self, enabled: bool, sharding=None):
        self.enabled, self.sharding = enabled, sharding
        self.free: dict[tuple, list[dict]] = {}
        self.num_allocated = 0  # buffer sets made (not reused)
        self._shapes_by_result: dict[tuple, tuple[tuple, dict]] = {}  # result shapes' key -> (pool key, shapes)
        self._lock = threading.Lock()

    def buffer_rows(self, rows: int) -> int:
        """The rows a reader of a ``rows``-row result gets: its buffer's, ``ROW_SLACK`` more, when the pool is on."""
        return rows + ROW_SLACK if self.enabled else rows

    def take(self, result_shapes: dict, read_by_call=()) -> dict | None:
        """Buffers for results of ``result_shapes`` (name -> ShapeDtypeStruct), a released set where there is one
        that holds none of ``read_by_call`` (arrays the same call reads, such as the previous step's token ids fed
        as its pending tokens: a call cannot both read and donate a buffer); empty results get none. None when off."""
        if not self.enabled:
            return None
        key, shapes = self._buffer_shapes(result_shapes)
        with self._lock:
            free = self.free.get(key, [])
            for index, buffers in enumerate(free):
                if not any(b is a for b in buffers.values() for a in read_by_call):
                    return free.pop(index)
            self.num_allocated += 1
        return {name: jax.device_put(np.zeros(s.shape, s.dtype), self.sharding) for name, s in shapes.items()}

    def _buffer_shapes(self, result_shapes: dict) -> tuple[tuple, dict]:
        """The pool key and buffer shapes (``ROW_SLACK`` rows more; empty results none) for ``result_shapes``,
        worked out once per distinct set of result shapes."""
        result_key = _key(result_shapes)
        if result_key not in self._shapes_by_result:
            shapes = {
                name: jax.ShapeDtypeStruct((self.buffer_rows(s.shape[0]), *s.shape[1:]), s.dtype)
                for name, s in result_shapes.items()
                if math.prod(s.shape) > 0
            }
            self._shapes_by_result[result_key] = _key(shapes), shapes
        return self._shapes_by_result[result_key]

    def release(self, results: dict) -> None:
        """Returns the buffers behind a call's ``results`` (once their values have been read) for later calls."""
        if not self.enabled:
            return
        buffers = {name: value for name, value in results.items() if value.size > 0}
        with self._lock:
            free = self.free.setdefault(_key(buffers), [])
            if not any(any(a is b for a, b in zip(f.values(), buffers.values(), strict=True)) for f in free):
                free.append(buffers)  # (a set released twice is kept once: it must not be donated to two calls)
