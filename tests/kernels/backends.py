"""The kernel tests' backend parameters: a kernel interpreted on CPU, or compiled where its hardware is present.

On a GPU (TPU) the compiled kernel runs and the interpreted one is skipped, since the compiled one covers it;
elsewhere the interpreted one runs and the compiled one is skipped for want of the hardware.
"""

from __future__ import annotations

import jax
import pytest

ON_GPU = jax.default_backend() == "gpu"
ON_TPU = jax.default_backend() == "tpu"
_PLATFORMS = {"gpu": (ON_GPU, pytest.mark.gpu, "Triton"), "tpu": (ON_TPU, pytest.mark.tpu, "Mosaic")}


def interpreted_and_compiled(
    platform: str, interpreted, compiled, interpret_id: str = "interpret", compiler: str | None = None
) -> list:
    """Two ``pytest.param``s, ``interpreted`` (id ``interpret_id``) and ``compiled`` (id ``platform``); ``compiler``
    names the kernel's compiler in skip reasons when it is not the platform's usual one."""
    present, marker, default_compiler = _PLATFORMS[platform]
    compiler = compiler or default_compiler
    name = platform.upper()
    runs_compiled = f"on a {name} the compiled kernel runs instead (id {platform})"
    needs_hardware = f"needs a {name} to compile the {compiler} kernel"
    return [
        pytest.param(
            interpreted,
            id=interpret_id,
            marks=pytest.mark.skipif(present, reason=runs_compiled),
        ),
        pytest.param(
            compiled,
            id=platform,
            marks=[marker, pytest.mark.skipif(not present, reason=needs_hardware)],
        ),
    ]
