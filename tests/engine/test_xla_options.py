"""XLA compiler options of the step programs: the platform defaults (GPU: rematerialization off for every step, dot
merger and Triton GEMM off for steps wider than 64 tokens), a user's ``xla_compiler_options`` on top, and proof that
they reach the compiled forward program, one jitted program per distinct set."""

import pytest

from jaxllm import SamplingParams
from jaxllm.config import EngineConfig
from jaxllm.runner.xla_options import (
    NARROW_STEP_GPU_OPTIONS,
    NARROW_STEP_MAX_TOKENS,
    WIDE_STEP_GPU_OPTIONS,
    ProgramsByOptions,
    StepCompilerOptions,
    check_compiler_options,
)
from tests.engine.conftest import make_llm, random_token_prompts

NO_FUSION_PASS = {"xla_disable_hlo_passes": "fusion"}  # changes the CPU program's fusions (HLO shows it)


def test_gpu_defaults_turn_off_rematerialization_and_for_wide_steps_dot_merger_and_triton_gemm():
    gpu = StepCompilerOptions("gpu")
    assert gpu(NARROW_STEP_MAX_TOKENS + 1) == {
        "xla_disable_hlo_passes": "dot-merger,rematerialization",
        "xla_gpu_enable_triton_gemm": False,
    }
    assert gpu(8192) == WIDE_STEP_GPU_OPTIONS
    assert gpu(NARROW_STEP_MAX_TOKENS) == gpu(16) == {"xla_disable_hlo_passes": "rematerialization"}
    for platform in ("cpu", "tpu"):
        assert StepCompilerOptions(platform)(16) is None and StepCompilerOptions(platform)(8192) is None


def test_gpu_int8_narrow_steps_keep_the_triton_gemm():
    """int8 weights: XLA's narrow products must not fall back to cuBLAS (a separate int8 -> bf16 pass)."""
    int8 = StepCompilerOptions("gpu", quantization="int8")
    assert int8(16) == int8(NARROW_STEP_MAX_TOKENS) == {**NARROW_STEP_GPU_OPTIONS, "xla_gpu_cublas_fallback": False}
    assert int8(NARROW_STEP_MAX_TOKENS + 1) == WIDE_STEP_GPU_OPTIONS
    for method in ("int4", "fp8", None):
        assert StepCompilerOptions("gpu", quantization=method)(16) == NARROW_STEP_GPU_OPTIONS
    assert StepCompilerOptions("cpu", quantization="int8")(16) is None
    assert StepCompilerOptions("gpu", {"xla_gpu_cublas_fallback": True}, "int8")(16) == {
        **NARROW_STEP_GPU_OPTIONS,
        "xla_gpu_cublas_fallback": True,
    }
    check_compiler_options(int8(16))  # known to XLA on every platform


def test_user_options_add_to_and_replace_the_defaults():
    overrides = {"xla_gpu_enable_triton_gemm": True, "xla_gpu_autotune_level": 0}
    gpu = StepCompilerOptions("gpu", overrides)
    assert gpu(256) == {**WIDE_STEP_GPU_OPTIONS, **overrides} and gpu(16) == {**NARROW_STEP_GPU_OPTIONS, **overrides}
    replaced = StepCompilerOptions("gpu", NO_FUSION_PASS)  # the key's whole value: the default passes run again
    assert replaced(16) == NO_FUSION_PASS and replaced(256) == {**WIDE_STEP_GPU_OPTIONS, **NO_FUSION_PASS}
    assert StepCompilerOptions("cpu", NO_FUSION_PASS)(16) == NO_FUSION_PASS
    assert "up to 64 tokens" in gpu.describe() and StepCompilerOptions("cpu").describe() == "XLA's defaults"


def test_one_jitted_program_per_distinct_option_set():
    programs = ProgramsByOptions(lambda x: x * 2, StepCompilerOptions("gpu"))
    assert programs.for_tokens(16) is programs.for_tokens(64)
    assert programs.for_tokens(128) is programs.for_tokens(8192)
    assert programs.for_tokens(16) is not programs.for_tokens(128)
    same = ProgramsByOptions(lambda x: x * 2, {"xla_gpu_enable_triton_gemm": False})
    assert same.for_tokens(16) is same.for_tokens(8192)
    assert int(programs.for_tokens(16)(3)) == 6


@pytest.mark.parametrize("bad", [["xla_gpu_enable_triton_gemm"], {"xla_gpu_enable_triton_gemm": None}, {3: True}])
def test_malformed_options_are_a_type_error(bad):
    with pytest.raises(TypeError, match="xla_compiler_options"):
        EngineConfig(model="m", xla_compiler_options=bad)


def test_unknown_option_is_a_value_error_naming_it():
    check_compiler_options(WIDE_STEP_GPU_OPTIONS)  # known to XLA on every platform
    with pytest.raises(ValueError, match="xla_no_such_option"):
        check_compiler_options({"xla_no_such_option": True})


def _fusions(text: str) -> int:
    return sum(" fusion(" in line for line in text.splitlines())


def test_options_reach_the_forward_program(tiny_model_dir):
    plain = make_llm(tiny_model_dir)
    unfused = make_llm(tiny_model_dir, xla_compiler_options=NO_FUSION_PASS)
    plain_hlo = plain.llm_engine.runner.lower_forward().compile().as_text()
    unfused_hlo = unfused.llm_engine.runner.lower_forward().compile().as_text()
    assert _fusions(plain_hlo) != _fusions(unfused_hlo)  # the option reached XLA for this program
    prompts = random_token_prompts(3, [5, 17, 40], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in unfused.generate(prompts, params, use_tqdm=False)]
    assert got == want
