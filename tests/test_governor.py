"""The probe governor: opens on a punctual event loop, closes on a late one, never past its cap."""

import asyncio
import time

from llmtop.governor import Governor


async def test_grows_while_the_loop_is_punctual_and_saturated():
    gov = Governor(cap=100, start=8)
    gov.in_flight = 8
    gov.adjust(0.0005)
    assert gov.allowed == 12
    gov.in_flight = 12
    for _ in range(20):
        gov.in_flight = gov.allowed
        gov.adjust(0.0005)
    assert gov.allowed == 100  # never past the cap


async def test_does_not_grow_when_not_using_what_it_has():
    gov = Governor(cap=100, start=32)
    gov.in_flight = 3
    gov.adjust(0.0001)
    assert gov.allowed == 32


async def test_shrinks_when_the_loop_runs_late_but_keeps_a_floor():
    gov = Governor(cap=500, start=100)
    gov.adjust(0.010)
    assert gov.allowed == 70
    for _ in range(30):
        gov.adjust(0.050)
    assert gov.allowed == 4


async def test_admits_no_more_than_allowed_and_releases_waiters():
    gov = Governor(cap=2, start=2)
    running, peak = 0, 0

    async def probe():
        nonlocal running, peak
        async with gov:
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1

    await asyncio.wait_for(asyncio.gather(*(probe() for _ in range(7))), 2)
    assert peak == 2 and gov.in_flight == 0
    await gov.close()


async def test_a_busy_loop_closes_the_gate():
    gov = Governor(cap=64, start=64)
    decided = asyncio.Event()
    adjust = gov.adjust

    def spy(lag_p90: float) -> None:
        adjust(lag_p90)
        decided.set()

    gov.adjust = spy

    async def hog():
        # Block the loop ~10 ms at a time until the sampler has taken its first decision. Hogging for
        # a fixed 0.4 s instead left the number of samples to the CPU: on a loaded core fewer than
        # ADJUST_EVERY were taken and the gate was never judged at all. The blocking is measured on
        # the clock, not in work, so a fast CPU blocks as long as a slow one.
        deadline = time.monotonic() + 30  # outer bound only: a decision comes within ~0.5 s
        while not decided.is_set():
            assert time.monotonic() < deadline, "the sampler never took a decision"
            end = time.perf_counter() + 0.010
            while time.perf_counter() < end:
                pass  # no yielding: every timer fires late
            await asyncio.sleep(0)

    async with gov:
        await hog()
    assert gov.allowed < 64
    await gov.close()


async def test_waiters_are_admitted_in_arrival_order_one_wake_up_each():
    gov = Governor(cap=1, start=1)
    order = []
    release = asyncio.Event()

    async def holder():
        async with gov:
            await release.wait()

    async def waiter(i):
        async with gov:
            order.append(i)
            await asyncio.sleep(0)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(waiter(i)) for i in range(20)]
    await asyncio.sleep(0)
    assert len(gov._waiters) == 20
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *tasks), 2)
    assert order == list(range(20))
    assert gov.in_flight == 0 and not gov._waiters
    await gov.close()


async def test_a_cancelled_waiter_does_not_keep_a_slot():
    gov = Governor(cap=1, start=1)
    release = asyncio.Event()

    async def holder():
        async with gov:
            await release.wait()

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    queued = asyncio.create_task(gov.__aenter__())
    await asyncio.sleep(0)
    queued.cancel()
    release.set()
    await first
    await asyncio.gather(queued, return_exceptions=True)
    assert gov.in_flight == 0
    async with gov:  # the slot is free again, at once
        assert gov.in_flight == 1
    await gov.close()


async def test_a_lowered_cap_lowers_what_is_allowed():
    gov = Governor(cap=64, start=32)
    gov.set_cap(8)
    assert gov.allowed == 8 and gov.cap == 8
    await gov.close()
