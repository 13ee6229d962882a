"""BlockManager: allocation, reference counts, prefix-cache hits and LRU eviction, on hand-made requests."""

import random

import pytest

from jaxllm.core.block_manager import NULL_BLOCK_ID, BlockManager
from jaxllm.request import Request
from jaxllm.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=8))


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 30_000) for _ in range(n)]


def compute_all(manager: BlockManager, request: Request) -> None:
    """Allocate for every token of the request, mark them computed and cache the full blocks."""
    blocks, num_computed = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_computed, blocks)
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_blocks(request)


def test_allocate_covers_tokens_and_free_returns_blocks():
    manager = BlockManager(num_blocks=9, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    request = make_request("a", random_tokens(random.Random(0), 10))
    assert manager.allocate_slots(request, 10)
    assert len(request.block_ids) == 3  # ceil(10 / 4)
    assert NULL_BLOCK_ID not in request.block_ids
    assert manager.num_free_blocks == 8 - 3
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 2)  # 12 tokens still fit 3 blocks
    assert len(request.block_ids) == 3
    assert manager.allocate_slots(request, 3)  # 13 tokens need a 4th
    assert len(request.block_ids) == 4
    assert manager.usage == pytest.approx(4 / 8)
    manager.free(request)
    assert request.block_ids == []
    assert manager.num_free_blocks == 8
    assert all(count == 0 for count in manager.ref_counts)


def test_allocate_fails_without_side_effects():
    manager = BlockManager(num_blocks=5, block_size=BLOCK_SIZE)
    rng = random.Random(1)
    holder = make_request("holder", random_tokens(rng, 8))
    compute_all(manager, holder)  # 2 of 4 blocks held and cached
    request = make_request("big", holder.all_token_ids + random_tokens(rng, 12))
    blocks, num_computed = manager.get_computed_blocks(request)
    assert num_computed == 8
    state = (list(manager.ref_counts), manager.free_block_ids(), dict(manager.cached_block_ids))
    assert not manager.allocate_slots(request, 12, blocks)  # needs 3 new blocks, 2 free
    assert request.block_ids == []
    assert (list(manager.ref_counts), manager.free_block_ids(), dict(manager.cached_block_ids)) == state
    assert manager.num_prefix_cache_queries == 8  # only the holder's successful admission counted


def test_prefix_hit_shares_blocks_by_reference():
    manager = BlockManager(num_blocks=17, block_size=BLOCK_SIZE)
    rng = random.Random(2)
    prefix = random_tokens(rng, 13)  # 3 full blocks + 1 token
    first = make_request("first", prefix + random_tokens(rng, 3))
    compute_all(manager, first)
    second = make_request("second", prefix + random_tokens(rng, 5))
    blocks, num_computed = manager.get_computed_blocks(second)
    assert blocks == first.block_ids[:3]
    assert num_computed == 12
    assert manager.allocate_slots(second, second.num_tokens - num_computed, blocks)
    assert second.block_ids[:3] == first.block_ids[:3]
    assert not set(second.block_ids[3:]) & set(first.block_ids)
    assert [manager.ref_counts[b] for b in first.block_ids] == [2, 2, 2, 1]
    assert manager.num_prefix_cache_queries == first.num_tokens + second.num_tokens
    assert manager.num_prefix_cache_hits == 12
    manager.free(first)
    assert [manager.ref_counts[b] for b in second.block_ids[:3]] == [1, 1, 1]


def test_hit_leaves_at_least_one_token_to_compute():
    manager = BlockManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens = random_tokens(random.Random(3), 12)  # exactly 3 blocks
    compute_all(manager, make_request("first", tokens))
    blocks, num_computed = manager.get_computed_blocks(make_request("same", tokens))
    assert num_computed == 8 and len(blocks) == 2  # (12 - 1) // 4 * 4


def test_different_prefix_misses_even_with_equal_block():
    manager = BlockManager(num_blocks=9, block_size=BLOCK_SIZE)
    rng = random.Random(4)
    shared_block = random_tokens(rng, BLOCK_SIZE)
    compute_all(manager, make_request("first", random_tokens(rng, 4) + shared_block + [7]))
    # Same second block after a different first block: the chained hash must not match.
    _, num_computed = manager.get_computed_blocks(make_request("other", random_tokens(rng, 4) + shared_block + [7]))
    assert num_computed == 0


def test_lru_eviction_order_and_hash_loss():
    manager = BlockManager(num_blocks=7, block_size=BLOCK_SIZE)  # 6 usable blocks
    rng = random.Random(5)
    requests = [make_request(f"r{i}", random_tokens(rng, 2 * BLOCK_SIZE + 1)) for i in range(2)]
    for request in requests:
        compute_all(manager, request)  # 3 blocks each: 2 full (cached) + 1 partial
    old_blocks, new_blocks = (list(r.block_ids) for r in requests)
    manager.free(requests[0])  # freed first: least recently used
    manager.free(requests[1])
    # Partial (uncached) blocks go to the head; cached ones to the tail, each request's last block first.
    free_order = manager.free_block_ids()
    assert set(free_order[:2]) == {old_blocks[2], new_blocks[2]}
    assert free_order[2:] == [old_blocks[1], old_blocks[0], new_blocks[1], new_blocks[0]]
    taker = make_request("taker", random_tokens(rng, 3 * BLOCK_SIZE))
    assert manager.allocate_slots(taker, taker.num_tokens)  # 2 uncached + the oldest cached block
    assert taker.block_ids == free_order[:3]
    assert manager.block_hashes[old_blocks[1]] is None
    assert old_blocks[1] not in manager.cached_block_ids.values()
    # r0's prefix now stops after its first block; r1's survives whole.
    _, hit_old = manager.get_computed_blocks(make_request("again0", requests[0].all_token_ids))
    blocks_new, hit_new = manager.get_computed_blocks(make_request("again1", requests[1].all_token_ids))
    assert hit_old == BLOCK_SIZE
    assert hit_new == 2 * BLOCK_SIZE and blocks_new == new_blocks[:2]


def test_hit_on_free_block_takes_it_off_the_free_queue():
    manager = BlockManager(num_blocks=5, block_size=BLOCK_SIZE)
    tokens = random_tokens(random.Random(6), 2 * BLOCK_SIZE + 2)
    first = make_request("first", tokens)
    compute_all(manager, first)
    cached = first.block_ids[:2]
    manager.free(first)
    second = make_request("second", tokens)
    blocks, _ = manager.get_computed_blocks(second)
    assert manager.allocate_slots(second, second.num_tokens - 2 * BLOCK_SIZE, blocks)
    assert second.block_ids[:2] == cached
    assert not set(cached) & set(manager.free_block_ids())
    assert manager.num_free_blocks == 4 - 3


def test_caching_disabled_never_hits():
    manager = BlockManager(num_blocks=9, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    tokens = random_tokens(random.Random(7), 10)
    compute_all(manager, make_request("first", tokens))
    assert manager.get_computed_blocks(make_request("second", tokens)) == ([], 0)
    assert manager.cached_block_ids == {}
    assert manager.num_prefix_cache_queries == 0


def test_computed_blocks_for_request_holding_blocks_is_rejected():
    manager = BlockManager(num_blocks=9, block_size=BLOCK_SIZE)
    tokens = random_tokens(random.Random(8), 10)
    compute_all(manager, make_request("first", tokens))
    second = make_request("second", tokens)
    blocks, _ = manager.get_computed_blocks(second)
    assert manager.allocate_slots(second, 1)
    with pytest.raises(ValueError) as error:
        manager.allocate_slots(second, 1, blocks)
    assert "'second'" in str(error.value) and "1 blocks" in str(error.value)


def test_reset_prefix_cache_only_when_idle():
    manager = BlockManager(num_blocks=9, block_size=BLOCK_SIZE)
    request = make_request("a", random_tokens(random.Random(9), 9))
    compute_all(manager, request)
    assert not manager.reset_prefix_cache()
    manager.free(request)
    assert manager.cached_block_ids
    assert manager.reset_prefix_cache()
    assert manager.cached_block_ids == {} and all(h is None for h in manager.block_hashes)


def test_bad_pool_size_is_rejected():
    with pytest.raises(ValueError) as error:
        BlockManager(num_blocks=1, block_size=BLOCK_SIZE)
    assert "num_blocks" in str(error.value) and "got 1" in str(error.value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_full_blocks_of_registers_what_one_call_per_request_does(seed):
    """The scheduler's per-step form (the common no-new-block case decided inline) against ``cache_full_blocks`` per
    request, over decode-like growth with computed tokens sometimes ahead of known ids (async scheduling)."""
    rng = random.Random(seed)
    managers = [BlockManager(num_blocks=200, block_size=BLOCK_SIZE) for _ in range(2)]
    prompts = [random_tokens(rng, rng.randrange(1, 14)) for _ in range(6)]
    twins = [[make_request(f"r{i}", prompt) for i, prompt in enumerate(prompts)] for _ in managers]
    for _ in range(30):
        new_tokens = [rng.randrange(1, 30_000) for _ in prompts]
        ahead = [rng.random() < 0.5 for _ in prompts]
        for manager, requests in zip(managers, twins, strict=True):
            for request, token, is_ahead in zip(requests, new_tokens, ahead, strict=True):
                request.append_output_token(token)
                computed = request.num_tokens + is_ahead  # a pending token scheduled ahead: computed, id unknown
                assert manager.allocate_slots(request, computed - request.num_computed_tokens)
                request.num_computed_tokens = computed
        for request in twins[0]:
            managers[0].cache_full_blocks(request)
        managers[1].cache_full_blocks_of(twins[1])
        assert managers[0].cached_block_ids == managers[1].cached_block_ids
        assert managers[0].block_hashes == managers[1].block_hashes
    assert len(managers[0].cached_block_ids) > 6  # blocks did fill and register
