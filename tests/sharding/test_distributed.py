"""Two processes on this machine (loopback, gloo CPU collectives) run TP=4 over both and match one device's tokens:
through ``sharding.ShardedEngine`` and through the public ``LLM(..., tensor_parallel_size=4)``."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest

from sharding import initialize_distributed

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PROCESS_TIMEOUT_S = 300  # generous: compiling on a busy 2-core machine; a hang still ends here


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(address: str, process_id: int, mode: str = "engine") -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    command = [sys.executable, "-m", "tests.sharding.multihost_worker", address, "2", str(process_id), mode]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def tokens_from(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("TOKENS ")]
    assert lines, f"worker printed no tokens; its output:\n{output[-4000:]}"
    return json.loads(lines[-1].removeprefix("TOKENS "))


def run_two_processes(mode: str) -> list[str]:
    address = f"127.0.0.1:{free_loopback_port()}"
    workers = [start_worker(address, process_id, mode) for process_id in range(2)]
    try:
        outputs = [worker.communicate(timeout=PROCESS_TIMEOUT_S)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=30)
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-4000:]
        assert "2 local of 4 cpu devices" in output
    return outputs


def two_process_test(test):
    """Marks of a test that starts two worker processes on fake CPU devices."""
    test = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the two-process test uses fake CPU devices")(test)
    return pytest.mark.slow(pytest.mark.multidevice(test))


@two_process_test
def test_two_processes_match_one_device(reference):
    for output in run_two_processes("engine"):
        assert tokens_from(output) == reference.outputs


@two_process_test
def test_two_process_llm_matches_one_process_llm():
    from jaxllm import LLM
    from tests.sharding.multihost_worker import llm_options, llm_tokens

    expected = llm_tokens(LLM(**llm_options()))  # one device, this process
    for output in run_two_processes("llm"):
        assert tokens_from(output) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("localhost", 2, 0), "'host:port'"),
        (("127.0.0.1:99999", 2, 0), "1..65535"),
        (("127.0.0.1:1234", 0, 0), "num_processes must be a positive int, got 0"),
        (("127.0.0.1:1234", 2, 2), "process_id must be an int in [0, 2), got 2"),
    ],
)
def test_bad_arguments_name_the_value(args, message):
    with pytest.raises(ValueError) as e:
        initialize_distributed(*args)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("127.0.0.1:1234", "2", 0), "num_processes must be a positive int, got '2'"),
        (("127.0.0.1:1234", 2, 1.0), "process_id must be an int in [0, 2), got 1.0"),
    ],
)
def test_arguments_of_a_wrong_type_are_type_errors_naming_the_value(args, message):
    with pytest.raises(TypeError) as e:
        initialize_distributed(*args)
    assert message in str(e.value)


def test_one_process_needs_no_coordinator():
    initialize_distributed("127.0.0.1:1", 1, 0)  # returns without contacting anything
    assert jax.process_count() == 1
