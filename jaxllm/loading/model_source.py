"""ModelSource: where a model comes from, resolved once from the user's ``model=`` / ``load_format=`` / ``tokenizer=``.

Owns telling a local Hugging Face directory from a GGUF file (or a directory holding one), the default model when
``model`` is None, and handing out the HF config dict, the generation config, a tensor iterator and the tokenizer.
Nothing is downloaded: every path is local.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Iterator

import numpy as np

from jaxllm.loading import hf_checkpoint

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelSource:
    name: str
    hf_config: dict
    generation_config: dict
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]]
    load_tokenizer: Callable[[], object]


def resolve_model_source(model: str | None, load_format: str = "auto", tokenizer: str | None = None) -> ModelSource:
    if model is None:
        from jaxllm.loading.default_model import default_model_path

        model = str(default_model_path())
    path = pathlib.Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {model!r} does not exist (jaxllm loads local checkpoints only; no hub downloads)")
    gguf_file = _find_gguf(path)
    if load_format == "gguf" or (
        load_format == "auto" and gguf_file is not None and not (path / "config.json").exists()
    ):
        if gguf_file is None:
            raise ValueError(f"load_format='gguf' but no .gguf file found at {model!r}")
        source = _gguf_source(gguf_file)
    else:
        source = _hf_source(path, load_format)
    if tokenizer is not None:
        source.load_tokenizer = hf_tokenizer_loader(tokenizer)
    return source


def _find_gguf(path: pathlib.Path) -> pathlib.Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"several .gguf files in {str(path)!r}: {[f.name for f in found]}; pass the file itself")
    return found[0] if found else None


def _hf_source(path: pathlib.Path, load_format: str) -> ModelSource:
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is neither a Hugging Face directory nor a .gguf file")
    hf_config = hf_checkpoint.read_hf_config(path)

    def tensors():
        if load_format == "dummy":
            raise ValueError("load_format='dummy' has no tensors")
        return hf_checkpoint.iter_safetensors(path)

    if load_format != "dummy":
        hf_checkpoint.safetensors_files(path)  # fail early, naming the directory, when there are no weights
    return ModelSource(
        name=str(path),
        hf_config=hf_config,
        generation_config=hf_checkpoint.read_generation_config(path),
        tensors=tensors,
        load_tokenizer=hf_tokenizer_loader(str(path)),
    )


def _gguf_source(gguf_file: pathlib.Path) -> ModelSource:
    from jaxllm.loading.gguf_checkpoint import load_gguf_checkpoint

    checkpoint = load_gguf_checkpoint(gguf_file)
    return ModelSource(
        name=str(gguf_file),
        hf_config=checkpoint.config,
        generation_config=checkpoint.generation_config,
        tensors=checkpoint.tensors,
        load_tokenizer=checkpoint.load_tokenizer,
    )


def hf_tokenizer_loader(location: str) -> Callable[[], object]:
    def load():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(location, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"could not load a tokenizer from {location!r} ({error}); pass tokenizer=<dir> or "
                "skip_tokenizer_init=True and give prompt_token_ids"
            ) from None

    return load
