"""vLLM's prompt types (``vllm.inputs``, also ``from vllm import TextPrompt, TokensPrompt``): the typed dicts
``LLM.generate`` takes beside plain strings. ``jaxllm.engine.prompts`` reads them."""

from __future__ import annotations

from typing import NotRequired, TypedDict


class TextPrompt(TypedDict):
    prompt: str  # tokenized by the engine's tokenizer


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]  # the text those ids came from, returned as RequestOutput.prompt


PromptType = str | TextPrompt | TokensPrompt
