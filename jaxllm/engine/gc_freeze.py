"""Python's garbage collector kept off the objects that existed before an offline run, for the run's duration.

A full collection walks every object the collector tracks. Right after start-up that is everything JAX, Flax and
the engine built (modules, traced and compiled programs), and a run of many short steps allocates enough to trigger
several full walks: in the first ``generate`` of a process, J1's 272 steps on an H200 host spent 364 ms of their
2.1 s in the collector (38 ms in the next run). ``gc.freeze()`` moves the tracked objects into the permanent
generation, which collections skip, and ``gc.unfreeze()`` puts them back when the run ends, so nothing stays exempt
afterwards and garbage made during the run is still collected.

CPython 3.12 starts with a few hundred objects frozen already (375 here); they are unfrozen with ours after the first
run, which changes only what later full collections walk. Objects frozen by anyone else after jaxllm was imported
mean that freeze is not ours to undo: the run then leaves the collector as it is, as it does a disabled one.
"""

from __future__ import annotations

import contextlib
import gc

_FROZEN_AT_IMPORT = gc.get_freeze_count()


@contextlib.contextmanager
def objects_before_frozen():
    """Within the block, collections skip every object tracked when it began."""
    if gc.get_freeze_count() > _FROZEN_AT_IMPORT or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
