"""DataParallelEngine's dispatch and stepping, on hand-made replicas (no model: the policy is plain Python)."""

import dataclasses
import threading

import pytest

from sharding import DataParallelEngine


@dataclasses.dataclass
class Output:
    request_id: str
    new_token_ids: list[int]
    finished: bool


class CountingReplica:
    """Each step emits one token (its step count) per request; a request finishes after ``length`` tokens."""

    def __init__(self, length: int = 2):
        self.length = length
        self.remaining: dict[str, int] = {}
        self.aborted: list[str] = []
        self.stopped: list[str] = []
        self.step_threads: set[str] = set()

    def add_request(self, request_id, prompt, params=None):
        if not prompt:
            raise ValueError(f"request {request_id!r} has an empty prompt")
        self.remaining[request_id] = self.length

    def abort_request(self, request_ids):
        self.finish_requests(request_ids, "aborted")

    def finish_requests(self, request_ids, status):
        for request_id in request_ids:
            (self.aborted if status == "aborted" else self.stopped).append(request_id)
            del self.remaining[request_id]

    def has_unfinished_requests(self):
        return bool(self.remaining)

    def get_num_unfinished_requests(self):
        return len(self.remaining)

    def step(self):
        self.step_threads.add(threading.current_thread().name)
        outputs = []
        for request_id in list(self.remaining):
            self.remaining[request_id] -= 1
            done = self.remaining[request_id] == 0
            outputs.append(Output(request_id, [self.length - self.remaining[request_id]], done))
            if done:
                del self.remaining[request_id]
        return outputs


def test_an_idle_fleet_fills_round_robin():
    engine = DataParallelEngine([CountingReplica() for _ in range(3)], threaded=False)
    picks = [engine.add_request(f"r{i}", [1]) for i in range(7)]
    assert picks == [0, 1, 2, 0, 1, 2, 0]
    assert engine.get_num_unfinished_requests() == 7


def test_new_requests_go_to_the_least_loaded_replica():
    replicas = [CountingReplica(length=1), CountingReplica(length=3)]
    engine = DataParallelEngine(replicas, threaded=False)
    for i in range(4):
        engine.add_request(f"r{i}", [1])
    engine.step()  # replica 0's requests finish after one token, replica 1's are still running
    assert [r.get_num_unfinished_requests() for r in replicas] == [0, 2]
    assert [engine.add_request(f"n{i}", [1]) for i in range(3)] == [0, 0, 1]


def test_outputs_of_every_replica_and_finished_requests_forgotten():
    engine = DataParallelEngine([CountingReplica(length=2) for _ in range(2)])
    try:
        for i in range(3):
            engine.add_request(f"r{i}", [5])
        first = engine.step()
        assert sorted((o.request_id, o.finished) for o in first) == [("r0", False), ("r1", False), ("r2", False)]
        second = engine.step()
        assert all(o.finished for o in second) and not engine.has_unfinished_requests()
        assert engine.replica_of == {}
        assert all(r.step_threads and "MainThread" not in r.step_threads for r in engine.replicas)
    finally:
        engine.close()


def test_abort_reaches_the_owning_replica_only():
    replicas = [CountingReplica(), CountingReplica()]
    engine = DataParallelEngine(replicas, threaded=False)
    for i in range(4):
        engine.add_request(f"r{i}", [1])
    engine.abort_request(["r1", "r2", "unknown"])
    assert replicas[0].aborted == ["r2"] and replicas[1].aborted == ["r1"]
    assert sorted(engine.replica_of) == ["r0", "r3"]


def test_finish_from_outside_a_step_reaches_the_owning_replica_with_its_status():
    replicas = [CountingReplica(), CountingReplica()]
    engine = DataParallelEngine(replicas, threaded=False)
    for i in range(3):
        engine.add_request(f"r{i}", [1])
    engine.finish_requests(["r1", "r2"], "stopped")  # a stop string, seen by the detokenizer after the step
    assert replicas[0].stopped == ["r2"] and replicas[1].stopped == ["r1"] and not replicas[0].aborted
    assert sorted(engine.replica_of) == ["r0"]


def test_rejected_request_changes_nothing_and_ids_are_unique():
    engine = DataParallelEngine([CountingReplica(), CountingReplica()], threaded=False)
    with pytest.raises(ValueError) as e:
        engine.add_request("bad", [])
    assert "empty prompt" in str(e.value)
    assert engine.replica_of == {} and engine.add_request("r0", [1]) == 0
    with pytest.raises(ValueError) as e:
        engine.add_request("r0", [1])
    assert "'r0'" in str(e.value)
    with pytest.raises(ValueError) as e:
        DataParallelEngine([])
    assert "at least one replica" in str(e.value)
