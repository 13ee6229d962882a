"""SchedulerConfig: the limits the scheduler and the block manager work under.

Owns validation of these limits (every bad value raises ``ValueError``/``TypeError`` naming the field and the
value). Plain Python: imports neither jax nor flax. Derived values are read-only properties, never stored.
"""

from __future__ import annotations

import dataclasses


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SchedulerConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"SchedulerConfig.{name} must be at least {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine.

    ``num_blocks`` counts every KV block including block 0, a reserved null block that is never handed to a
    request (padding tokens write there), so requests share ``num_blocks - 1`` blocks.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    num_blocks: int
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("num_blocks", self.num_blocks, minimum=2)
        for name in ("enable_chunked_prefill", "enable_prefix_caching"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"SchedulerConfig.{name} must be a bool, got {value!r} ({type(value).__name__})")

    @property
    def num_usable_blocks(self) -> int:
        """Blocks a request can hold: all but the null block 0."""
        return self.num_blocks - 1

    @property
    def max_num_blocks_per_request(self) -> int:
        """Width of a block table: blocks covering ``max_model_len`` tokens."""
        return -(-self.max_model_len // self.block_size)
