"""Flax NNX model definitions for Hugging Face decoder-only LLM families, and their registry."""

from jaxllm.models.config import ModelConfig
from jaxllm.models.registry import SUPPORTED_ARCHITECTURES, get_model_class

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "get_model_class"]
