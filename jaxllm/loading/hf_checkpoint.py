"""Reading a local Hugging Face checkpoint directory: config, generation config and safetensors tensors.

Owns locating ``model.safetensors`` or a sharded ``model.safetensors.index.json`` and yielding tensors one at a
time (numpy, checkpoint dtype), so loading never holds two full copies of the weights in host memory.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import numpy as np
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: pathlib.Path) -> dict:
    with open(path) as f:
        return json.load(f)


def read_hf_config(model_dir: pathlib.Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"no config.json in model directory {str(model_dir)!r}")
    return read_json(config_path)


def read_generation_config(model_dir: pathlib.Path) -> dict:
    path = model_dir / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path)["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise ValueError(f"no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) in {str(model_dir)!r}")


def iter_safetensors(model_dir: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` one tensor at a time, in the checkpoint's dtype."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
