"""Where llmtop keeps its files: XDG/platform dirs via platformdirs."""

from __future__ import annotations

from pathlib import Path

import platformdirs

APP = "llmtop"


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def default_state_path() -> Path:
    return Path(platformdirs.user_state_dir(APP)) / "state.json"


def ui_prefs_path() -> Path:
    """What the screen remembers between runs (the theme chosen with T)."""
    return Path(platformdirs.user_state_dir(APP)) / "ui.json"


def user_themes_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP)) / "themes"
