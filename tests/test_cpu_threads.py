"""One OpenMP pool at a time: a thread that hands its computing over releases its OpenMP workers."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from utils.cpu_threads import release_openmp_pool

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")


def threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work() -> None:
    x = torch.randn(512, 512)
    for _ in range(3):
        x = torch.tanh(x @ x) + 1.0  # matmul and elementwise ops over 262,144 values: both run in parallel


def test_release_frees_the_calling_threads_workers_and_the_next_region_builds_them_again():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel_work()
        with_pool = threads_now()
        assert release_openmp_pool()
        assert threads_now() < with_pool  # the main thread's worker is gone
        parallel_work()
        assert threads_now() == with_pool  # and comes back with the next parallel region
    finally:
        torch.set_num_threads(old)


def test_a_helper_thread_that_releases_leaves_no_workers_behind():
    """What the server's embedding thread does after each call: its pool goes, the caller's stays."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel_work()
        before = threads_now()
        done = threading.Event()
        counts = []

        def helper():
            torch.set_num_threads(2)
            parallel_work()
            counts.append(threads_now())  # this thread and its own worker on top of the caller's
            counts.append(release_openmp_pool())
            counts.append(threads_now())
            done.set()

        t = threading.Thread(target=helper)
        t.start()
        assert done.wait(60)
        t.join()
        with_helper, released, after_release = counts
        assert released
        assert with_helper >= before + 2 and after_release == with_helper - 1
        deadline = time.monotonic() + 5  # join returns a moment before the OS thread is gone
        while threads_now() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threads_now() == before
    finally:
        torch.set_num_threads(old)


def test_starting_a_request_queue_hands_the_callers_workers_over():
    """The server's thread that loaded the model starts the scheduler: its OpenMP workers go, so that the scheduler's
    thread (which decodes) keeps the only pool."""
    from utils.serving.scheduling import RequestQueue

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel_work()
        with_pool = threads_now()
        q = RequestQueue(embed_ahead=False)
        q.start(lambda: None)  # a scheduler loop that ends at once
        q.stop(10)
        deadline = time.monotonic() + 5
        while threads_now() != with_pool - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threads_now() == with_pool - 1
    finally:
        torch.set_num_threads(old)
