"""Importing jaxllm sets JAX's GPU allocator up for the engine (one preallocated 95% pool) unless the user chose."""

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
