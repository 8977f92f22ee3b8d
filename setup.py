"""Packages for setuptools; everything else is in pyproject.toml.

themes/ lives at the top of the repository, where people look for it, and must still travel in a
wheel: it is mapped in as the data package llmtop.shipped_themes, which pyproject.toml alone cannot
do beside automatic package discovery. The runtime looks for it there first, then in the
repository (an editable install): llmtop/tui/themes.py, shipped_themes_dir().
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["llmtop", "llmtop.*"]), "llmtop.shipped_themes"],
    package_dir={"llmtop.shipped_themes": "themes"},
)
