"""Keeps the live screen's garbage collector off the objects it holds for its whole life."""

from __future__ import annotations

import gc

SETTLE_AFTER_S = 10.0  # at the latest, when a first round never ends (a backend that hangs to its timeout)


def settle() -> None:
    """Collect once, then take every object alive now out of the collector's view (gc.freeze).

    The live screen holds some 110,000 objects for its whole life (modules, classes, widgets,
    the config, a tracker per backend), and every full collection walked them all: gen-2
    pauses of up to 176 ms at 300 backends (benchmarks/bench_tui.py), a key pressed meanwhile
    waiting as long. Frozen, they are not walked again: the same run measured 77 ms at most,
    and half the total. What they let go of later is still freed by reference counting; a
    reference cycle among them dropped later would be kept, at most what was alive at this
    moment, once. (serve measured no change in its readiness latency, so it does not do this.)
    """
    gc.collect()
    gc.freeze()
