"""The one thread a long-lived process runs torch on.

OpenMP, torch's CPU parallelism, keeps a thread team per calling thread. Once a process has a second
team, libgomp manages more threads than there are CPUs and stops spin-waiting between parallel regions.
Measured on 2 CPUs: a training that took 12.0 s on the thread that had already used torch took 18.9 s
on a second thread, and a serve replica whose batches went through asyncio's thread pool scored 36
instead of 42 images/s. Processes that would call torch from threads they do not own (a reused Ray
Tune trial actor calls each trial from a new thread; a Ray Serve replica's event loop hands work to a
pool) send that work here instead.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor


@functools.cache
def torch_thread() -> ThreadPoolExecutor:
    """This process's torch thread: one worker, created on first use, reused for the process's life."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="visionserve-torch")
