"""Probe token budgets (per backend and for the fleet) turned into probe intervals and a hard pace, on an injected clock.

Two mechanisms, one for each promise:
- Spread: each backend's probe interval is stretched so that what the fleet plans to spend per
  hour (every probing backend's tokens per probe over its interval) fits the budget. A stretched
  interval keeps the engine's jitter, so probes stay spread over time, never a burst at the top of
  the hour.
- Stay under: a pacer (a GCRA, the leaky bucket as a meter) books each probe a time no earlier
  than the budget has accrued its tokens, so an estimate that was too low, or every backend due
  at start, cannot overspend: a probe booked later simply goes later (the first round of a new
  fleet comes out spread over as long as the budget needs), and is not a failure.
Tokens are what the server's usage says a probe cost, input and output, corrected after each
probe (the pacer charges an estimate when it admits one, and the difference when it is back).
"""

from __future__ import annotations

from dataclasses import dataclass

HOUR_S = 3600.0
# A stretched interval is asked for this much early, so that the pacer, not the chance of the
# jitter, sets the pace: asked for exactly, some stretches of time find no probe waiting and
# their budget is lost (measured: 3% under over an hour of 50 backends); asked early, each probe
# waits a little for its booking and the fleet spends its budget.
ASK_EARLY = 0.95
# A pacer that last admitted a probe a little late (it is asked at polls, not at the exact
# instant its budget accrued) may catch up this much: without it, the lateness of every
# admission is budget lost for good (measured: about 3% under at 200 backends polled every 5 s).
CATCH_UP_S = 2.0


class Pacer:
    """Admits spending at `tokens_per_hour` on average, never ahead of it by more than one probe
    and CATCH_UP_S worth of tokens."""

    def __init__(self, tokens_per_hour: float):
        self.rate = tokens_per_hour / HOUR_S  # tokens per second
        self.ready_at: float | None = None  # when the budget has accrued the next probe's tokens

    def book(self, tokens: float, now: float) -> float:
        """When a probe of about `tokens` asked for at `now` may go (now, or later), booked: the
        next one is booked after it. A probe sent regardless (the operator's) is booked too."""
        start = now if self.ready_at is None else max(self.ready_at, now - CATCH_UP_S)
        self.ready_at = start + tokens / self.rate
        return max(start, now)

    def correct(self, tokens: float) -> None:
        """The probe cost `tokens` more (or, negative, fewer) than charged."""
        if self.ready_at is not None:
            self.ready_at += tokens / self.rate


@dataclass(frozen=True)
class Plan:
    """One backend's probe interval as a budget leaves it, and why it differs from the config's."""

    interval_s: float
    why: str | None = None  # "interval stretched to 90 s by ..."; None when not stretched


def own_interval(interval_s: float, tokens_per_probe: float, tokens_per_hour: float | None) -> Plan:
    """A backend's interval under its own probe_tokens_per_hour."""
    if tokens_per_hour is None:
        return Plan(interval_s)
    needed = HOUR_S * tokens_per_probe / tokens_per_hour
    if needed <= interval_s:
        return Plan(interval_s)
    return Plan(needed, f"interval stretched to {needed:.0f} s by its probe_tokens_per_hour ({tokens_per_hour:g})")


def fleet_stretch(demands: list[tuple[float, float]], tokens_per_hour: float | None) -> float:
    """The factor (1 or more) every probing backend's interval is multiplied by so that the fleet's
    planned spend, sum of tokens_per_probe * 3600 / interval over (interval, tokens_per_probe), fits."""
    if tokens_per_hour is None or not demands:
        return 1.0
    planned = sum(HOUR_S * tokens / interval for interval, tokens in demands if interval > 0)
    return max(1.0, planned / tokens_per_hour)


def stretched(plan: Plan, factor: float, tokens_per_hour: float) -> Plan:
    if factor <= 1.0:
        return plan
    interval = plan.interval_s * factor
    return Plan(interval, f"interval stretched to {interval:.0f} s by the fleet budget ({tokens_per_hour:g} tokens/h)")
