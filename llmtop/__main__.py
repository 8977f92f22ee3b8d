"""`python -m llmtop` runs the command-line interface."""

from llmtop.cli import entry

entry()
