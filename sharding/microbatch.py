"""Splitting one step's ragged batch into pipeline microbatches, by requests (host numpy; no jax).

A request's tokens never straddle two microbatches (its KV cache rows are written and read in one stage call).
Groups are contiguous runs of requests with balanced token counts; each is re-packed as its own padded
``StepBatch`` (token axis padded to a token bucket, request rows to that bucket's row count), so the pipeline's
stage programs are compiled per bucket exactly like the one-program step. A step's ``prev_index`` (pending tokens
under async scheduling) is sliced with its tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.config import ResolvedConfig
from jaxllm.runner.step_batch import StepBatch, token_bucket_for

TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping", "context_lens")
ROW_FIELDS = ("block_tables", "seq_lens")


@dataclasses.dataclass(frozen=True)
class Microbatch:
    batch: StepBatch  # padded to its own bucket; rows are requests first_request .. first_request+num_requests-1
    first_request: int  # row of its first request in the step


def request_groups(token_counts: np.ndarray, num_microbatches: int) -> list[range]:
    """Contiguous request ranges with about equal token totals; at most ``num_microbatches``, none empty."""
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be at least 1, got {num_microbatches}")
    num_requests = len(token_counts)
    num_groups = min(num_microbatches, num_requests)
    if num_groups <= 1:
        return [range(num_requests)]
    cumulative = np.cumsum(token_counts)  # [S]
    total = int(cumulative[-1])
    cuts = [0]
    for k in range(1, num_groups):
        cut = int(np.searchsorted(cumulative, k * total / num_groups, side="left")) + 1
        cuts.append(min(max(cut, cuts[-1] + 1), num_requests - (num_groups - k)))
    cuts.append(num_requests)
    return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _slice(batch: StepBatch, requests: range, config: ResolvedConfig) -> StepBatch:
    qsl = batch.query_start_loc
    first_token, end_token = int(qsl[requests.start]), int(qsl[requests.stop])
    num_tokens, num_requests = end_token - first_token, len(requests)
    bucket = token_bucket_for(config, num_tokens)
    rows = config.request_rows_for(bucket)
    fields = {}
    for name in TOKEN_FIELDS:
        padded = np.zeros(bucket, np.int32)  # padding tokens: id 0, position 0, null-block slot 0
        padded[:num_tokens] = getattr(batch, name)[first_token:end_token]
        fields[name] = padded
    for name in ROW_FIELDS:
        source = getattr(batch, name)
        padded = np.zeros((rows, *source.shape[1:]), np.int32)  # padding rows: seq_len 0
        padded[:num_requests] = source[requests.start : requests.stop]
        fields[name] = padded
    prev_index = None
    if batch.prev_index is not None:  # padding tokens: nothing pending
        prev_index = np.full(bucket, -1, np.int32)
        prev_index[:num_tokens] = batch.prev_index[first_token:end_token]
    query_start_loc = np.full(rows + 1, num_tokens, np.int32)
    query_start_loc[: num_requests + 1] = qsl[requests.start : requests.stop + 1] - first_token
    logits_indices = np.zeros(rows, np.int32)
    logits_indices[:num_requests] = batch.logits_indices[requests.start : requests.stop] - first_token
    return StepBatch(
        **fields,
        query_start_loc=query_start_loc,
        logits_indices=logits_indices,
        num_requests=num_requests,
        num_tokens=num_tokens,
        prev_index=prev_index,
        max_query_len=batch.max_query_len,  # a bound of the step's queries bounds each part's
    )


def split_step_batch(batch: StepBatch, num_microbatches: int, config: ResolvedConfig) -> list[Microbatch]:
    """The step's real requests in up to ``num_microbatches`` padded microbatches (one when it has <= 1 request)."""
    if batch.num_requests == 0:
        return [Microbatch(batch, 0)]
    counts = np.diff(batch.query_start_loc[: batch.num_requests + 1])  # [S real]
    groups = request_groups(counts, num_microbatches)
    if len(groups) == 1:  # the step as it is (re-slicing it would give the same batch)
        return [Microbatch(batch, 0)]
    return [Microbatch(_slice(batch, group, config), group.start) for group in groups]


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Idle share of a synchronous pipeline schedule with equal stage times: (P-1)/(M+P-1)."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)
