"""Importing jaxllm sets JAX's GPU allocator up for the engine (one preallocated 95% pool) and, where JAX's CUDA plugin
is installed, XLA's stable graph temporaries, unless the user chose."""

import os
import subprocess
import sys

import pytest

from jaxllm import process_env

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = "import os, jaxllm; print(*(os.environ[f'XLA_PYTHON_CLIENT_{k}'] for k in ('PREALLOCATE', 'MEM_FRACTION')))"


def allocator_settings(**user_env: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT_")}
    env.update(user_env, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_import_sets_one_preallocated_pool():
    assert allocator_settings() == ["true", "0.95"]


@pytest.mark.parametrize("preallocate, fraction", [("false", "0.5"), ("true", "0.7")])
def test_user_settings_win(preallocate, fraction):
    user = dict(XLA_PYTHON_CLIENT_PREALLOCATE=preallocate, XLA_PYTHON_CLIENT_MEM_FRACTION=fraction)
    assert allocator_settings(**user) == [preallocate, fraction]


def stable_temporaries(num_devices: int, flags: str | None, on_cuda=True, started=False):
    environ = {} if flags is None else {"XLA_FLAGS": flags}
    added = process_env.stable_graph_temporaries_for_mesh(num_devices, environ, on_cuda, started)
    return added, environ.get("XLA_FLAGS")


def test_multi_gpu_engine_gets_stable_graph_temporaries_after_the_users_flags():
    flag = "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
    assert stable_temporaries(4, "--xla_gpu_enable_triton_gemm=false") == (
        True,
        f"--xla_gpu_enable_triton_gemm=false {flag}",
    )
    assert stable_temporaries(2, None) == (True, flag)


@pytest.mark.parametrize(
    "num_devices, flags, on_cuda, started",
    [
        (1, None, True, False),  # one GPU: the flag made batch-1 decode slower there
        (4, "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE", True, False),  # the user's choice
        (4, "--xla_force_host_platform_device_count=8", False, False),  # no CUDA plugin
        (4, None, True, True),  # too late: XLA read its flags when JAX's backends started
    ],
)
def test_xla_flags_left_alone(num_devices, flags, on_cuda, started):
    assert stable_temporaries(num_devices, flags, on_cuda, started) == (False, flags)


def test_import_leaves_xla_flags_alone():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    probe = "import os, jaxllm; print(os.environ.get('XLA_FLAGS', '<unset>'))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "<unset>"


def test_backends_started_is_read_from_jax():
    """The real query: False in a fresh process until something asks JAX for its devices."""
    probe = (
        "from jaxllm import process_env as p; import jax; a = p._backends_started(); jax.devices(); "
        "print(a, p._backends_started())"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_cuda_plugin_detected_in_the_jax_plugins_namespace(tmp_path, monkeypatch):
    """JAX's CUDA wheels install ``jax_plugins/xla_cuda13`` (or 12); a lookalike on sys.path is found, another not."""
    installed = process_env.cuda_plugin_installed()  # True on a machine with JAX's CUDA wheels
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "jax_plugins" / "xla_tpu_lookalike").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_tpu_lookalike" / "__init__.py").write_text("")
    assert process_env.cuda_plugin_installed() == installed
    (tmp_path / "jax_plugins" / "xla_cuda13").mkdir()
    (tmp_path / "jax_plugins" / "xla_cuda13" / "__init__.py").write_text("")
    assert process_env.cuda_plugin_installed()


class _Runner:
    def __init__(self, outcome):
        self.outcome = outcome

    def warm_up(self):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_warm_up_sums_each_runners_seconds():
    from jaxllm.engine.setup import warm_up

    assert warm_up([_Runner(1.5), _Runner(2.25)]) == 3.75


def test_collective_memory_failure_names_the_pool_setting(monkeypatch):
    """XLA's words when an all-reduce kernel's buffers do not fit outside the pool (seen at TP 4 on H200s)."""
    import jax

    from jaxllm.engine.setup import warm_up

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    xla_error = jax.errors.JaxRuntimeError("INTERNAL: Failed to allocate Scratch 1 for all-reduce.")
    with pytest.raises(RuntimeError, match=r"XLA_PYTHON_CLIENT_MEM_FRACTION=0\.95\).*lower") as caught:
        warm_up([_Runner(1.0), _Runner(xla_error)])
    assert caught.value.__cause__ is xla_error


def test_other_runtime_errors_pass_unchanged():
    import jax

    from jaxllm.engine.setup import warm_up

    xla_error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.0GiB.")
    with pytest.raises(jax.errors.JaxRuntimeError) as caught:
        warm_up([_Runner(xla_error)])
    assert caught.value is xla_error
