"""Colour themes as TOML data files: the shipped ones in themes/ and the user's in ~/.config/llmtop/themes/."""

from __future__ import annotations

import sys
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
    # The package is installed editable from the repository, whose root holds themes/.
    return Path(llmtop.__file__).resolve().parent.parent / "themes"


@dataclass(frozen=True)
class LoadedThemes:
    themes: tuple[Theme, ...]
    errors: tuple[str, ...]  # one line per skipped file, naming the file and the key at fault
    stems: dict[str, str] = field(default_factory=dict)  # file name without .toml -> theme name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.themes)

    def resolve(self, wanted: str) -> str | None:
        """A theme's name from its name or its file's name (what --theme accepts)."""
        if wanted in self.names:
            return wanted
        return self.stems.get(wanted.removesuffix(".toml"))


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
