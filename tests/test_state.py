"""The state file store: what one process writes, it keeps seeing, whatever its own threads do meanwhile."""

from __future__ import annotations

import os
import threading

import llmtop.state as state_module
from llmtop.state import StateStore


def test_a_refresh_racing_the_first_write_does_not_lose_it(tmp_path, monkeypatch):
    # The TUI re-reads the state file in a worker thread every tick while a key's write runs in
    # another. A refresh that found no file yet, landing while the first write was in flight,
    # reset the store to "no admin states" after the write had recorded the file as read: the
    # store then showed `alpha` active for good while the file said draining (the drain badge of
    # test_tui's `d` test never came). Here the racing refresh is made to land exactly there.
    store = StateStore(tmp_path / "state.json")
    real_replace = os.replace
    racers: list[threading.Thread] = []

    def replace_with_a_refresh_racing(src, dst):
        # The other thread's refresh runs now, before the new file is in place, or is held off
        # until the write is done: either way it has reached that point before the write goes on.
        reached = threading.Event()
        mutex = getattr(store, "_mutex", None)
        if mutex is not None:
            monkeypatch.setattr(store, "_mutex", _Observed(mutex, reached))

        def refresh():
            try:
                store.refresh()
            finally:
                reached.set()

        racer = threading.Thread(target=refresh)
        racers.append(racer)
        racer.start()
        assert reached.wait(30), "the racing refresh neither ran nor waited"
        real_replace(src, dst)

    monkeypatch.setattr(state_module.os, "replace", replace_with_a_refresh_racing)
    store.set_admin("alpha", "draining")
    for racer in racers:
        racer.join(30)
        assert not racer.is_alive()
    monkeypatch.undo()
    assert store.admin("alpha") == "draining"
    store.refresh()
    assert store.admin("alpha") == "draining"
    assert StateStore(tmp_path / "state.json").admin("alpha") == "draining"


class _Observed:
    """A lock that says when someone has to wait for it."""

    def __init__(self, lock, contended: threading.Event):
        self._lock, self._contended = lock, contended

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self._contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()
