"""Saving a quantized model's weights with Orbax and restoring them, so a restart skips re-quantizing.

Owns the on-disk layout: ``<dir>/state`` (an Orbax ``StandardCheckpointer`` checkpoint of the model's NNX state: the
quantized ``values``/``scales`` and every unquantized parameter) and ``<dir>/quantization.json`` (method, group size
and whether lm_head is quantized, checked on restore). Restoring fills an abstract model built with the same
``QuantizationConfig``, each array placed straight onto its device(s) by the loader's ``placement``. Does not touch
the checkpoint formats the loader reads (safetensors, GGUF).
"""

from __future__ import annotations

import json
import pathlib

import jax
from flax import nnx

from jaxllm.quantization.config import QuantizationConfig

METADATA_FILE = "quantization.json"


def save_quantized(model, directory, quantization: QuantizationConfig) -> None:
    """Writes ``model``'s weights (quantized with ``quantization``) under ``directory``, which must not exist."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "state", nnx.state(model))
    checkpointer.wait_until_finished()
    (directory / METADATA_FILE).write_text(json.dumps(_metadata(quantization)))


def _metadata(quantization: QuantizationConfig) -> dict:
    group_size = quantization.group_size if quantization.method == "int4" else None
    return {
        "method": quantization.method,
        "group_size": group_size,
        "lm_head": quantization.lm_head,
        "zero_points": quantization.zero_points,
    }


def restore_quantized(abstract, directory, quantization: QuantizationConfig, placement=None):
    """``abstract`` (built with ``quantization``) filled from ``save_quantized``'s ``directory``.

    ``placement(path, variable)`` gives each parameter's sharding (None: the default device).
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    # older files lack lm_head and zero_points
    saved = {"lm_head": False, "zero_points": False, **json.loads((directory / METADATA_FILE).read_text())}
    wanted = _metadata(quantization)
    if saved != wanted:
        raise ValueError(f"{directory} holds weights quantized as {saved}, not {wanted}")
    graphdef, state = nnx.split(abstract)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = []
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        sharding = (placement(path, variable) if placement else None) or default
        variable.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
        flat.append((path, variable))
    restored = ocp.StandardCheckpointer().restore(directory / "state", nnx.from_flat_state(flat))
    return nnx.merge(graphdef, restored)
