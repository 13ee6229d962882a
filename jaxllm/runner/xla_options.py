"""The XLA compiler options the engine's step programs are compiled with (``jax.jit(..., compiler_options=...)``).

Chosen per platform by measurement (benchmarks/RESULTS.md, "XLA options of the step program"). On GPU, XLA's
``dot-merger`` pass joins matmuls that share an input (q/k/v, gate/up) into one matmul of concatenated weights,
which copies those weights every step, and its Triton GEMM emitter then takes the merged matmul at a fraction of the
memory bandwidth; with the pass off and cuBLAS for every GEMM, job J8 ran 1.05x faster on an H100. Other platforms
keep XLA's defaults. ``EngineConfig.xla_compiler_options`` adds to (or, with a key of the same name, replaces) these.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

GPU_STEP_OPTIONS: dict[str, object] = {
    "xla_disable_hlo_passes": "dot-merger",
    "xla_gpu_enable_triton_gemm": False,
}
_DEFAULTS_BY_PLATFORM: dict[str, dict[str, object]] = {"gpu": GPU_STEP_OPTIONS}


def step_compiler_options(platform: str, overrides: Mapping[str, object] | None = None) -> dict[str, object] | None:
    """The options for ``platform`` (``jax.default_backend()``) with ``overrides`` on top; None when there are none."""
    options = {**_DEFAULTS_BY_PLATFORM.get(platform, {}), **(overrides or {})}
    return options or None


def check_compiler_options(options: Mapping[str, object] | None) -> None:
    """ValueError naming the option when XLA does not know it (found by compiling a one-op program), so a typo fails
    at once rather than as a runtime error in the first step's compile."""
    if not options:
        return
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jax.ShapeDtypeStruct((), "int32")).compile()
    except jax.errors.JaxRuntimeError as error:
        raise ValueError(f"xla_compiler_options={dict(options)!r} rejected by XLA: {error}") from None
