"""One table of comparison tolerances by dtype, shared by every kernel test and benchmark check.

A kernel's output is compared with an independent float64 (or float32) reference computed from the same, already
rounded inputs. ``float32``: arithmetic error only (f32 accumulation, exp2 approximations). ``bfloat16``: the kernel
rounds intermediate probabilities and its output to bf16 (relative step 2**-8), as every bf16 attention kernel does.

``KV_QUANTIZATION_TOLERANCES`` bound something else: attention over a KV cache rounded to a narrow dtype against the
same attention over the unrounded cache (the rounding error itself, which no kernel can remove).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float  # elementwise: |out - ref| <= atol + rtol * |ref|
    rtol: float
    max_relative_norm: float  # whole-tensor: ||out - ref|| / ||ref||


TOLERANCES = {
    "float32": Tolerance(atol=1e-5, rtol=1e-5, max_relative_norm=1e-5),
    "bfloat16": Tolerance(atol=2e-2, rtol=2e-2, max_relative_norm=1e-2),
}


# float8_e4m3fn keeps 3 mantissa bits: each cached value moves by up to 2**-4 of itself (RMS ~3.6%). Over the kernel
# tests' peaky softmax (q entries ~3, H = 64, sm_scale = 1/8) that moves each score by ~0.1 (RMS), shifting a few
# percent of a row's probability mass, and V's own rounding adds ~3.6% of a value row. Measured on the kernel tests:
# relative norm error 4.8%, largest elementwise error 0.35 (outputs up to ~3); the bounds are about twice that.
KV_QUANTIZATION_TOLERANCES = {"float8_e4m3fn": Tolerance(atol=0.5, rtol=0.1, max_relative_norm=0.1)}


def tolerance_for(dtype) -> Tolerance:
    """The tolerance for outputs of ``dtype``; raises ValueError for dtypes with no entry."""
    name = np.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {name!r}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[name]


def assert_close(out, ref, dtype, what: str = "output", tolerance: Tolerance | None = None) -> None:
    """Elementwise and whole-tensor comparison of ``out`` with ``ref`` at ``dtype``'s tolerance, or at ``tolerance``
    when given (NaN never passes)."""
    tol = tolerance or tolerance_for(dtype)
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        raise AssertionError(f"{what}: {np.sum(~np.isfinite(out))} non-finite values")
    np.testing.assert_allclose(out, ref, atol=tol.atol, rtol=tol.rtol, err_msg=what)
    relative = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    if relative > tol.max_relative_norm:
        raise AssertionError(f"{what}: relative norm error {relative:.3e} > {tol.max_relative_norm:.1e}")
