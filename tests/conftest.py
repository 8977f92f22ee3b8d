"""The suite's process setup: bytecode caches are written even where PYTHONDONTWRITEBYTECODE is set.

Without them every process compiled again what the last one had compiled: each of the four
xdist workers rewrote the asserts of all 30 test modules (pytest keeps a rewritten module only
where bytecode may be written: 1.7 s of CPU a worker), and each of the ~100 llmtop processes the
tests start compiled the modules of the package it imports (an editable install is not
byte-compiled; a wheel install is). Those processes still write nothing themselves (they inherit
the variable); they read what the workers wrote. Where the tree is read-only, nothing is written
and nothing fails.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = False
