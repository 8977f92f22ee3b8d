"""Colour themes as TOML data files: the shipped ones in themes/ and the user's in ~/.config/llmtop/themes/."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from textual.color import Color, ColorParseError
from textual.theme import Theme

import llmtop
from llmtop.paths import user_themes_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

DEFAULT_THEME = "llmtop-dark"
COLOURS = ("primary", "secondary", "accent", "foreground", "background", "surface", "panel", "success", "warning", "error")
KEYS = ("name", "dark", *COLOURS)


def shipped_themes_dir() -> Path:
    """themes/ lives at the top of the repository; a wheel carries it inside the package as
    llmtop/shipped_themes (setup.py maps it), while an editable install reads it where it is."""
    package = Path(llmtop.__file__).resolve().parent
    installed = package / "shipped_themes"
    return installed if installed.is_dir() else package.parent / "themes"


@dataclass(frozen=True)
class LoadedThemes:
    themes: tuple[Theme, ...]
    errors: tuple[str, ...]  # one line per skipped file, naming the file and the key at fault
    stems: dict[str, str] = field(default_factory=dict)  # file name without .toml -> theme name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.themes)

    def resolve(self, wanted: str) -> str | None:
        """A theme's name from its name, its file's name, or a shipped theme's short name (what
        --theme accepts): "dark", "llmtop-dark" and "llmtop-dark.toml" are one theme."""
        if wanted in self.names:
            return wanted
        stem = wanted.removesuffix(".toml")
        return self.stems.get(stem) or self.stems.get(f"llmtop-{stem}")


class ThemeFileError(Exception):
    """One theme file is unusable; the message names the file and the key."""


def parse_theme(path: Path) -> Theme:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ThemeFileError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ThemeFileError(f"{path}: not valid TOML: {exc}") from None
    for key in data:
        if key not in KEYS:
            raise ThemeFileError(f"{path}: unknown key '{key}' (known keys: {', '.join(KEYS)})")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ThemeFileError(f"{path}: 'name' must be a non-empty string")
    if "primary" not in data:
        raise ThemeFileError(f"{path}: missing required key 'primary'")
    dark = data.get("dark", True)
    if not isinstance(dark, bool):
        raise ThemeFileError(f"{path}: 'dark' must be true or false")
    colours: dict[str, str] = {}
    for key in COLOURS:
        if key not in data:
            continue
        value = data[key]
        try:
            if not isinstance(value, str):
                raise ColorParseError(value)
            Color.parse(value)
        except ColorParseError:
            raise ThemeFileError(f"{path}: '{key}' = {value!r} is not a colour; write it like \"#4C9AFF\"") from None
        colours[key] = value
    return Theme(name=name.strip(), dark=dark, **colours)


def load_themes(dirs: tuple[Path, ...] | None = None) -> LoadedThemes:
    """Every *.toml theme in the shipped then the user directory; a later file of the same name wins."""
    if dirs is None:
        dirs = (shipped_themes_dir(), user_themes_dir())
    themes: dict[str, Theme] = {}
    stems: dict[str, str] = {}
    errors: list[str] = []
    for directory in dirs:
        try:
            paths = sorted(directory.glob("*.toml"))
        except OSError:
            continue
        for path in paths:
            try:
                theme = parse_theme(path)
            except ThemeFileError as exc:
                errors.append(f"theme skipped: {exc}")
                continue
            themes[theme.name] = theme
            stems[path.stem] = theme.name
    return LoadedThemes(tuple(themes.values()), tuple(errors), stems)


def load_saved_theme(path: Path) -> str | None:
    """The theme last chosen with T, from the UI prefs file; None when there is none to read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # absent, unreadable or mangled: a preference, not worth a word
        return None
    theme = data.get("theme") if isinstance(data, dict) else None
    return theme if isinstance(theme, str) else None


def save_theme(path: Path, theme: str) -> None:
    """Remember the theme, keeping any other prefs in the file; written whole or not at all."""
    data: dict = {}
    with contextlib.suppress(OSError, ValueError, RecursionError):
        old = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(old, dict):
            data = old
    data["theme"] = theme
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ui-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
