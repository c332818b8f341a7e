"""Admission of explanations (serving.admission): places are given back whatever happens to the caller,
the concurrency is what it says, and a caller that stops waiting stops the work behind it."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.admission import Admission, Busy, TimedOut


def _run(coroutine):
    return asyncio.run(coroutine)


def _waiting_job(started: threading.Event, release: threading.Event):
    """A job that says it started, then works in small steps until released or told to stop."""

    def job(stop: threading.Event) -> str:
        started.set()
        while not release.wait(0.01):
            if stop.is_set():
                return "stopped"
        return "done"

    return job


async def _settle(admission: Admission, value: int = 0, seconds: float = 5) -> None:
    for _ in range(int(seconds / 0.01)):
        if admission.admitted == value:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"admitted stayed at {admission.admitted}, expected {value}")


def test_a_cancelled_running_job_is_told_to_stop_and_gives_its_place_back():
    async def scenario():
        pool = ThreadPoolExecutor(1)
        admission = Admission(1, 0, 30, pool)
        started, release = threading.Event(), threading.Event()
        stopped = []
        job = _waiting_job(started, release)
        task = asyncio.create_task(admission.run(lambda stop: stopped.append(job(stop)) or stopped[-1]))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # Ray's request timeout, or the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await _settle(admission)
        assert stopped == ["stopped"]
        assert await admission.run(lambda stop: "next") == "next"  # the place is free again

    _run(scenario())


def test_a_cancelled_waiting_job_never_runs_and_leaks_nothing():
    async def scenario():
        admission = Admission(1, 5, 30, ThreadPoolExecutor(1))
        started, release = threading.Event(), threading.Event()
        first = asyncio.create_task(admission.run(_waiting_job(started, release)))
        while not started.is_set():
            await asyncio.sleep(0.01)
        ran = []
        waiting = [asyncio.create_task(admission.run(lambda stop: ran.append(1))) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert admission.admitted == 6
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert admission.admitted == 1
        release.set()
        assert await first == "done"
        await _settle(admission)
        assert ran == []

    _run(scenario())


def test_a_job_past_its_time_limit_times_out_stops_and_frees_its_place():
    async def scenario():
        admission = Admission(1, 0, 0.2, ThreadPoolExecutor(1))
        started, release = threading.Event(), threading.Event()
        with pytest.raises(TimedOut):
            await admission.run(_waiting_job(started, release))
        await _settle(admission)
        assert await admission.run(lambda stop: stop.is_set()) is False

    _run(scenario())


def test_beyond_running_plus_waiting_it_is_busy_and_five_cancellations_do_not_make_it_busy():
    async def scenario():
        admission = Admission(1, 1, 30, ThreadPoolExecutor(1))
        for _ in range(5):  # the leak the issue describes: five cancelled requests, then 429 forever
            started, release = threading.Event(), threading.Event()
            task = asyncio.create_task(admission.run(_waiting_job(started, release)))
            while not started.is_set():
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await _settle(admission)
        started, release = threading.Event(), threading.Event()
        running = asyncio.create_task(admission.run(_waiting_job(started, release)))
        queued = asyncio.create_task(admission.run(lambda stop: "queued"))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await admission.run(lambda stop: "third")
        release.set()
        assert (await running, await queued) == ("done", "queued")

    _run(scenario())


@pytest.mark.parametrize("running", [1, 2])
def test_running_is_how_many_jobs_run_at_once(running):
    async def scenario():
        admission = Admission(running, 5, 30, ThreadPoolExecutor(4))
        barrier = threading.Barrier(2, timeout=0.5)

        def job(stop):
            try:
                barrier.wait()  # passes only when two jobs run at the same time
                return "together"
            except threading.BrokenBarrierError:
                return "alone"

        return await asyncio.gather(admission.run(job), admission.run(job))

    results = _run(scenario())
    assert results == (["together", "together"] if running == 2 else ["alone", "alone"])
