"""When the kernel received the bytes of a socket read, in perf_counter() time (SO_TIMESTAMPNS, Linux).

A process that is busy reads its sockets late; the kernel stamps each packet as it arrives, and
recvmsg hands that stamp over with the bytes (the stamp of the last packet the read took). The
transport times answers with it (transport.py), and the simulator anchors each request's
deadlines on it (simulator.py), so neither side counts its own event loop's lateness as the
other's latency. Elsewhere (no SO_TIMESTAMPNS) a read is stamped when it is read.
"""

from __future__ import annotations

import functools
import socket
import struct
import sys
import time

# CLOCK_REALTIME, nanoseconds. Linux has it; the constant is not in Python's socket module.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)
ANCILLARY_SIZE = socket.CMSG_SPACE(16) if hasattr(socket, "CMSG_SPACE") else 0


def enable(sock: socket.socket) -> bool:
    """Ask the kernel to stamp what this socket receives; False where it cannot."""
    if SO_TIMESTAMPNS is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False  # no stamps from this kernel: reads are stamped when read (kernel_time)
    return True


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this kernel stamps what a TCP socket receives (asked once, of a throwaway socket)."""
    if SO_TIMESTAMPNS is None:
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            return enable(probe)
    except OSError:  # no IPv4 sockets at all here: nothing to stamp either
        return False


class _ClockPair:
    """The offset between the kernel's stamps (CLOCK_REALTIME) and perf_counter(), measured only
    from reads taken back to back.

    Reading one clock and then the other is exact only if nothing runs between the two reads; on
    a loaded machine the process may be preempted there for milliseconds, and every arrival
    converted with that pair would come out early by as much (a TTFT shorter than the server
    took). So the offset is taken from a read of realtime, perf_counter, realtime whose two
    realtime reads are close, and the last good one is kept for the reads that are not."""

    TIGHT_S = 20e-6

    def __init__(self) -> None:
        self.offset: float | None = None  # time.time() - time.perf_counter()

    def realtime_to_perf(self, realtime: float) -> float | None:
        # One read of the shared offset: the simulator may run in a thread of its own beside the
        # engine's loop (Simulator.start_in_thread), each converting its reads.
        offset = self.offset
        before = time.time()
        perf = time.perf_counter()
        after = time.time()
        if after - before <= self.TIGHT_S or offset is None:
            pair = (before + after) / 2 - perf
            # The first pair, not a tight one, is used once and measured again next time.
            self.offset = pair if after - before <= self.TIGHT_S else None
            return realtime - pair
        return realtime - offset


_CLOCKS = _ClockPair()


def kernel_time(ancillary) -> float:
    """perf_counter() time at which the kernel received the bytes just read (recvmsg's ancillary
    data); now, where the read carries no stamp."""
    now = time.perf_counter()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("qq", data[:16])
            arrived = _CLOCKS.realtime_to_perf(sec + nsec / 1e9)
            if arrived is not None and 0 <= now - arrived < 60:  # a wall clock stepped mid-read is not believed
                return min(arrived, now)
    return now
