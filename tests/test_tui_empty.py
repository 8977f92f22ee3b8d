"""An empty fleet on the live screen: a hint on how to add a backend, gone once there is one."""

from __future__ import annotations

import time

from llmtop.config import load_config
from llmtop.engine import Engine
from llmtop.simulator import SimBackend, Simulator
from llmtop.state import StateStore
from llmtop.tui.app import LlmtopApp, no_backends_hint


async def until(pilot, condition, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)


async def test_the_empty_fleet_hint_goes_once_a_reload_brings_a_backend(tmp_path):
    config_path = tmp_path / "fleet.toml"
    config_path.write_text("[settings]\nhealth_interval_s = 0.5\n")
    engine = Engine(load_config(config_path), StateStore(tmp_path / "state.json"))
    app = LlmtopApp(engine, config_path=config_path, hint=no_backends_hint(config_path))
    async with Simulator([SimBackend("alpha")]) as sim, app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        assert "add a [[backend]]" in app.view.hint
        config_path.write_text(
            f'[settings]\nhealth_interval_s = 0.5\n[[backend]]\nname = "alpha"\nprovider = "vllm"\nurl = "{sim.url("alpha")}"\n'
        )
        await pilot.press("r")
        await until(pilot, lambda: [b.name for b in app.view.fleet.backends] == ["alpha"], "the reload")
        assert app.hint is None and app.view.hint is None
        config_path.write_text("[settings]\nhealth_interval_s = 0.5\n")
        await pilot.press("r")
        await until(pilot, lambda: not app.view.fleet.backends, "the second reload")
        assert app.hint == app.view.hint == no_backends_hint(config_path)
