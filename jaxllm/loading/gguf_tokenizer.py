"""Builds a transformers tokenizer from a GGUF file's `tokenizer.*` metadata, without torch.

transformers' own GGUF path (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) imports torch, which the engine
does not install. This module rebuilds the byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`, used by
Llama 3, Qwen2, SmolLM and GPT-2-style models) with the `tokenizers` library: vocabulary and merges from the
metadata, the pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names, special tokens from the token types,
and the chat template. It reads only the metadata dict it is given; it never opens files.
"""

from collections.abc import Mapping

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# llama.cpp's token types (gguf.TokenType): 3 marks special tokens, 4 tokens added as-is (not special).
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes (the tiktoken-style patterns of each family); each stretch is then byte-encoded without regex.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS = ("default", "gpt-2", "smollm", "llama-bpe", "qwen2")


def build_tokenizer(metadata: Mapping, source: str = "GGUF metadata") -> PreTrainedTokenizerFast:
    """A fast tokenizer from GGUF `tokenizer.*` metadata values (key -> `ReaderField.contents()`)."""
    model_kind = metadata.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer model {model_kind!r} is not supported; supported: 'gpt2' (byte-level BPE)"
        )
    tokens = list(metadata["tokenizer.ggml.tokens"])
    token_types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    pre_kind = metadata.get("tokenizer.ggml.pre", "default")
    backend = tokenizers.Tokenizer(_bpe_model(tokens, metadata.get("tokenizer.ggml.merges", []), pre_kind))
    backend.pre_tokenizer = _pre_tokenizer(pre_kind, source)
    backend.decoder = decoders.ByteLevel()
    if len(token_types) != len(tokens):
        raise ValueError(f"{source}: {len(token_types)} token types for {len(tokens)} tokens")
    backend.add_tokens(_added_tokens(tokens, token_types, _USER_DEFINED))
    backend.add_special_tokens(_added_tokens(tokens, token_types, _CONTROL))
    backend.post_processor = _post_processor(metadata, tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        **_special_tokens(metadata, tokens),
    )


def _bpe_model(tokens: list[str], merges: list[str], pre_kind: str) -> models.BPE:
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merge_pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = [merge for merge, pair in zip(merges, merge_pairs, strict=True) if len(pair) != 2]
    if bad:
        raise ValueError(f"BPE merges must be two space-separated tokens; got {bad[:3]}")
    # Llama 3's tokenizer looks a whole pre-token up in the vocabulary before merging (HF `ignore_merges`).
    return models.BPE(vocab, merge_pairs, ignore_merges=pre_kind == "llama-bpe")


def _pre_tokenizer(pre_kind: str, source: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre_kind in ("default", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre_kind == "smollm":  # StarCoder-style: every digit alone, then GPT-2's regex
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre_kind in ("llama-bpe", "qwen2"):
        pattern = _LLAMA3_PATTERN if pre_kind == "llama-bpe" else _QWEN2_PATTERN
        split = pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, byte_level])
    raise ValueError(
        f"{source}: pre-tokenizer {pre_kind!r} (tokenizer.ggml.pre) is not supported; "
        f"supported: {list(SUPPORTED_PRE_TOKENIZERS)}"
    )


def _added_tokens(tokens: list[str], token_types: list[int], kind: int) -> list[tokenizers.AddedToken]:
    """Tokens of one llama.cpp type, matched verbatim in the text before BPE runs."""
    chosen = [token for token, token_type in zip(tokens, token_types, strict=True) if token_type == kind]
    return [tokenizers.AddedToken(token, special=kind == _CONTROL, normalized=False) for token in chosen]


def _special_tokens(metadata: Mapping, tokens: list[str]) -> dict[str, str]:
    """bos/eos/unk/pad token strings for the ids the metadata names."""
    special_tokens = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            continue
        if not 0 <= int(token_id) < len(tokens):
            raise ValueError(f"tokenizer.ggml.{key}_token_id is {token_id}, outside the vocabulary of {len(tokens)}")
        special_tokens[f"{name}_token"] = tokens[int(token_id)]
    return special_tokens


def _post_processor(metadata: Mapping, tokens: list[str]):
    """Byte-level offsets, plus bos/eos around each sequence when the metadata asks for them."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    prefix, suffix = [], []  # (token, id) pairs
    for name, where in (("bos", prefix), ("eos", suffix)):
        if not metadata.get(f"tokenizer.ggml.add_{name}_token", False):
            continue
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is None:
            raise ValueError(f"tokenizer.ggml.add_{name}_token is set but tokenizer.ggml.{name}_token_id is missing")
        where.append((tokens[int(token_id)], int(token_id)))
    if not prefix and not suffix:
        return byte_level
    first = [token for token, _ in prefix] + ["$A"] + [token for token, _ in suffix]
    second = [f"{token}:1" for token, _ in prefix] + ["$B:1"] + [f"{token}:1" for token, _ in suffix]
    template = processors.TemplateProcessing(
        single=first, pair=first + second, special_tokens=list(dict.fromkeys(prefix + suffix))
    )
    return processors.Sequence([byte_level, template])
