"""The XLA compiler options the engine's step programs are compiled with (``jax.jit(..., compiler_options=...)``).

Chosen per platform and per step size by measurement (benchmarks/RESULTS.md, "XLA options of the step program").
On GPU, XLA's ``dot-merger`` pass joins matmuls that share an input (q/k/v, gate/up) into one matmul of concatenated
weights, and its Triton GEMM emitter takes that merged matmul. For wide steps (job J8's 256-token decode) this was
slow: with the pass off and cuBLAS for every GEMM, J8 ran 1.05x faster on an H100. For narrow steps (batch-1 decode,
job L8) XLA's own choice was the faster one (inter-token latency 6.27 ms against 6.70 ms), so steps of at most
``NARROW_STEP_MAX_TOKENS`` tokens keep XLA's defaults, except that with int8 weights (whose narrow products are
XLA's: ``pallas_kernels.quantized_matmul.op``) they turn off XLA's cuBLAS fallback, so its GEMM autotuner chooses
among Triton GEMMs only, which read the int8 weight and convert it in registers. Measured once against the defaults
on one H100 lease: L8 int8 batch-1 ITL 4.91 against 5.46 ms (bf16 6.45); the defaults had given 4.60-6.58 ms on
other leases. Why the defaults were slower is not established (the HLO of their compile shows no cuBLAS call in the
int8 layers either). Other platforms keep XLA's defaults throughout.
Every GPU step program also compiles without XLA's ``rematerialization`` pass (``STEP_GPU_DISABLED_PASSES``). The pass
recomputes values to bring a program's estimated peak memory under a limit of about 80% of the GPU less the program's
inputs and outputs. The engine sizes the KV cache around these same programs' temporaries (compiled with these
options: ``ModelRunner.step_temp_bytes``), so the pass can only trade time for memory already budgeted, and its
estimate misjudges the cache: with the layers sharing cache arrays (``jaxllm.models.kv_cache_layout``) it took the
8B shape's one-device step for 261 GiB (its K and V arrays hold 104.5 GiB) and recomputed 231 instructions of a
batch-1 step to save 4 MiB, +0.55 ms a step on an H200 (benchmarks/RESULTS.md, session 38). With one cache array per
layer (the default) XLA's log showed it rematerializing nothing in any program, so those programs are unchanged.
``EngineConfig.enforce_eager`` (vLLM's name: run without CUDA graphs) turns off XLA's command buffers on GPU, so every
kernel is launched by itself, in the sampler's (and a mesh head's) program too (``sampler_options``).
``EngineConfig.xla_compiler_options`` adds to (or, with a key of the same name, replaces) these for every step: a
user's ``xla_disable_hlo_passes`` is the whole list, so it names ``rematerialization`` to keep that pass off.

A runner takes ``compiler_options`` as a dict (every program alike), None (XLA's defaults) or a callable from a
step's token count to a dict; ``ProgramsByOptions`` keeps one ``jax.jit`` per distinct set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax

STEP_GPU_DISABLED_PASSES = "rematerialization"  # every GPU step program (above)
WIDE_STEP_GPU_OPTIONS: dict[str, object] = {
    "xla_disable_hlo_passes": f"dot-merger,{STEP_GPU_DISABLED_PASSES}",
    "xla_gpu_enable_triton_gemm": False,
}
NARROW_STEP_MAX_TOKENS = 64  # token buckets up to this size keep XLA's defaults on GPU but for the passes above
NARROW_STEP_GPU_OPTIONS: dict[str, object] = {"xla_disable_hlo_passes": STEP_GPU_DISABLED_PASSES}
NARROW_INT8_STEP_GPU_OPTIONS: dict[str, object] = {  # ... and with int8 weights these
    **NARROW_STEP_GPU_OPTIONS,
    "xla_gpu_cublas_fallback": False,
}
EAGER_GPU_OPTIONS: dict[str, object] = {"xla_gpu_enable_command_buffer": ""}  # enforce_eager: no CUDA graphs

CompilerOptions = Mapping[str, object] | Callable[[int], Mapping[str, object] | None] | None


@dataclasses.dataclass(frozen=True)
class StepCompilerOptions:
    """The options of a step program of ``num_tokens`` tokens on ``platform`` for a model with ``quantization``
    (None: unquantized), without CUDA graphs when ``eager``, with ``overrides`` on top."""

    platform: str
    overrides: Mapping[str, object] | None = None
    quantization: str | None = None
    eager: bool = False

    @classmethod
    def for_engine(cls, config, platform: str) -> StepCompilerOptions:
        """The step programs' options of an engine built from ``config`` (an ``EngineConfig``) on ``platform``."""
        return cls(platform, config.xla_compiler_options, config.quantization, config.enforce_eager)

    def __call__(self, num_tokens: int) -> dict[str, object] | None:
        return {**self._platform_options(num_tokens), **(self.overrides or {})} or None

    def _platform_options(self, num_tokens: int) -> Mapping[str, object]:
        if self.platform != "gpu":
            return {}
        if num_tokens > NARROW_STEP_MAX_TOKENS:
            options = WIDE_STEP_GPU_OPTIONS
        else:
            options = NARROW_INT8_STEP_GPU_OPTIONS if self.quantization == "int8" else NARROW_STEP_GPU_OPTIONS
        return {**options, **EAGER_GPU_OPTIONS} if self.eager else options

    def describe(self) -> str:
        narrow, wide = self(NARROW_STEP_MAX_TOKENS), self(NARROW_STEP_MAX_TOKENS + 1)
        if narrow == wide:
            return str(narrow or "XLA's defaults")
        return f"{narrow or 'XLA defaults'} up to {NARROW_STEP_MAX_TOKENS} tokens, {wide} above"


def sampler_options(compiler_options: CompilerOptions) -> dict[str, object] | None:
    """The XLA options of a step's other programs (the sampler, a mesh's head): only ``enforce_eager``'s, so that no
    program of an eager engine's step runs as a CUDA graph."""
    eager = isinstance(compiler_options, StepCompilerOptions) and compiler_options.eager
    return dict(EAGER_GPU_OPTIONS) if eager and compiler_options.platform == "gpu" else None


def options_for(compiler_options: CompilerOptions, num_tokens: int) -> dict[str, object] | None:
    """The options for a program of ``num_tokens`` tokens, whichever form ``compiler_options`` takes."""
    options = compiler_options(num_tokens) if callable(compiler_options) else compiler_options
    return dict(options) if options else None


class ProgramsByOptions:
    """``jax.jit(fn, **jit_kwargs)`` compiled with each step size's options: one jitted function per distinct set."""

    def __init__(self, fn: Callable, compiler_options: CompilerOptions, **jit_kwargs):
        self._fn, self._compiler_options, self._jit_kwargs = fn, compiler_options, jit_kwargs
        self._jitted: dict[tuple, Callable] = {}  # by option set
        self._by_tokens: dict[int, Callable] = {}  # by step size: the per-step lookup

    def for_tokens(self, num_tokens: int):
        if num_tokens not in self._by_tokens:
            options = options_for(self._compiler_options, num_tokens)
            key = tuple(sorted((options or {}).items()))
            if key not in self._jitted:
                self._jitted[key] = jax.jit(self._fn, compiler_options=options, **self._jit_kwargs)
            self._by_tokens[num_tokens] = self._jitted[key]
        return self._by_tokens[num_tokens]


def check_compiler_options(options: Mapping[str, object] | None) -> None:
    """ValueError naming the option when XLA does not know it (found by compiling a one-op program), so a typo fails
    at once rather than as a runtime error in the first step's compile."""
    if not options:
        return
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jax.ShapeDtypeStruct((), "int32")).compile()
    except jax.errors.JaxRuntimeError as error:
        raise ValueError(f"xla_compiler_options={dict(options)!r} rejected by XLA: {error}") from None
