"""Scheduler: continuous batching under a token budget, with chunked prefill, prefix caching and preemption.

Owns the waiting queue, the running list and each request's ``num_computed_tokens`` and status. Asks the
``BlockManager`` for blocks; never touches the KV cache or the model. Plain Python: imports neither jax nor flax.

One scheduling rule (vLLM v1): a step gives each RUNNING request, in admission order,
``min(num_tokens - num_computed_tokens, remaining token budget)`` tokens, then admits WAITING requests (FIFO;
preempted requests go back to the front) while ``max_num_seqs`` and the budget allow. Prefill, chunked prefill,
decode and prefix-cache hits are all this rule. When a running request cannot get blocks, the most recently
admitted running request is preempted (its blocks freed, its tokens recomputed later) until it can.

Scheduling ahead (async scheduling): ``schedule`` advances ``num_computed_tokens`` at once and counts each token a
scheduled step will sample as pending (``request.num_pending_tokens``), so the next step can be scheduled while this
one runs on the device: a pending token is scheduled like a known one (its id reaches the model on the device) and
``update_from_output`` later appends it. A request sure to stop by length once its pending tokens land is not
scheduled again; one that stops on EOS or a stop token has had one more step scheduled, whose result is dropped.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

from jaxllm.core.block_manager import BlockManager
from jaxllm.core.engine_core_output import EngineCoreOutput
from jaxllm.core.scheduler_config import SchedulerConfig
from jaxllm.core.step_io import ModelRunnerOutput, SampledLogprobs, ScheduledRequest, SchedulerOutput
from jaxllm.request import Request, RequestStatus


def max_total_tokens(request: Request, max_model_len: int) -> int:
    """Prompt plus the most output tokens the request may get: ``max_tokens``, or up to ``max_model_len``."""
    if request.max_tokens is None:
        return max_model_len
    return min(request.num_prompt_tokens + request.max_tokens, max_model_len)


def check_stop(request: Request) -> RequestStatus | None:
    """Finish status after the request's newest token, or None to continue. Sets ``request.stop_reason``.

    Order: EOS (unless ignore_eos), stop token ids (both only once ``num_output_tokens >= min_tokens``), then the
    request's token limit (``max_tokens``, or ``max_model_len``: ``Request.token_limit``). A request whose grammar
    (structured outputs) saw a token outside it stops at once (its grammar then allows only EOS, which ``min_tokens``
    or ``ignore_eos`` may hold back).
    """
    params = request.sampling_params
    token_ids = request.all_token_ids
    if request.structured_output is not None and request.structured_output.failed:
        request.stop_reason = None
        return RequestStatus.FINISHED_STOPPED
    if len(token_ids) - len(request.prompt_token_ids) >= params.min_tokens:
        token_id = token_ids[-1]
        if token_id in request.eos_token_ids and not params.ignore_eos:
            request.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
    if len(token_ids) >= request.token_limit:
        return RequestStatus.FINISHED_LENGTH
    return None


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if block_manager.num_blocks != config.num_blocks or block_manager.block_size != config.block_size:
            raise ValueError(
                f"block manager ({block_manager.num_blocks} blocks of {block_manager.block_size}) does not match "
                f"config ({config.num_blocks} blocks of {config.block_size})"
            )
        self.config = config
        self.block_manager = block_manager
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order; the last one is preempted first
        self.num_preemptions = 0
        self.num_finished_requests = 0
        self.num_steps = 0

    # ---- requests in and out ----------------------------------------------------------------------------------
    def validate_request(self, request: Request) -> None:
        """Raise ValueError if the request could never run under this config. Changes nothing."""
        config = self.config
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use by an unfinished request")
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError(f"request {rid!r} has an empty prompt; it needs at least one token")
        # A prompt plus max_tokens past max_model_len is not an error (as in vLLM): the request stops there, "length".
        if num_prompt >= config.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt of {num_prompt} tokens leaves no room to generate under "
                f"max_model_len={config.max_model_len}"
            )
        # The last sampled token is never fed back, so its K/V needs no slot.
        num_blocks = self.block_manager.num_blocks_for_tokens(max_total_tokens(request, config.max_model_len) - 1)
        if num_blocks > config.num_usable_blocks:
            raise ValueError(
                f"request {rid!r} needs up to {num_blocks} KV blocks of {config.block_size} tokens but only "
                f"{config.num_usable_blocks} exist (num_blocks={config.num_blocks} includes the null block)"
            )
        if not config.enable_chunked_prefill and num_prompt > config.max_num_batched_tokens:
            raise ValueError(
                f"request {rid!r}: prompt of {num_prompt} tokens exceeds max_num_batched_tokens="
                f"{config.max_num_batched_tokens} and chunked prefill is disabled"
            )

    def add_request(self, request: Request) -> None:
        """Queue a new request at the back of the waiting queue. Raises ValueError if it can never run."""
        self.validate_request(request)
        request.token_limit = max_total_tokens(request, self.config.max_model_len)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish unfinished requests from outside a step (abort, stop string). Unknown ids are ignored.

        Returns the requests finished by this call.
        """
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status}")
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        finished = [self.requests[rid] for rid in ids if rid in self.requests]
        if not finished:
            return []
        for request in finished:
            self._finish(request, status)
        self.running = [r for r in self.running if not r.is_finished]
        self.waiting = collections.deque(r for r in self.waiting if not r.is_finished)
        return finished

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ---------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts; allocate their blocks."""
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        budget = self._schedule_running(self.config.max_num_batched_tokens, scheduled, preempted)
        if not preempted:  # admitting while preempting would only thrash
            budget = self._schedule_waiting(budget, scheduled)
        self.num_steps += 1
        return SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            preempted_request_ids=preempted,
        )

    def _schedule_running(self, budget: int, scheduled: list[ScheduledRequest], preempted: list[str]) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            if num_new <= 0 or self._stops_by_length_when_pending_lands(request):
                index += 1
                continue
            while not self.block_manager.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    return budget
            scheduled.append(self._scheduled(request, request.num_computed_tokens, num_new))
            budget -= num_new
            index += 1
        return budget

    @staticmethod
    def _stops_by_length_when_pending_lands(request: Request) -> bool:
        """True when tokens pending on the device already bring the request to its last allowed token."""
        return bool(request.num_pending_tokens) and request.num_tokens_with_pending >= request.token_limit

    @staticmethod
    def _scheduled(request: Request, start: int, num_new: int) -> ScheduledRequest:
        """Records a request's share of the step and advances its counters: computed tokens at once, and one
        pending token when the share reaches the request's end (the step samples it)."""
        samples_token = start + num_new == request.num_tokens_with_pending
        request.num_computed_tokens = start + num_new
        request.num_pending_tokens += samples_token
        return ScheduledRequest(request, start, num_new, samples_token)

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        config = self.config
        while self.waiting and budget > 0 and len(self.running) < config.max_num_seqs:
            request = self.waiting[0]
            if request.num_pending_tokens:  # preempted while a step sampling for it ran: wait for that token
                break
            computed_blocks, num_computed = self._cached_prefix(request)
            num_new = request.num_tokens - num_computed
            if num_new > budget:
                # With chunking off a prompt waits for a step with room, unless no step could ever hold it
                # (a preempted request's prompt + outputs): then it must be chunked anyway.
                if not config.enable_chunked_prefill and num_new <= config.max_num_batched_tokens:
                    break
                num_new = budget
            if not self.block_manager.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            self._admit(request, num_computed)
            scheduled.append(self._scheduled(request, num_computed, num_new))
            budget -= num_new
        return budget

    def _cached_prefix(self, request: Request) -> tuple[list[int], int]:
        """The prefix cache's hit for ``request``; none for a request that asks for prompt logprobs (as in vLLM):
        every prompt token must go through the model for its logprob."""
        if request.sampling_params.prompt_logprobs is not None:
            return [], 0
        return self.block_manager.get_computed_blocks(request)

    def _admit(self, request: Request, num_computed: int) -> None:
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_prompt_tokens = num_computed
        request.num_computed_tokens = num_computed
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.finished_time = time.monotonic()
        self.block_manager.free(request)
        del self.requests[request.request_id]
        self.num_finished_requests += 1

    # ---- results of a step ------------------------------------------------------------------------------------
    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, register newly full blocks, run stop checks and free finished requests.

        A request finished after the step was scheduled (abort, stop string, or a stop in the step before) gets
        nothing; one preempted since still gets its token (it was sampled from its real context).
        """
        outputs = []
        now = time.monotonic()
        prompt_logprobs = model_runner_output.prompt_logprobs  # by request id; usually empty
        any_finished = False
        scheduled = scheduler_output.scheduled
        running = RequestStatus.RUNNING
        self.block_manager.cache_full_blocks_of([s.request for s in scheduled if s.request.status is running])
        for item in scheduled:
            request = item.request
            request.num_pending_tokens -= item.samples_token
            if request.is_finished:
                continue
            if prompt_logprobs and request.request_id in prompt_logprobs:
                request.record_prompt_logprobs(prompt_logprobs[request.request_id])
            if item.samples_token:
                output = self._append_sample(request, model_runner_output, now)
                any_finished = any_finished or output.finish_status is not None
                outputs.append(output)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
            self.waiting = collections.deque(r for r in self.waiting if not r.is_finished)
        return outputs

    def _append_sample(self, request: Request, runner_output: ModelRunnerOutput, now: float) -> EngineCoreOutput:
        rid = request.request_id
        token_id = runner_output.sampled_token_ids.get(rid)
        if token_id is None:
            raise RuntimeError(f"model runner returned no sampled token for request {rid!r} that reached its end")
        request.append_output_token(token_id)
        if request.first_token_time is None:
            request.first_token_time = now
        logprobs = runner_output.logprobs.get(rid) if runner_output.logprobs else None
        if logprobs is not None:
            self._record_logprobs(request, token_id, logprobs)
        status = check_stop(request)
        if status is None:
            return EngineCoreOutput(rid, [token_id], None if logprobs is None else [logprobs])
        self._finish(request, status)
        return EngineCoreOutput(rid, [token_id], None if logprobs is None else [logprobs], status, request.stop_reason)

    @staticmethod
    def _record_logprobs(request: Request, token_id: int, logprobs: SampledLogprobs) -> None:
        entry = {token_id: logprobs.sampled_logprob}
        for top_id, top_logprob in zip(logprobs.top_token_ids, logprobs.top_logprobs, strict=True):
            entry.setdefault(top_id, top_logprob)
        request.output_logprobs.append(entry)
        request.cumulative_logprob += logprobs.sampled_logprob
