"""Conversations for ``LLM.chat``: vLLM's message forms rendered to prompt token ids by the tokenizer's chat template.

A conversation is a list of ``{"role", "content", ...}`` dicts; ``chat`` takes one or a list of them. Content is a
string or, as in OpenAI's API, a list of ``{"type": "text", "text": ...}`` parts (text only: jaxllm serves text
models). ``content_format`` is vLLM's ``chat_template_content_format``: ``"string"`` joins the parts with newlines
for templates that expect a string, ``"openai"`` hands every content to the template as a list of parts, and
``"auto"`` is ``"string"`` (the Llama, Mistral and Qwen templates read strings).
"""

from __future__ import annotations

CONTENT_FORMATS = ("auto", "string", "openai")


def chat_prompts(
    tokenizer,
    messages,
    *,
    chat_template: str | None,
    content_format: str,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict] | None,
    chat_template_kwargs: dict | None,
) -> list[dict]:
    """One ``{"prompt": rendered text, "prompt_token_ids": [...]}`` per conversation in ``messages`` (the text is what
    vLLM's ``chat`` outputs carry as ``RequestOutput.prompt``; the ids are the template's own tokenization of it)."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format must be one of {CONTENT_FORMATS}, got {content_format!r}")
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message=True needs add_generation_prompt=False (vLLM's rule)")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise TypeError(f"chat_template_kwargs must be a dict or None, got {chat_template_kwargs!r}")
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer; it is unavailable with skip_tokenizer_init=True")
    conversations = _conversations(messages)
    options = dict(
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tools=tools,
        **(chat_template_kwargs or {}),
    )
    prompts = []
    for conversation in conversations:
        rendered = [_message(message, content_format) for message in conversation]
        text = tokenizer.apply_chat_template(rendered, tokenize=False, **options)
        token_ids = tokenizer.apply_chat_template(rendered, tokenize=True, return_dict=False, **options)
        prompts.append({"prompt": text, "prompt_token_ids": list(token_ids)})
    return prompts


def _conversations(messages) -> list[list]:
    """One conversation (a list of message dicts) or a list of them, as a list of conversations."""
    if isinstance(messages, list | tuple) and messages and isinstance(messages[0], dict):
        return [messages]
    if isinstance(messages, list | tuple) and all(isinstance(c, list | tuple) for c in messages):
        return list(messages)
    raise TypeError(
        "messages must be one conversation (a list of {'role': ..., 'content': ...} dicts) or a list of "
        f"conversations, got {messages!r:.80}"
    )


def _message(message, content_format: str) -> dict:
    """``message`` with its content in the template's format."""
    if not isinstance(message, dict) or "role" not in message:
        raise TypeError(f"a chat message must be a dict with a 'role', got {message!r:.80}")
    content = message.get("content")
    if content is None and message["role"] != "assistant":  # an assistant's may be None (it made tool calls)
        raise ValueError(
            f"a {message['role']!r} chat message needs a 'content' (a string or text parts), got {message!r:.80}"
        )
    if isinstance(content, list):
        texts = [_text_of(part) for part in content]
        content = [{"type": "text", "text": text} for text in texts] if content_format == "openai" else "\n".join(texts)
    elif isinstance(content, str) and content_format == "openai":
        content = [{"type": "text", "text": content}]
    return {**message, "content": content}


def _text_of(part) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise ValueError(f"chat content parts must be {{'type': 'text', 'text': str}} (text models only), got {part!r:.80}")
