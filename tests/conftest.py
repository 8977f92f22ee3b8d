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

import gc
import sys

sys.dont_write_bytecode = False


def pytest_collection_finish(session) -> None:
    """The garbage collector skips what the imports and the collection made.

    A full collection scans every tracked object, and the suite's processes hold Textual's,
    hypothesis's and pytest's whole module graphs: a worker's full collections took 120-160 ms
    each, 27 of them in test_tui.py alone. Frozen, those objects are never scanned again. The
    first threshold is raised for the same reason: Textual allocates in bursts that die young.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 10)
