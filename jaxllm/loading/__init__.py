"""Checkpoint loading: GGUF files (weights, config, tokenizer) and the location of the default model."""
