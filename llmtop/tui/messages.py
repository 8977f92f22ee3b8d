"""Requests that screens send up to the app, which alone talks to the engine."""

from __future__ import annotations

from textual.message import Message

# The keys --read-only turns off (and hides): drain, disable/enable, reload.
READ_ONLY_ACTIONS = frozenset(("drain", "toggle", "reload"))


class ProbeRequested(Message):
    """Probe these backends now (a full round: health, models, metrics, completion); None for all."""

    def __init__(self, names: tuple[str, ...] | None) -> None:
        super().__init__()
        self.names = names


class AdminRequested(Message):
    """The operator pressed `d` (action "drain": drain or undrain) or `t` (action "toggle": disable or enable)."""

    def __init__(self, backend: str, action: str) -> None:
        super().__init__()
        self.backend = backend
        self.action = action


class DetailsRequested(Message):
    """Open the detail screen on this backend."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
