"""Sleep mode: vLLM's ``LLM.sleep(level)`` / ``LLM.wake_up(tags)``, which give an idle engine's device memory back
(e.g. to a trainer sharing the accelerators) and take it again, without rebuilding the engine or recompiling.

Owns what sleeping means for the engine's runners (one per data-parallel replica; ``ModelRunner`` and
``PipelineRunner`` offer the same hooks: ``param_arrays`` / ``set_param_arrays`` / ``load_params``,
``free_kv_cache`` / ``resize_kv_cache``):

- level 1: each parameter array is copied to host memory, shard by shard (each distinct shard once, so a replicated
  array costs one copy), and deleted from its devices; the KV cache is deleted. ``wake_up`` puts the shards back on
  the devices and with the same sharding they had, and allocates a fresh (zeroed) KV cache.
- level 2: nothing is kept: the parameters are deleted too, and ``wake_up`` loads them again as the engine did at
  start (``reload_models``: the checkpoint, its quantization, or the same dummy weights). vLLM leaves level 2's
  weights for the caller to load; here they come back as they were.

Deleted arrays go back to JAX's allocator in this process; with JAX's preallocated GPU pool (jaxllm's default) the
memory stays in the pool, so it serves this process's other JAX work (a trainer), not another process, unless JAX
runs with ``XLA_PYTHON_CLIENT_ALLOCATOR=platform``.

``wake_up(tags)`` wakes ``"weights"`` and ``"kv_cache"`` separately (None: both), as vLLM's tags do; the engine takes
requests again only once both are awake. The compiled programs stay: the arrays come back with their shapes,
dtypes and shardings. The engine forgets its cached prefixes when it goes to sleep (their KV is gone).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterable

import jax
import numpy as np

SLEEP_LEVELS = (1, 2)
WAKE_TAGS = ("weights", "kv_cache")


@dataclasses.dataclass(frozen=True)
class HostArray:
    """A device array's shards in host memory: each distinct shard once, with the devices that held it."""

    shape: tuple[int, ...]
    sharding: jax.sharding.Sharding
    shards: list[tuple[np.ndarray, list]]  # (the shard's data, the devices holding that slice)

    @classmethod
    def of(cls, array: jax.Array) -> HostArray:
        by_slice: dict[tuple, tuple[np.ndarray, list]] = {}
        for shard in array.addressable_shards:
            key = tuple((s.start, s.stop, s.step) for s in shard.index)
            if key not in by_slice:
                by_slice[key] = (np.asarray(shard.data), [])
            by_slice[key][1].append(shard.device)
        return cls(array.shape, array.sharding, list(by_slice.values()))

    def to_devices(self) -> jax.Array:
        buffers = [jax.device_put(data, device) for data, devices in self.shards for device in devices]
        return jax.make_array_from_single_device_arrays(self.shape, self.sharding, buffers)


class SleepMode:
    """An engine's sleep state over its ``runners``; ``reload_models()`` gives each runner's model loaded again (for
    waking from level 2), in the runners' order."""

    def __init__(self, runners: list, reload_models: Callable[[], list]):
        self._runners = runners
        self._reload_models = reload_models
        self.level: int | None = None  # the level of the current sleep; None when awake
        self._asleep: set[str] = set()  # the tags not yet woken
        self._host_params: list[list[HostArray]] | None = None  # level 1: each runner's parameters

    @property
    def is_sleeping(self) -> bool:
        """True from ``sleep`` until both the weights and the KV cache are awake."""
        return bool(self._asleep)

    def sleep(self, level: int) -> None:
        """Gives the devices' memory back (see the module docstring): whatever is awake goes to sleep. Weights asleep
        already stay as they are, except that a level-2 sleep over a level-1 one drops their host copy."""
        level = check_sleep_level(level)
        if "weights" not in self._asleep:
            if level == 1:
                self._host_params = [[HostArray.of(a) for a in runner.param_arrays()] for runner in self._runners]
            for runner in self._runners:
                for array in runner.param_arrays():
                    array.delete()
            self.level = level
        elif level == 2 and self._host_params is not None:
            self._host_params, self.level = None, 2
        if "kv_cache" not in self._asleep:
            for runner in self._runners:
                runner.free_kv_cache()
        self._asleep = set(WAKE_TAGS)

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """Takes the memory back for ``tags`` (``"weights"``, ``"kv_cache"``; None: both); a tag awake already is
        left as it is."""
        tags = _checked_tags(tags)
        if "weights" in tags and "weights" in self._asleep:
            if self._host_params is not None:
                for runner, arrays in zip(self._runners, self._host_params, strict=True):
                    runner.set_param_arrays([array.to_devices() for array in arrays])
            else:
                for runner, model in zip(self._runners, self._reload_models(), strict=True):
                    runner.load_params(model)
            self._host_params = None
            self._asleep.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self._asleep:
            for runner in self._runners:
                runner.resize_kv_cache(runner.config)
            self._asleep.discard("kv_cache")
        if not self._asleep:
            self.level = None

    def asleep_tags(self) -> list[str]:
        return [tag for tag in WAKE_TAGS if tag in self._asleep]


def check_sleep_level(level) -> int:
    """``level`` as an int when it is 1 or 2 (an integer, not a bool), else a ``ValueError`` naming it."""
    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or int(level) not in SLEEP_LEVELS:
        raise ValueError(f"sleep level must be 1 (weights to host memory) or 2 (weights discarded), got {level!r}")
    return int(level)


def _checked_tags(tags) -> set[str]:
    if tags is None:
        return set(WAKE_TAGS)
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise ValueError(f"wake_up tags must be a list of {list(WAKE_TAGS)} or None, got {tags!r}")
    tags = list(tags)
    unknown = [tag for tag in tags if tag not in WAKE_TAGS]
    if unknown or not tags:
        raise ValueError(f"wake_up tags must be a non-empty list of {list(WAKE_TAGS)} or None, got {tags!r}")
    return set(tags)
