"""Tests of jaxllm.loading."""
