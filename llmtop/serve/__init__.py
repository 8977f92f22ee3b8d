"""`llmtop serve`: the engine headless, answering load balancers, Prometheus and remote screens over HTTP."""
