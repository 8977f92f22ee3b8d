"""Theme names as the README writes them, and the theme chosen with T remembered between runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtop.tui.run import pick_theme
from llmtop.tui.themes import load_saved_theme, load_themes, save_theme, shipped_themes_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "wanted, theme",
    [
        ("dark", "llmtop-dark"),
        ("light", "llmtop-light"),
        ("high-contrast", "llmtop-high-contrast"),
        ("llmtop-light", "llmtop-light"),
        ("llmtop-high-contrast.toml", "llmtop-high-contrast"),
    ],
)
def test_short_and_full_names_both_work(wanted, theme):
    assert load_themes((shipped_themes_dir(),)).resolve(wanted) == theme


def test_every_theme_the_readme_names_is_accepted():
    readme = (ROOT / "README.md").read_text()
    themes = load_themes((shipped_themes_dir(),))
    for name in ("dark", "light", "high-contrast"):
        assert f"`{name}`" in readme
        assert themes.resolve(name) is not None


def test_the_shipped_themes_are_found_from_the_repository():
    # An editable install reads themes/ at the top of the repository; a wheel carries a copy inside the package.
    assert sorted(p.name for p in shipped_themes_dir().glob("*.toml")) == sorted(p.name for p in (ROOT / "themes").glob("*.toml"))


def test_pick_theme_prefers_the_flag_then_the_remembered_one(tmp_path):
    themes = load_themes((shipped_themes_dir(),))
    prefs = tmp_path / "state" / "ui.json"
    assert pick_theme(None, themes, prefs) is None  # nothing remembered: the app's default
    save_theme(prefs, "llmtop-light")
    assert pick_theme(None, themes, prefs) == "llmtop-light"
    assert pick_theme("high-contrast", themes, prefs) == "llmtop-high-contrast"
    with pytest.raises(ValueError, match="unknown theme 'nope'"):
        pick_theme("nope", themes, prefs)
    save_theme(prefs, "a-theme-since-deleted")
    assert pick_theme(None, themes, prefs) is None


@pytest.mark.parametrize("content", ["", "{not json", "[1]", '{"theme": 3}', "[" * 100_000])
def test_a_mangled_prefs_file_means_no_remembered_theme(tmp_path, content):
    prefs = tmp_path / "ui.json"
    prefs.write_text(content)
    assert load_saved_theme(prefs) is None


def test_saving_keeps_other_prefs(tmp_path):
    prefs = tmp_path / "ui.json"
    prefs.write_text('{"later": true}')
    save_theme(prefs, "llmtop-dark")
    assert json.loads(prefs.read_text()) == {"later": True, "theme": "llmtop-dark"}
    assert [p.name for p in tmp_path.iterdir()] == ["ui.json"]  # no temporary file left
