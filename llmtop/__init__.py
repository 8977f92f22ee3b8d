"""llmtop: a terminal monitor for fleets of LLM inference backends."""

__version__ = "0.1.0"
