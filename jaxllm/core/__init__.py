"""Host-side engine core: block manager, scheduler and the dataclasses that cross to the model runner.

Plain Python: nothing under ``jaxllm.core`` imports jax or flax.
"""
