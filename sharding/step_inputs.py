"""A (micro)batch's host-side inputs for one pipeline run, prepared before its launch.

Owns which step arrays each stage's and the head's program takes, packed into one buffer per program
(``jaxllm.runner.packed_transfer``). ``PipelinedModel.prepare`` returns the ``PreparedCall`` that its ``launch`` copies
to the devices (all of a call's buffers in one ``jax.device_put``) and runs.

Why apart from the launch: on GPUs the mesh runner launches each step from a worker thread, and a multi-GPU program's
call returns only once every GPU's host thread has launched its share, so at small batches the worker sets the step's
pace. ``PipelineRunner.dispatch`` prepares a step on the engine's thread, while the worker still launches the step
before it. The copy to the devices stays in the launch, right before the calls: a buffer copied earlier, while the
previous step's inputs were still alive, took a different address every other step, and XLA then updated the CUDA
graph of every layer that reads the step's metadata (its attention) before each launch (two-layer TP 2 traces on two
H200s: 5.7 graph updates per step against 2.0; benchmarks/RESULTS.md, session 32).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.runner.packed_transfer import Packed
from jaxllm.runner.step_batch import StepBatch


@dataclasses.dataclass(frozen=True)
class PreparedCall:
    """A (micro)batch ready to launch: its batch, each stage's packed inputs (host), the head's, and the head's result
    shapes (name -> ShapeDtypeStruct). ``prompt_logprob_width``: the last stage computes prompt logprobs of that
    top-k width (its targets are in the last stage's inputs); None: it does not."""

    batch: StepBatch
    stages: list[Packed]
    head: Packed
    head_shapes: dict
    prompt_logprob_width: int | None = None


def stage_arrays(batch: StepBatch, index: int, num_stages: int, prompt_targets: np.ndarray | None = None):
    """Stage ``index``'s step arrays (the tree its program unpacks): the attention metadata, the sampled rows, the
    pending-token index, on the first stage the token ids and on the last the prompt-logprob targets (None else)."""
    host_ids = batch.input_ids if index == 0 else None
    targets = prompt_targets if index == num_stages - 1 else None
    return batch.attention_metadata(), batch.logits_indices, batch.pending_index, host_ids, targets


def head_arrays(batch: StepBatch, head_args):
    """The head's step arrays: its arguments (the sampling metadata, key and step) and the rows' in-flight tokens."""
    return head_args, batch.in_flight_rows
