"""Multi-host start-up: joining JAX's multi-controller runtime before any device is touched.

Every host runs the same program on its own devices (``jax.devices()`` then lists the devices of all hosts, so the
mesh of ``sharding.make_mesh`` spans them); collectives between hosts are JAX's own (NCCL on GPU, ICI/DCN on TPU,
gloo over TCP on CPU, which is JAX's default CPU collectives implementation,
``jax_cpu_collectives_implementation="gloo"``). Nothing here sends a byte itself.

Call ``initialize_distributed`` first thing in each process, with the same coordinator address and process count
everywhere and a distinct ``process_id``; one process (``num_processes == 1``) needs no call and the call is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxllm.argument_checks import check_positive_int, number_error


def _parse_address(coordinator_address: str) -> tuple[str, int]:
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
        raise ValueError(f"coordinator_address must be 'host:port', got {coordinator_address!r}")
    host, port = coordinator_address.rsplit(":", 1)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"coordinator_address must be 'host:port' with a port in 1..65535, got {coordinator_address!r}"
        )
    return host, int(port)


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Joins this process to a ``num_processes``-process JAX job coordinated at ``coordinator_address``.

    Process 0 hosts the coordinator on that address. Raises TypeError for an argument of a wrong type, ValueError
    for an impossible value and RuntimeError (from JAX) when the other processes do not join within
    ``initialization_timeout`` seconds.
    """
    _parse_address(coordinator_address)
    check_positive_int("num_processes", num_processes)
    error = number_error(process_id, minimum=0) or (ValueError if process_id >= num_processes else None)
    if error is not None:
        raise error(f"process_id must be an int in [0, {num_processes}), got {process_id!r}")
    if num_processes == 1:
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )


def shutdown_distributed() -> None:
    """Leaves the multi-process job (a no-op when it was never joined)."""
    jax.distributed.shutdown()


def describe_processes() -> str:
    """``process 0 of 2: 2 local of 4 cpu devices``: for start-up logs."""
    return (
        f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} {jax.default_backend()} devices"
    )
