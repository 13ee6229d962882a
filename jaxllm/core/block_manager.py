"""BlockManager: the fixed pool of KV-cache blocks, who holds which block, and the prefix cache.

Owns per-block reference counts, the free queue (in eviction order) and the map from a full block's content hash to
the block that holds it. It writes ``request.block_ids`` and nothing else of a request; ``num_computed_tokens`` and
the status belong to the scheduler. ``block_ids`` only grows in place (append, extend) and is freed by binding a new
list: the runners' ``HostBlockTable`` copies each list's new ids only, and tells a freed list by its identity. Plain
Python: imports neither jax nor flax.

Prefix caching: a block full of computed tokens is keyed by ``hash((parent_hash, tuple(block_tokens)))`` where
``parent_hash`` is the key of the block before it (``None`` for the first), so a key names the whole prefix up to
the block's end. Keys use Python's ``hash`` of tuples of ints, which is the same in every process.

Free queue: allocation takes blocks from the head. A freed block that holds a cached prefix goes to the tail (least
recently used is evicted first); a freed block with no cached content goes to the head, since reusing it costs no
cache hit. Taking a cached block off the head for a new owner evicts it: its hash entry is removed.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

from jaxllm.request import Request

NULL_BLOCK_ID = 0  # reserved: never handed to a request; padding tokens write their K/V here


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is the reserved null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.cached_block_ids: dict[int, int] = {}  # prefix hash -> block holding that prefix's last block
        # Ordered set of free blocks: head = next to allocate (and evict).
        self._free_queue: collections.OrderedDict[int, None] = collections.OrderedDict(
            (block_id, None) for block_id in range(1, num_blocks)
        )
        # request id -> (request, chained hashes of its full blocks), dropped by free()
        self._request_hashes: dict[str, tuple[Request, list[int]]] = {}
        self._num_registered_blocks: dict[str, int] = {}  # request id -> leading blocks cache_full_blocks has seen
        self.num_prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache, once per admission
        self.num_prefix_cache_hits = 0  # of those, tokens found

    # ---- capacity ---------------------------------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (cached but free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of ``request``: its blocks and its length in tokens.

        The hit stops short of the last token, so at least one token is left to compute (it yields the sample).
        Takes no references; pass the blocks to ``allocate_slots``.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._ensure_hashes(request, max_hit_blocks)
        block_ids = []
        for block_hash in hashes[:max_hit_blocks]:
            block_id = self.cached_block_ids.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        # Computed tokens may run ahead of known ids (a pending token scheduled ahead): hash only known ones.
        num_known = min(request.num_computed_tokens, request.num_tokens)
        num_full = min(num_known // self.block_size, len(request.block_ids))
        first = self._num_registered_blocks.get(request.request_id, 0)
        if num_full <= first:
            return
        hashes = self._ensure_hashes(request, num_full)
        for index in range(first, num_full):
            block_id = request.block_ids[index]
            block_hash = hashes[index]
            # Another request may have computed the same prefix into its own block first: keep that one.
            if self.block_hashes[block_id] is None and block_hash not in self.cached_block_ids:
                self.block_hashes[block_id] = block_hash
                self.cached_block_ids[block_hash] = block_id
        self._num_registered_blocks[request.request_id] = num_full

    def cache_full_blocks_of(self, requests: Iterable[Request]) -> None:
        """``cache_full_blocks`` for each request, the usual case (no block filled since the last call: one step in
        ``block_size`` fills one) decided inline, since the scheduler asks for every running request every step."""
        if not self.enable_prefix_caching:
            return
        size, registered = self.block_size, self._num_registered_blocks
        for request in requests:
            num_known = min(request.num_computed_tokens, len(request.all_token_ids))
            if num_known // size > registered.get(request.request_id, 0):
                self.cache_full_blocks(request)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix. Only possible when no request holds a block; returns whether it did."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        self.cached_block_ids.clear()
        self.block_hashes = [None] * self.num_blocks
        return True

    def _ensure_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """The request's chained block hashes, computed up to ``num_blocks`` full blocks."""
        owner, hashes = self._request_hashes.get(request.request_id, (None, None))
        if owner is not request:  # first call, or a new request reusing a finished one's id
            hashes = []
            self._request_hashes[request.request_id] = (request, hashes)
        token_ids = request.all_token_ids
        size = self.block_size
        for index in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, tuple(token_ids[index * size : (index + 1) * size]))))
        return hashes

    # ---- allocation -------------------------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Grow ``request.block_ids`` to cover its computed tokens, ``computed_blocks`` and ``num_new_tokens`` more.

        ``computed_blocks`` (from ``get_computed_blocks``) is only for a request that holds no blocks yet; they are
        shared by reference. Returns False, changing nothing, when too few blocks are free.
        """
        if (
            not computed_blocks
            and request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size
        ):
            return True  # the common decode step: the last block has room
        if computed_blocks and (request.block_ids or request.num_computed_tokens):
            raise ValueError(
                f"computed_blocks given for request {request.request_id!r} that already holds "
                f"{len(request.block_ids)} blocks and {request.num_computed_tokens} computed tokens"
            )
        num_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_held = len(request.block_ids) + len(computed_blocks)
        num_needed = max(cdiv(num_tokens, self.block_size) - num_held, 0)
        num_revived = sum(1 for block_id in computed_blocks if self.ref_counts[block_id] == 0)
        if num_needed + num_revived > self.num_free_blocks:
            return False
        if not request.block_ids:
            self._record_lookup(request, len(computed_blocks))
        for block_id in computed_blocks:
            if self.ref_counts[block_id] == 0:
                del self._free_queue[block_id]
            self.ref_counts[block_id] += 1
        request.block_ids.extend(computed_blocks)
        if computed_blocks:
            self._num_registered_blocks[request.request_id] = len(computed_blocks)
        for _ in range(num_needed):
            request.block_ids.append(self._take_free_block())
        return True

    def free(self, request: Request) -> None:
        """Drop the request's references; blocks no one holds go back to the free queue."""
        # Last block first, so a request's deeper (less shared) cached blocks are evicted before its first ones.
        for block_id in reversed(request.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free_queue[block_id] = None
                if self.block_hashes[block_id] is None:
                    self._free_queue.move_to_end(block_id, last=False)
        request.block_ids = []
        self._request_hashes.pop(request.request_id, None)
        self._num_registered_blocks.pop(request.request_id, None)

    def _take_free_block(self) -> int:
        block_id, _ = self._free_queue.popitem(last=False)
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:  # evict the cached prefix this block held
            self.block_hashes[block_id] = None
            del self.cached_block_ids[block_hash]
        self.ref_counts[block_id] = 1
        return block_id

    def _record_lookup(self, request: Request, num_hit_blocks: int) -> None:
        if self.enable_prefix_caching:
            self.num_prefix_cache_queries += request.num_tokens
            self.num_prefix_cache_hits += num_hit_blocks * self.block_size

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (head first). For tests and debugging."""
        return list(self._free_queue)
