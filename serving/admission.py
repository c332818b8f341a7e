"""Admission of long work (explanations) on a replica: a few at a time, a few more waiting, each within a
time limit, and a place that is always given back, whatever happens to the request that held it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


class Busy(Exception):
    """Too many are running or waiting already."""


class TimedOut(Exception):
    """The work did not finish within the time limit (it has been asked to stop)."""


class Admission:
    """At most `running` jobs at a time on `executor`, `waiting` more queued (beyond that: Busy), each given
    `timeout_s` from admission (then TimedOut). A job gets a `threading.Event` it should check between its
    steps: it is set when the caller stops waiting (time limit, cancellation, client gone), so the thread
    stops early and frees its place. The place is given back when the thread has really finished."""

    def __init__(self, running: int, waiting: int, timeout_s: float, executor: Executor):
        self.running, self.waiting, self.timeout_s, self.executor = running, waiting, timeout_s, executor
        self._slots = asyncio.Semaphore(running)
        self.admitted = 0  # running or waiting, not finished

    async def run(self, job: Callable[[threading.Event], T]) -> T:
        if self.admitted >= self.running + self.waiting:
            raise Busy(f"{self.admitted} are in progress")
        self.admitted += 1
        stop = threading.Event()
        deadline = time.monotonic() + self.timeout_s
        handed_over = False  # once the thread runs, its completion gives the place back
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise TimedOut(f"no place within {self.timeout_s:g} s") from None
            try:
                work = asyncio.get_running_loop().run_in_executor(self.executor, job, stop)
            except BaseException:
                self._slots.release()
                raise
            work.add_done_callback(self._finished)
            handed_over = True
            try:
                return await asyncio.wait_for(asyncio.shield(work), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                stop.set()
                raise TimedOut(f"not finished within {self.timeout_s:g} s") from None
            except BaseException:  # cancelled: the request timed out at Ray's end or the client went away
                stop.set()
                raise
        finally:
            if not handed_over:
                self.admitted -= 1

    def _finished(self, work: asyncio.Future) -> None:
        self._slots.release()
        self.admitted -= 1
        if not work.cancelled():
            work.exception()  # retrieved: a job nobody waits for any more may have failed
