"""The three import packages come from this repository (PyPI also has a package named ``sharding``)."""

import pathlib

import jaxllm
import pallas_kernels
import sharding

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_packages_are_this_repository():
    for module in (jaxllm, pallas_kernels, sharding):
        path = pathlib.Path(module.__file__).resolve()
        assert REPO_ROOT in path.parents, f"{module.__name__} imported from {path}, outside {REPO_ROOT}"
