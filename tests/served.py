"""What the simulator really did for a streamed request, by its own stamps (taken as it wrote each token).

A measured TTFT or decode rate must match what the server did, not what it was configured to do:
on a loaded machine the server itself is late (the simulator and the engine share the CPU, often
the event loop), and a true measurement shows exactly that lateness. Comparing with the
configured 60 ms made the tests fail whenever a core was busy; comparing with what was served is
tight and holds under any load. How close the simulator keeps to its schedule is test_simulator's
concern, with bounds that leave room for a loaded core; precision is the benchmarks' job.
"""

from __future__ import annotations

from llmtop.simulator import SimBackend


def served_ttft_ms(backend: SimBackend, last: bool = False) -> float:
    """The TTFT of the streamed request `backend` served: its first token's write minus the
    request's arrival. Of the last one when it served more: a probe read too late to be timed on
    a loaded core is retried once, and its figure is the retry's."""
    if last or backend.ttft_histogram.count > 1:
        return backend.last_ttft_s * 1000
    assert backend.ttft_histogram.count == 1, f"{backend.name} served no generation"
    return backend.ttft_histogram.sum * 1000


def served_tokens_per_s(backend: SimBackend, last: bool = False) -> float:
    """The decode rate of that request (or of the last one): (n - 1) tokens over the time from its
    first token to its last."""
    if last or backend.tpot_histogram.count > 1:
        return 1 / backend.last_tpot_s
    assert backend.tpot_histogram.count == 1, f"{backend.name} served no generation"
    return 1 / backend.tpot_histogram.sum


def served_mean_tokens_per_s(backend: SimBackend) -> float:
    """The server's own decode rate over every generation it served: its histogram's mean time per
    token, inverted, as a scrape reads it. A probe read too late to time is sent again, so a
    round may leave two generations, and the mean is over both."""
    assert backend.tpot_histogram.count >= 1, f"{backend.name} served no generation"
    return backend.tpot_histogram.count / backend.tpot_histogram.sum


def served_rates(backend: SimBackend) -> list[float]:
    """The decode rates of the last generation over each window from its first token to a later
    one that covers at least half of it, as the server sent them. A last token read together
    with the end marker takes the marker's stamp, so llmtop's rate ends at the last token whose
    read ended with it (probe.py): a true rate is one of these, whichever token that was."""
    times = backend.last_token_times
    return [k / (times[k] - times[0]) for k in range(max(1, (len(times) - 1) // 2), len(times)) if times[k] > times[0]]


def true_rate(measured: float | None, backend: SimBackend, rel: float = 0.1) -> bool:
    """Whether a measured decode rate is, within rel, what the server did over one of those windows."""
    return measured is not None and any(abs(measured - r) <= rel * r for r in served_rates(backend))


# A measured TTFT is never shorter than the served one (the client sends before the server reads,
# and the kernel stamps the token after the server wrote it) and longer only by the request's way
# in and the token's way out: on loopback, well under a millisecond when quiet, tens under load.
WAY_IN_AND_OUT_MS = 100
