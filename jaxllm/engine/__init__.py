"""The engine: LLMEngine (add_request / step) and how it is assembled from an EngineConfig."""
