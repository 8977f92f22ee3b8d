"""Real components the tests start (HAProxy, Prometheus, promtool): skipped where one is not installed,
except in CI (`LLMTOP_REQUIRE_REAL=1`, set by .ci/run), where a missing one is a failure, not a skip."""

from __future__ import annotations

import os
import shutil

import pytest


def needs(program: str) -> pytest.MarkDecorator:
    missing = shutil.which(program) is None and not os.environ.get("LLMTOP_REQUIRE_REAL")
    # In CI (or where it is installed) the test runs, and fails loudly if the program is missing.
    return pytest.mark.skipif(missing, reason=f"{program} is not installed (.ci/run installs it from the distribution's packages)")
