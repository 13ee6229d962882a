"""vLLM's default sampling parameters: what ``LLM.generate`` / ``chat`` sample with when given no ``SamplingParams``.

As in vLLM, a model's ``generation_config.json`` recommends them: its ``temperature``, ``top_p``, ``top_k``,
``min_p``, ``repetition_penalty`` and ``max_new_tokens`` (vLLM's ``max_tokens``) replace ``SamplingParams``'
defaults, and its other keys (``do_sample`` among them) are ignored. ``EngineConfig.generation_config`` picks the
source: ``"auto"`` (the model's file), ``"vllm"`` (none: ``SamplingParams()``) or a directory holding a
``generation_config.json``; ``override_generation_config`` (a dict) goes on top. Requests that bring their own
``SamplingParams`` are not touched.
"""

from __future__ import annotations

import pathlib

from jaxllm.config import EngineConfig
from jaxllm.loading.hf_checkpoint import read_generation_config
from jaxllm.sampling_params import SamplingParams

SAMPLING_FIELDS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def default_sampling_fields(config: EngineConfig, model_generation_config: dict) -> dict[str, object]:
    """The ``SamplingParams`` fields that differ from its defaults; a ``ValueError`` names a missing source file or
    a recommended value ``SamplingParams`` refuses."""
    if config.generation_config == "auto":
        source, recommended = "the model's generation_config.json", dict(model_generation_config)
    elif config.generation_config == "vllm":
        source, recommended = "vLLM's defaults", {}
    else:
        directory = pathlib.Path(config.generation_config).expanduser()
        if not (directory / "generation_config.json").is_file():
            raise ValueError(
                f"generation_config={config.generation_config!r} must be 'auto', 'vllm' or a directory holding a "
                "generation_config.json"
            )
        source, recommended = f"{directory / 'generation_config.json'}", read_generation_config(directory)
    recommended.update(config.override_generation_config or {})
    fields = {name: recommended[name] for name in SAMPLING_FIELDS if recommended.get(name) is not None}
    if "max_new_tokens" in fields:
        fields["max_tokens"] = fields.pop("max_new_tokens")
    try:
        SamplingParams(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"default sampling parameters {fields} from {source}: {error}") from None
    return fields
