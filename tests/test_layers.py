"""The layering of DESIGN.md, enforced: the engine never imports the TUI (import-linter contract in pyproject)."""

import shutil
import subprocess
import sys
from pathlib import Path


def test_core_does_not_import_the_tui():
    root = Path(__file__).parent.parent
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency: pip install -e '.[test]'"
    result = subprocess.run([exe], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout
