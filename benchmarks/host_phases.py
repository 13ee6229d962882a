"""Where a one-device engine's host time per step goes, phase by phase, and what Python's garbage collector takes.

    PYTHONPATH=. python3 benchmarks/host_phases.py --job J1 --reps 3     # on the GPU machine
    python benchmarks/host_phases.py --smoke                             # tiny CPU run (used by the tests)

Builds the job's engine (dummy weights), runs 4 prompts untimed, then ``--reps`` runs of the job through
``LLM.generate``, each with fresh prompts (so no run hits the prefix cache of another). Timers wrap the step's phases
for the runs only: the scheduler's ``schedule`` and ``update_from_output``, the runner's ``dispatch`` (of which
``pack_step_batch``, the sampling metadata's ``build``, ``Packed.of``) and ``collect``, the two jitted calls (forward,
sampler) and the output processor. Prints one JSON record per run: output tok/s, ``step_times``' split into host work
and device wait, the collector's time by generation (``gc.callbacks``) and each phase's mean milliseconds per step.
With the launch thread (``JAXLLM_LAUNCH_THREAD``, on by default on GPUs) the two calls run on the worker, beside the
engine's thread. ``--no-gc-freeze`` runs without the offline run's GC freeze (``jaxllm.engine.gc_freeze``), for an
A/B. A timer costs about a microsecond a call, a few per request row are not timed: compare runs of this script with
each other, not with ``throughput.py``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import time
from unittest import mock

from benchmarks.common import JOBS, SMOKE_CONFIG, CallTimers, environment, random_prompts
from jaxllm import LLM, SamplingParams
from jaxllm.core.scheduler import Scheduler
from jaxllm.entrypoints import llm as llm_module
from jaxllm.output_processor import OutputProcessor
from jaxllm.runner import model_runner
from jaxllm.runner.packed_transfer import Packed
from jaxllm.runner.xla_options import ProgramsByOptions


class CollectorTimes:
    """Milliseconds Python's garbage collector spent, by generation, while installed."""

    def __init__(self):
        self.ms: collections.Counter = collections.Counter()
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms[f"gen{info['generation']}"] += 1e3 * (time.perf_counter() - self._start)

    @contextlib.contextmanager
    def installed(self):
        gc.callbacks.append(self)
        try:
            yield
        finally:
            gc.callbacks.remove(self)


def phase_timers(runner) -> CallTimers:
    """Timers around the step's phases (install them once the engine is built: its warm-up stays untimed)."""
    return CallTimers(
        [
            (Scheduler, "schedule", "schedule"),
            (Scheduler, "update_from_output", "update_from_output"),
            (model_runner.ModelRunner, "dispatch", "dispatch"),
            (model_runner.ModelRunner, "collect", "collect"),
            (model_runner, "pack_step_batch", "pack_step_batch"),
            (OutputProcessor, "process_outputs", "process_outputs"),
            (runner, "_jitted_sample", "sample call"),
            (runner._sampling_builder, "build", "sampling build"),
            (Packed, "of", "Packed.of"),
        ]
    )


@contextlib.contextmanager
def forward_calls_timed(timers: CallTimers):
    """Each bucket's forward program, as the runner fetches it per step, wrapped in ``timers``."""
    for_tokens = ProgramsByOptions.for_tokens
    with mock.patch.object(
        ProgramsByOptions, "for_tokens", lambda self, n: timers.wrap("forward call", for_tokens(self, n))
    ):
        yield


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), default="J1")
    p.add_argument("--model", help="a directory with config.json (default: the job's)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-gc-freeze", action="store_true", help="runs without the offline run's GC freeze")
    p.add_argument("--smoke", action="store_true", help="tiny model and job, for a CPU check")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    job = JOBS[args.job]
    num_prompts, input_len, output_len = (8, 24, 8) if args.smoke else (job.num_prompts, job.input_len, job.output_len)
    options = dict(load_format="dummy", skip_tokenizer_init=True, max_num_seqs=256, max_num_batched_tokens=8192)
    if args.smoke:
        options.update(model=SMOKE_CONFIG, dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    else:
        options.update(model=args.model or job.model_config, dtype=args.dtype, max_model_len=2048)
        options.update(gpu_memory_utilization=args.gpu_memory_utilization)
    llm = LLM(**options)
    vocab_size = llm.llm_engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(random_prompts(4, input_len, vocab_size), params, use_tqdm=False)
    records = []
    timers = phase_timers(llm.llm_engine.runner)
    for rep in range(args.reps):
        prompts = random_prompts(num_prompts, input_len, vocab_size, seed=rep + 1)
        collector = CollectorTimes()
        llm.llm_engine.step_times.reset()
        with contextlib.ExitStack() as stack:
            stack.enter_context(timers.install())
            stack.enter_context(forward_calls_timed(timers))
            if args.no_gc_freeze:
                stack.enter_context(mock.patch.object(llm_module, "objects_before_frozen", contextlib.nullcontext))
            stack.enter_context(collector.installed())
            stack.enter_context(timers.recording())
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
        times = llm.llm_engine.step_times.summary()
        steps = max(times["num_steps"], 1)
        record = {
            "job": "smoke" if args.smoke else job.name,
            **environment(),
            "rep": rep,
            "gc_freeze": not args.no_gc_freeze,
            "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed,
            "step_times": times,
            "gc_ms": dict(sorted(collector.ms.items())),
            "phases_ms_per_step": {part: t["total_ms"] / steps for part, t in timers.summary().items()},
        }
        print(json.dumps(record))
        records.append(record)
    return records


if __name__ == "__main__":
    main()
