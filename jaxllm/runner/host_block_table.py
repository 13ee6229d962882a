"""HostBlockTable: each running request's block ids kept as a numpy row from step to step.

A step's ``block_tables [S, M]`` used to be built from the requests' Python lists every step: one list-to-array
conversion per request, tens of block ids each, which was most of ``pack_step_batch``'s host time at 256 sequences.
A request's block list only grows between steps (a block every ``block_size`` tokens), so this table keeps a row per
request and copies only the ids added since its last step; the step's table is then one gather of the requests' rows.

It relies on ``BlockManager``'s rule: ``request.block_ids`` grows in place and only in place, and is freed by binding a
new list (preemption, finish). A row remembers which list object it copied, so a freed-and-reallocated request, or a
new request reusing an id, starts its row again. Rows of requests that are gone are reclaimed when the table fills.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxllm.request import Request


class _Row:
    __slots__ = ("index", "block_ids", "num_copied")

    def __init__(self, index: int, block_ids: list[int]) -> None:
        self.index = index
        self.block_ids = block_ids  # the list object this row mirrors
        self.num_copied = 0


class HostBlockTable:
    def __init__(self, max_blocks_per_request: int, num_rows: int) -> None:
        if num_rows < 1:
            raise ValueError(f"num_rows must be at least 1, got {num_rows}")
        self._table = np.zeros((num_rows, max_blocks_per_request), np.int32)
        self._rows: dict[str, _Row] = {}  # by request id
        self._free: list[int] = list(range(num_rows - 1, -1, -1))

    def gather(self, requests: Sequence[Request], out: np.ndarray) -> None:
        """Writes each request's block ids into ``out``'s row of the same index (``out [>= len(requests), M]``,
        zero beyond each request's blocks; rows past the requests are left as they are)."""
        indices = [self._row_for(request, requests).index for request in requests]
        out[: len(indices)] = self._table[indices]

    def _row_for(self, request: Request, step_requests: Sequence[Request]) -> _Row:
        block_ids = request.block_ids
        row = self._rows.get(request.request_id)
        if row is None or row.block_ids is not block_ids:
            row = self._start_row(request, step_requests)
        num_blocks = len(block_ids)
        if num_blocks != row.num_copied:
            self._table[row.index, row.num_copied : num_blocks] = block_ids[row.num_copied :]
            row.num_copied = num_blocks
        return row

    def _start_row(self, request: Request, step_requests: Sequence[Request]) -> _Row:
        old = self._rows.pop(request.request_id, None)
        if old is not None:
            self._free.append(old.index)
        if not self._free:
            self._reclaim(step_requests)
        row = _Row(self._free.pop(), request.block_ids)
        self._table[row.index] = 0
        self._rows[request.request_id] = row
        return row

    def _reclaim(self, step_requests: Sequence[Request]) -> None:
        """Frees the rows of requests outside this step (finished, preempted or waiting ones start again later)."""
        keep = {request.request_id for request in step_requests}
        for request_id in [rid for rid in self._rows if rid not in keep]:
            self._free.append(self._rows.pop(request_id).index)
        if not self._free:
            raise RuntimeError(f"a step of {len(step_requests)} requests needs more than {len(self._table)} rows")
