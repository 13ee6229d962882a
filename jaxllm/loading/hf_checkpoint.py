"""Reading a local Hugging Face checkpoint directory: config, generation config and safetensors tensors.

Owns locating ``model.safetensors`` or a sharded ``model.safetensors.index.json`` and yielding tensors one at a
time (numpy, checkpoint dtype), so loading never holds two full copies of the weights in host memory. fp8 tensors
(which safetensors' numpy reader does not map) are read from the file's bytes as ml_dtypes' float8 types.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import ml_dtypes
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
                dtype = _RAW_DTYPES.get(f.get_slice(name).get_dtype())
                yield name, f.get_tensor(name) if dtype is None else _read_raw(path, name, dtype)


# safetensors dtype names numpy's reader does not map, read from the bytes
_RAW_DTYPES = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


def _read_raw(path: pathlib.Path, name: str, dtype: np.dtype) -> np.ndarray:
    """Tensor ``name`` of a safetensors file read from its bytes (the format: an 8-byte little-endian header length,
    a JSON header giving each tensor's dtype, shape and byte range after the header, then the data)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_len))[name]
        begin, end = entry["data_offsets"]
        f.seek(8 + header_len + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, dtype).reshape(entry["shape"])
