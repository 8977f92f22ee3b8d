"""`python -m llmtop` runs the command-line interface."""

from llmtop.cli import main

raise SystemExit(main())
