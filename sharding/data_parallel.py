"""DataParallelEngine: D independent engine replicas on the mesh's ``data`` axis behind one request queue.

Owns dispatching requests to replicas and stepping them. Each replica is a whole engine (its own scheduler, KV
cache and weights on its own sub-mesh, see ``sharding.mesh.replica_meshes``), so replicas never communicate; this
is vLLM's data parallelism for dense models. A request goes, when it is added, to the replica with the fewest
unfinished requests (ties: the replica that was picked least recently, so an idle fleet fills round-robin), and
stays there: its KV cache lives on that replica. ``step`` steps every replica that has work, each in its own host
thread, so one replica's device time overlaps the others' (JAX releases the GIL while it waits on a device).

Replicas are any objects with the engine-core interface: ``add_request(request_id, prompt, params)``, ``step() ->
list of outputs with .request_id and .finished``, ``has_unfinished_requests()``, ``get_num_unfinished_requests()``
and ``abort_request(ids)`` (and ``finish_requests(ids, status)`` for ``finish_requests``); ``jaxllm``'s
``EngineCore`` and ``ShardedEngine`` have it. ``LLMEngine`` serves ``data_parallel_size > 1`` this way.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections.abc import Callable, Sequence

from jax.sharding import Mesh

from sharding.mesh import replica_meshes


class DataParallelEngine:
    def __init__(self, replicas: Sequence, *, threaded: bool = True):
        if not replicas:
            raise ValueError("DataParallelEngine needs at least one replica")
        self.replicas = list(replicas)
        self.replica_of: dict[str, int] = {}  # unfinished request id -> replica index
        self._last_picked = [-1] * len(self.replicas)
        self._picks = itertools.count()
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self.replicas)) if threaded else None

    @classmethod
    def build(cls, mesh: Mesh, make_replica: Callable[[Mesh, int], object], **kwargs) -> DataParallelEngine:
        """One replica per ``data`` index of ``mesh``: ``make_replica(replica_mesh, index)``."""
        return cls([make_replica(sub_mesh, index) for index, sub_mesh in enumerate(replica_meshes(mesh))], **kwargs)

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    def pick_replica(self) -> int:
        """The least-loaded replica (fewest unfinished requests), least recently picked among equals."""
        loads = [replica.get_num_unfinished_requests() for replica in self.replicas]
        return min(range(len(self.replicas)), key=lambda i: (loads[i], self._last_picked[i]))

    def add_request(self, request_id: str, prompt, params=None, *, replica: int | None = None) -> int:
        """Queues a request on ``replica`` (default: the least-loaded one); returns that replica's index. Siblings of
        one prompt (n > 1) go to one replica so they share its cached prompt blocks."""
        if request_id in self.replica_of:
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        if replica is not None and not 0 <= replica < len(self.replicas):
            raise ValueError(f"replica must be in [0, {len(self.replicas)}), got {replica!r}")
        index = self.pick_replica() if replica is None else replica
        self.replicas[index].add_request(request_id, prompt, params)  # raises before anything is recorded
        self.replica_of[request_id] = index
        self._last_picked[index] = next(self._picks)
        return index

    def abort_request(self, request_ids) -> None:
        for replica, mine in self._route(request_ids):
            replica.abort_request(mine)

    def finish_requests(self, request_ids, status) -> None:
        """Finishes requests from outside a step (a stop string); replicas need ``finish_requests(ids, status)``."""
        for replica, mine in self._route(request_ids):
            replica.finish_requests(mine, status)

    def _route(self, request_ids) -> list[tuple[object, list[str]]]:
        """(replica, its ids among ``request_ids``) for every replica holding some; they stop being tracked."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        routed = []
        for index, replica in enumerate(self.replicas):
            mine = [rid for rid in ids if self.replica_of.get(rid) == index]
            if mine:
                routed.append((replica, mine))
                for rid in mine:
                    del self.replica_of[rid]
        return routed

    def has_unfinished_requests(self) -> bool:
        return any(replica.has_unfinished_requests() for replica in self.replicas)

    def get_num_unfinished_requests(self) -> int:
        return sum(replica.get_num_unfinished_requests() for replica in self.replicas)

    def step(self) -> list:
        """One step of every replica with work; their outputs in replica order."""
        busy = [replica for replica in self.replicas if replica.has_unfinished_requests()]
        if self._pool is None or len(busy) <= 1:
            results = [replica.step() for replica in busy]
        else:
            results = list(self._pool.map(lambda replica: replica.step(), busy))
        outputs = [output for result in results for output in result]
        for output in outputs:
            if output.finished:
                self.replica_of.pop(output.request_id, None)
        return outputs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
