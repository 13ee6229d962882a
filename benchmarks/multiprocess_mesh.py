"""Tensor parallelism with one process per device on one host (JAX's multi-controller runtime), to set beside
``mesh_scaling.py``, where one process drives every device.

    PYTHONPATH=. python3 benchmarks/multiprocess_mesh.py --num-processes 4 --job J8        # GPU machine: a GPU each
    PYTHONPATH=. python3 benchmarks/multiprocess_mesh.py --num-processes 2 --smoke         # CPU: a fake device each

Starts ``--num-processes`` copies of itself on this host. Each joins one JAX job (``sharding.initialize_distributed``
with a loopback coordinator) seeing one device of its own (GPU ``rank`` through ``local_device_ids``; on CPU one
device per process), builds the ``LLM(tensor_parallel_size=N, load_format="dummy")`` that ``mesh_scaling.py`` builds
for the mesh ``Nx1x1`` and runs the same job and batch-1 decode (``mesh_scaling.run_mesh``): every process runs the
same program on the same prompts. Process 0's row is printed (the ``mesh_scaling.py`` table) and recorded.

Why: a trace of a TP 4 batch-1 step with one process showed ~7 ms per step spent launching the program on four GPUs
from four host threads at once (benchmarks/RESULTS.md); here each process launches on its own GPU only. All other
arguments are ``mesh_scaling.py``'s (``--meshes`` is set from ``--num-processes``)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 1800


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-processes", type=int, default=2, help="processes, one device each (the TP size)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # this process's rank (set by the parent)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.num_processes < 1:
        p.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if "--meshes" in rest:
        p.error("--meshes is set from --num-processes")
    return args, rest


def child_main(args: argparse.Namespace, rest: list[str]) -> None:
    """One process of the job: join, build the engine over every process's device, run, print process 0's row."""
    from sharding.distributed import initialize_distributed, shutdown_distributed

    smoke = "--smoke" in rest
    initialize_distributed(
        args.coordinator,
        args.num_processes,
        args.child,
        local_device_ids=None if smoke else [args.child],
        initialization_timeout=300,
    )
    from benchmarks import mesh_scaling  # imports jax's users only after joining
    from benchmarks.common import environment, random_prompts

    settings = mesh_scaling.parse_args([*rest, "--meshes", f"{args.num_processes}x1x1"])
    vocab_size = json.loads((pathlib.Path(settings.model) / "config.json").read_text())["vocab_size"]
    prompts = random_prompts(settings.num_prompts, settings.input_len, vocab_size)
    row = mesh_scaling.run_mesh(settings, settings.model, (args.num_processes, 1, 1), prompts)
    if args.child == 0:
        print("ROW " + json.dumps(dict(row, environment=environment()), sort_keys=True), flush=True)
    shutdown_distributed()


def start_children(args: argparse.Namespace, rest: list[str]) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{free_loopback_port()}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if "--smoke" in rest:  # one fake CPU device per process
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    children = []
    for rank in range(args.num_processes):
        command = [sys.executable, __file__, "--num-processes", str(args.num_processes), "--child", str(rank)]
        command += ["--coordinator", coordinator, *rest]
        children.append(
            subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return children


def main(argv=None) -> dict:
    args, rest = parse_args(argv)
    if args.child is not None:
        child_main(args, rest)
        return {}
    with tempfile.TemporaryDirectory() as smoke_dir:
        if "--smoke" in rest and "--model" not in rest:  # the smoke shape's config.json, for every child
            from benchmarks.mesh_scaling import SMOKE_HF_CONFIG

            (pathlib.Path(smoke_dir) / "config.json").write_text(json.dumps(SMOKE_HF_CONFIG))
            rest = [*rest, "--model", smoke_dir]
        children = start_children(args, rest)
        try:
            outputs = [child.communicate(timeout=CHILD_TIMEOUT_S)[0] for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait(timeout=30)
    for rank, (child, output) in enumerate(zip(children, outputs, strict=True)):
        if child.returncode != 0:
            raise RuntimeError(f"process {rank} exited with {child.returncode}; its output ends:\n{output[-4000:]}")
    rows = [json.loads(line[4:]) for line in outputs[0].splitlines() if line.startswith("ROW ")]
    if len(rows) != 1:
        raise RuntimeError(f"process 0 printed {len(rows)} result rows; its output ends:\n{outputs[0][-4000:]}")
    return report(rows[0], args.num_processes, rest)


def report(row: dict, num_processes: int, rest: list[str]) -> dict:
    from benchmarks import mesh_scaling  # the table only: this process never touches a device
    from benchmarks.common import print_record

    environment = row.pop("environment")
    row = dict(row, mesh=f"{row['mesh']} ({num_processes} processes)")
    mesh_scaling.add_efficiency([row])
    mesh_scaling.print_table([row])
    record = {
        "benchmark": "multiprocess_mesh",
        **environment,
        "num_processes": num_processes,
        "arguments": rest,
        "rows": [row],
    }
    print_record(record)
    return record


if __name__ == "__main__":
    main()
