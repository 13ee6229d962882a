"""Engine statistics, as vLLM keeps them: what each step adds (``stats``), Prometheus metrics under vLLM's names with
a periodic log line (``prometheus``), and ``LLM.get_metrics()``'s snapshot of them (``reader``). Statistics are off
unless the engine is built with ``disable_log_stats=False``; then ``prometheus_client``'s default registry holds
them, so ``prometheus_client.start_http_server(port)`` serves them."""
