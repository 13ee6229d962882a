"""Test session set-up, before JAX starts: 8 fake CPU devices for mesh tests, a persistent XLA compilation cache
shared by the many small engines the tests build (identical step programs compile once), and, on a GPU, memory taken
as needed rather than jaxllm's 95% pool up front (the benchmark smoke tests start engines in child processes)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAXLLM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxllm-test-xla-cache"))
