"""Importing jaxllm sets JAX's GPU allocator up for the engine (one preallocated 95% pool) unless the user chose, and
leaves XLA's flags alone."""

import os
import subprocess
import sys

import pytest

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


def test_import_leaves_xla_flags_alone():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    probe = "import os, jaxllm; print(os.environ.get('XLA_FLAGS', '<unset>'))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "<unset>"


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


def test_mesh_engine_lowers_jaxllms_pool_before_jax_starts():
    from jaxllm.process_env import DEFAULTED, MESH_POOL_FRACTION, POOL_FRACTION, apply_defaults, fit_pool_to_mesh

    environ: dict[str, str] = {}
    apply_defaults(environ)
    assert not fit_pool_to_mesh(1, environ, started_platform=lambda: None)  # one device: the pool stays
    assert environ[POOL_FRACTION] == "0.95"
    assert fit_pool_to_mesh(4, environ, started_platform=lambda: None)
    assert environ[POOL_FRACTION] == MESH_POOL_FRACTION
    child = dict(environ, **{POOL_FRACTION: "0.95"})  # a child inherits jaxllm's settings and the record of them
    apply_defaults(child)
    assert child[DEFAULTED] == environ[DEFAULTED]
    assert fit_pool_to_mesh(2, child, started_platform=lambda: None)


@pytest.mark.parametrize("platform", ["gpu", "cpu"])
def test_mesh_engine_leaves_a_started_pool_alone(platform, caplog):
    from jaxllm.process_env import POOL_FRACTION, apply_defaults, fit_pool_to_mesh

    environ: dict[str, str] = {}
    apply_defaults(environ)
    assert not fit_pool_to_mesh(2, environ, started_platform=lambda: platform)
    assert environ[POOL_FRACTION] == "0.95"
    assert ("GPU memory pool stays at 0.95" in caplog.text) == (platform == "gpu")


@pytest.mark.parametrize("fraction", ["0.95", "0.6"])
def test_mesh_engine_keeps_the_users_pool(fraction):
    from jaxllm.process_env import POOL_FRACTION, apply_defaults, fit_pool_to_mesh

    environ = {POOL_FRACTION: fraction}
    apply_defaults(environ)
    assert not fit_pool_to_mesh(4, environ, started_platform=lambda: None)
    assert environ[POOL_FRACTION] == fraction


def test_engine_fits_the_pool_to_its_replica_first(monkeypatch):
    """The engine asks before anything else (resolving the model may start JAX), with T x P devices per replica."""
    from jaxllm import LLM, process_env

    class Asked(Exception):
        pass

    def ask(devices_per_replica):
        raise Asked(devices_per_replica)

    monkeypatch.setattr(process_env, "fit_pool_to_mesh", ask)
    with pytest.raises(Asked) as asked:
        LLM(model="/nonexistent", tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2)
    assert asked.value.args == (4,)
