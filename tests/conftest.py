"""Test session set-up, before JAX starts: 8 fake CPU devices for mesh tests, and a persistent XLA compilation cache
shared by the many small engines the tests build (identical step programs compile once)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAXLLM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxllm-test-xla-cache"))
