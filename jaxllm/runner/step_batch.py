"""Packing a SchedulerOutput into a padded, static-shape StepBatch (host numpy; one device_put per step).

All scheduled tokens of all requests are flattened onto one token axis ``[T]`` padded up to a token bucket; the
per-request arrays ``[S]`` are padded to the bucket's request rows. Padding tokens write their K/V into the reserved
null block 0 and padding rows have ``seq_len`` 0, so they never touch a real request.

With async scheduling a request's last scheduled token may still be pending: sampled by the previous step, on the
device, not yet on the host. Its ``input_ids`` entry is then 0 and ``prev_index`` names the previous step's row whose
sampled token the forward program puts there.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools

import numpy as np

from jaxllm.config import ResolvedConfig
from jaxllm.core.step_io import SchedulerOutput
from jaxllm.models.attention_metadata import ARRAY_FIELDS, AttentionMetadata
from jaxllm.runner.host_block_table import HostBlockTable


@dataclasses.dataclass
class StepBatch:
    input_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    slot_mapping: np.ndarray  # [T] int32
    context_lens: np.ndarray  # [T] int32
    block_tables: np.ndarray  # [S, M] int32
    seq_lens: np.ndarray  # [S] int32
    query_start_loc: np.ndarray  # [S+1] int32
    logits_indices: np.ndarray  # [S] int32, last scheduled token of each request
    num_requests: int  # real rows (the rest is padding)
    num_tokens: int  # real tokens
    prev_index: np.ndarray | None = None  # [T] int32: previous step's row feeding this token, -1 none (None: none)
    max_query_len: int | None = None  # 1 when every request has one query token and the config asks, else None

    @property
    def token_bucket(self) -> int:
        return int(self.input_ids.shape[0])

    def attention_metadata(self) -> AttentionMetadata:
        """The step's ``AttentionMetadata`` of host arrays; packed, its static ``max_query_len`` is part of the
        layout, so a decode-only step calls its own program."""
        return AttentionMetadata(
            **{name: getattr(self, name) for name in ARRAY_FIELDS}, max_query_len=self.max_query_len
        )

    @property
    def pending_index(self) -> np.ndarray:
        """``prev_index`` as the step programs take it: all -1 (nothing pending) when the batch has none."""
        return self.prev_index if self.prev_index is not None else np.full(self.input_ids.shape, -1, np.int32)

    @property
    def in_flight_rows(self) -> np.ndarray:
        """[S] int32: for each request row whose last scheduled token is pending, that token's ``prev_index``, else
        -1. Such a token is the request's newest output, sampled by the step in flight and not yet on the host, so
        the sampler's penalties read it from the same pending-token vector (``jaxllm.sampling.sample``)."""
        rows = np.full(self.logits_indices.shape, -1, np.int32)
        if self.prev_index is not None:
            rows[: self.num_requests] = self.prev_index[self.logits_indices[: self.num_requests]]
        return rows


def token_bucket_for(config: ResolvedConfig, num_tokens: int) -> int:
    index = bisect.bisect_left(config.token_buckets, num_tokens)
    if index == len(config.token_buckets):
        raise ValueError(f"{num_tokens} scheduled tokens exceed the largest bucket {config.token_buckets[-1]}")
    return config.token_buckets[index]


def pack_step_batch(
    scheduler_output: SchedulerOutput,
    config: ResolvedConfig,
    prev_rows: dict[str, int] | None = None,
    block_table: HostBlockTable | None = None,
) -> StepBatch:
    """``prev_rows`` (request id -> row in the previous step) locates pending tokens; None when none can be.
    ``block_table``: the runner's rows of block ids kept between steps (None: built from the requests' lists)."""
    scheduled = scheduler_output.scheduled
    num_requests, block_size = len(scheduled), config.block_size
    num_tokens = sum(s.num_scheduled_tokens for s in scheduled)
    token_bucket = token_bucket_for(config, num_tokens)
    rows = config.request_rows_for(token_bucket)

    counts = np.fromiter((s.num_scheduled_tokens for s in scheduled), np.int32, num_requests)
    starts = np.fromiter((s.num_computed_tokens for s in scheduled), np.int32, num_requests)
    query_start_loc = np.full(rows + 1, num_tokens, np.int32)
    query_start_loc[0] = 0
    np.cumsum(counts, out=query_start_loc[1 : num_requests + 1])
    seq_lens = np.zeros(rows, np.int32)
    seq_lens[:num_requests] = starts + counts

    block_tables = np.zeros((rows, config.max_blocks_per_request), np.int32)
    if block_table is not None:
        block_table.gather([s.request for s in scheduled], block_tables)
    else:
        for row, s in enumerate(scheduled):
            block_ids = s.request.block_ids
            block_tables[row, : len(block_ids)] = block_ids

    input_ids = np.zeros(token_bucket, np.int32)
    prev_index = None
    if prev_rows is None:
        input_ids[:num_tokens] = [t for s in scheduled for t in s.token_ids]
    else:
        input_ids[:num_tokens], prev_index = _ids_with_pending(scheduled, query_start_loc, token_bucket, prev_rows)
    request_of_token = np.repeat(np.arange(num_requests, dtype=np.int32), counts)  # [T real]
    positions = np.zeros(token_bucket, np.int32)
    positions[:num_tokens] = (
        np.arange(num_tokens, dtype=np.int32) - query_start_loc[request_of_token] + starts[request_of_token]
    )
    slot_mapping = np.zeros(token_bucket, np.int32)  # padding -> null block 0
    blocks = block_tables[request_of_token, positions[:num_tokens] // block_size]
    slot_mapping[:num_tokens] = blocks * block_size + positions[:num_tokens] % block_size
    context_lens = np.zeros(token_bucket, np.int32)
    context_lens[:num_tokens] = seq_lens[request_of_token]
    logits_indices = np.zeros(rows, np.int32)
    logits_indices[:num_requests] = query_start_loc[1 : num_requests + 1] - 1
    return StepBatch(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        context_lens=context_lens,
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start_loc=query_start_loc,
        logits_indices=logits_indices,
        num_requests=num_requests,
        num_tokens=num_tokens,
        prev_index=prev_index,
        max_query_len=1 if config.decode_only_programs and num_tokens == num_requests else None,
    )


@functools.cache
def _zeros(shape) -> np.ndarray:
    return np.zeros(shape, np.int32)


@functools.cache
def padding_step_batch(num_tokens: int, num_rows: int, max_blocks: int, max_query_len: int | None = None) -> StepBatch:
    """A batch of padding only (every token writes the null block, every row has seq_len 0), for compiling the step
    program of a bucket and bound. Shared: never write into its arrays."""
    return StepBatch(
        input_ids=_zeros((num_tokens,)),
        positions=_zeros((num_tokens,)),
        slot_mapping=_zeros((num_tokens,)),
        context_lens=_zeros((num_tokens,)),
        block_tables=_zeros((num_rows, max_blocks)),
        seq_lens=_zeros((num_rows,)),
        query_start_loc=_zeros((num_rows + 1,)),
        logits_indices=_zeros((num_rows,)),
        num_requests=0,
        num_tokens=0,
        max_query_len=max_query_len,
    )


def _ids_with_pending(scheduled, query_start_loc, token_bucket: int, prev_rows: dict[str, int]):
    """Flat input ids (0 where pending) and the ``prev_index`` column: a pending token is always its request's last
    scheduled token (the step reaches the end of the request) and at most one per request."""
    flat: list[int] = []
    pending_rows: list[int] = []  # request rows whose last token is pending
    sources: list[int] = []  # each one's row in the previous step
    for row, s in enumerate(scheduled):
        ids = s.token_ids
        flat.extend(ids)
        if len(ids) == s.num_scheduled_tokens:
            continue
        source = prev_rows.get(s.request_id)
        if s.num_scheduled_tokens - len(ids) != 1 or source is None:
            raise RuntimeError(
                f"request {s.request_id!r}: {s.num_scheduled_tokens - len(ids)} scheduled token(s) have no id and "
                f"the previous step {'did not' if source is None else 'did'} sample for it"
            )
        flat.append(0)
        pending_rows.append(row)
        sources.append(source)
    prev_index = np.full(token_bucket, -1, np.int32)
    prev_index[query_start_loc[np.asarray(pending_rows, np.int32) + 1] - 1] = sources
    return flat, prev_index
