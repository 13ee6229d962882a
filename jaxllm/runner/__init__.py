"""Device side of the engine: KV cache allocation, packing a step batch, and the jitted step function."""
