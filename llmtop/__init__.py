"""llmtop: a terminal monitor for fleets of LLM inference backends."""

import sys

# httpx imports its command-line client (click, rich) whenever those are installed, and they are
# (Textual brings rich): a tenth of a second of every start, for `check`, `serve` and each check
# worker. Its own fallback for when they are missing takes over with this.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

__version__ = "0.1.0"
