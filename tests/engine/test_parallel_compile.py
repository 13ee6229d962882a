"""``JAXLLM_COMPILE_THREADS``: the warm-up compiles every step program on worker threads before it runs any.

With N > 1 threads, running each bucket's padding step lowers nothing (every program it calls was lowered and
compiled beforehand; with one thread, the control, the same steps lower their programs as they first run them), and
the engine's greedy tokens equal a one-thread engine's, on one device and on a tensor x pipeline mesh of fake CPU
devices. The setting is checked like every other (a ValueError naming it).
"""

import pathlib

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine import setup
from jaxllm.runner import parallel_compile
from jaxllm.runner.model_runner import ModelRunner
from sharding.runner import PipelineRunner
from tests.sharding.helpers import NEEDS_8_DEVICES

MODEL = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models" / "llama"
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # JAX records one per program it lowers


@pytest.mark.parametrize("setting, expected", [(None, 1), ("1", 1), ("3", 3), (" 4 ", 4)])
def test_compile_threads_reads_the_environment(monkeypatch, setting, expected):
    if setting is None:
        monkeypatch.delenv(parallel_compile.COMPILE_THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(parallel_compile.COMPILE_THREADS_ENV, setting)
    assert parallel_compile.compile_threads() == expected


@pytest.mark.parametrize("setting", ["0", "-2", "two", "", "1.5"])
def test_bad_compile_threads_is_a_value_error_naming_it(monkeypatch, setting):
    monkeypatch.setenv(parallel_compile.COMPILE_THREADS_ENV, setting)
    with pytest.raises(ValueError, match=f"JAXLLM_COMPILE_THREADS must be a positive int when set, got {setting!r}"):
        parallel_compile.compile_threads()


def test_a_compile_error_reaches_the_caller():
    class Broken:
        def compile(self):
            raise RuntimeError("compile failed here")

    good = jax.jit(lambda x: x * 2).lower(jax.ShapeDtypeStruct((3,), "float32"))
    with pytest.raises(RuntimeError, match="compile failed here"):
        parallel_compile.compile_concurrently([good, Broken()], threads=2)


@pytest.fixture
def lowerings_while_running(monkeypatch):
    """Counts the programs JAX lowers inside each runner's padding-step runs (the warm-up's second half)."""
    counts = {"total": 0, "in_runs": 0}
    running = []

    def listener(name, duration, **kwargs):
        if name == LOWERING_EVENT:
            counts["total"] += 1
            counts["in_runs"] += bool(running)

    def counted(method):
        def run(self, *args):
            running.append(True)
            try:
                return method(self, *args)
            finally:
                running.pop()

        return run

    monkeypatch.setattr(ModelRunner, "_run_padding_step", counted(ModelRunner._run_padding_step))
    monkeypatch.setattr(PipelineRunner, "_run_padding", counted(PipelineRunner._run_padding))
    jax.monitoring.register_event_duration_secs_listener(listener)
    yield counts
    jax.monitoring.unregister_event_duration_listener(listener)


def build_and_generate(monkeypatch, threads: int, **options) -> list[list[int]]:
    monkeypatch.setenv(parallel_compile.COMPILE_THREADS_ENV, str(threads))
    llm = LLM(
        model=str(MODEL),
        dtype="float32",
        max_model_len=64,
        max_num_batched_tokens=32,
        max_num_seqs=8,
        num_gpu_blocks_override=64,
        block_size=4,
        seed=0,
        skip_tokenizer_init=True,
        **options,
    )
    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(1, 500, n).tolist()} for n in (4, 11, 27, 2)]
    return [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="one-device"),
        pytest.param({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, marks=NEEDS_8_DEVICES, id="tp2-pp2"),
    ],
)
def test_warm_up_compiles_every_program_before_running_them(monkeypatch, lowerings_while_running, options):
    serial = build_and_generate(monkeypatch, 1, **options)
    assert lowerings_while_running["in_runs"] > 0  # the control: one thread lowers as it runs
    lowerings_while_running.update(total=0, in_runs=0)
    concurrent = build_and_generate(monkeypatch, 2, **options)
    assert lowerings_while_running["total"] > 0 and lowerings_while_running["in_runs"] == 0
    assert concurrent == serial


@pytest.fixture
def no_cache_configured(monkeypatch):
    """JAX's cache settings as in a fresh process (no directory), restored afterwards."""
    names = ["jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs"]
    names.append("jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.mark.parametrize("threads, subdir", [(1, ""), (4, parallel_compile.CONCURRENT_CACHE_SUBDIR)])
def test_concurrently_compiled_programs_have_a_cache_of_their_own(
    monkeypatch, tmp_path, no_cache_configured, threads, subdir
):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(parallel_compile.COMPILE_THREADS_ENV, str(threads))
    expected = str(tmp_path / subdir) if subdir else str(tmp_path)
    assert setup.enable_compilation_cache() == expected == jax.config.jax_compilation_cache_dir
