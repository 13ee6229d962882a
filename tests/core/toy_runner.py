"""A hand-computable stand-in for the model runner, for scheduler tests without a model or jax.

``ToyRunner`` keeps a fake paged KV cache: each slot remembers the token id whose K/V was "written" there. Every step
it writes each scheduled token into the slot its block table names, then reads back every position the request
attends to and checks it holds that request's token. A wrong block table, a prefix-cache hit on the wrong block, a
block shared while still written, or a preempted request not recomputed fails there. The next token is
``(token at the last position + 1) % vocab_size``, read from the fake cache, so a request's output stream is known in
advance whatever batching, chunking, caching or preemption happened.
"""

from __future__ import annotations

import dataclasses

from jaxllm.core.block_manager import NULL_BLOCK_ID
from jaxllm.core.engine_core_output import EngineCoreOutput
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.step_io import ModelRunnerOutput, SampledLogprobs, SchedulerOutput


def expected_output(prompt_token_ids: list[int], num_output_tokens: int, vocab_size: int) -> list[int]:
    """The toy model's output: counting up from the prompt's last token, modulo the vocabulary."""
    last = prompt_token_ids[-1]
    return [(last + 1 + i) % vocab_size for i in range(num_output_tokens)]


def toy_logprobs(token_id: int, num_top: int, vocab_size: int) -> SampledLogprobs:
    """Made-up logprobs: the sampled token is the most likely; the next ids follow with falling logprobs."""
    top_ids = [(token_id + j) % vocab_size for j in range(num_top)]
    top_logprobs = [-0.25 * (j + 1) - token_id / 1000.0 for j in range(num_top)]
    return SampledLogprobs(-0.25 - token_id / 1000.0, top_ids, top_logprobs)


class ToyRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv = [[None] * block_size for _ in range(num_blocks)]  # [P][L] token id held by each slot

    def _slot(self, block_ids: list[int], position: int) -> tuple[int, int]:
        block_id = block_ids[position // self.block_size]
        if block_id == NULL_BLOCK_ID:
            raise AssertionError(f"position {position} maps to the null block")
        return block_id, position % self.block_size

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        scheduled = scheduler_output.scheduled
        assert len({item.request_id for item in scheduled}) == len(scheduled), "a request scheduled twice"
        for item in scheduled:  # write every new token's K/V first ...
            request = item.request
            end = item.num_computed_tokens + item.num_scheduled_tokens
            assert item.num_scheduled_tokens > 0 and end <= request.num_tokens
            for position in range(item.num_computed_tokens, end):
                block_id, offset = self._slot(request.block_ids, position)
                self.kv[block_id][offset] = request.all_token_ids[position]
        sampled, logprobs = {}, {}
        for item in scheduled:  # ... then attend: every earlier position must still hold this request's token
            request = item.request
            end = item.num_computed_tokens + item.num_scheduled_tokens
            for position in range(end):
                block_id, offset = self._slot(request.block_ids, position)
                held = self.kv[block_id][offset]
                if held != request.all_token_ids[position]:
                    raise AssertionError(f"{request.request_id}: slot of position {position} holds {held}")
            if item.samples_token:
                block_id, offset = self._slot(request.block_ids, end - 1)
                token_id = (self.kv[block_id][offset] + 1) % self.vocab_size
                sampled[item.request_id] = token_id
                if request.sampling_params.logprobs is not None:
                    logprobs[item.request_id] = toy_logprobs(
                        token_id, request.sampling_params.logprobs, self.vocab_size
                    )
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs)


@dataclasses.dataclass
class StepRecord:
    """One step as scheduled: (request id, num_computed_tokens, num_scheduled_tokens) in batch order."""

    scheduled: list[tuple[str, int, int]]
    preempted_request_ids: list[str]
    running_before: list[str]
    outputs: list[EngineCoreOutput]


def run_to_completion(scheduler: Scheduler, runner: ToyRunner, max_steps: int = 10_000) -> list[StepRecord]:
    """Step until no request is unfinished, checking the step limits on the way; returns the step log."""
    config = scheduler.config
    steps = []
    while scheduler.has_unfinished_requests():
        assert len(steps) < max_steps, "requests did not finish"
        running_before = [r.request_id for r in scheduler.running]
        scheduler_output = scheduler.schedule()
        scheduled = [(s.request_id, s.num_computed_tokens, s.num_scheduled_tokens) for s in scheduler_output.scheduled]
        assert sum(n for _, _, n in scheduled) == scheduler_output.num_scheduled_tokens
        assert scheduler_output.num_scheduled_tokens <= config.max_num_batched_tokens
        assert len(scheduled) <= config.max_num_seqs
        outputs = scheduler.update_from_output(scheduler_output, runner.execute(scheduler_output))
        steps.append(StepRecord(scheduled, scheduler_output.preempted_request_ids, running_before, outputs))
    return steps


def reference_schedule(prompt_lens, max_tokens, budget, max_num_seqs, chunked=True):
    """The scheduling rule written plainly, for unlimited blocks: list of steps of (index, computed, scheduled)."""
    known, computed, outputs = list(prompt_lens), [0] * len(prompt_lens), [0] * len(prompt_lens)
    waiting, running, steps = list(range(len(prompt_lens))), [], []
    while waiting or running:
        left, step = budget, []
        for r in running:
            if left == 0:
                break
            step.append((r, computed[r], min(known[r] - computed[r], left)))
            left -= step[-1][2]
        while waiting and left > 0 and len(running) < max_num_seqs:
            r = waiting[0]
            if known[r] > left and not chunked:
                break
            waiting.pop(0)
            running.append(r)
            step.append((r, 0, min(known[r], left)))
            left -= step[-1][2]
        for r, start, num in step:
            computed[r] = start + num
            if computed[r] == known[r]:
                known[r] += 1
                outputs[r] += 1
        running = [r for r in running if outputs[r] < max_tokens[r]]
        steps.append(step)
    return steps
