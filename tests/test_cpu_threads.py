"""One OpenMP pool at a time: a thread that hands its computing over releases its OpenMP workers.

Threads are told apart by their ids (``/proc/self/task``), so that other threads of the test process starting or
ending meanwhile do not count."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from utils.cpu_threads import release_openmp_pool

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread ids from /proc (Linux)")


def tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def parallel_work() -> None:
    x = torch.randn(512, 512)
    for _ in range(3):
        x = torch.tanh(x @ x) + 1.0  # matmul and elementwise ops over 262,144 values: both run in parallel


def eventually(check, seconds: float = 5.0) -> bool:
    """``check()`` polled until true (a joined thread leaves /proc a moment after ``join`` returns)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_release_frees_the_calling_threads_workers_and_the_next_region_builds_them_again(two_threads):
    parallel_work()
    with_pool = tids()
    assert release_openmp_pool()
    released = tids()
    assert with_pool - released  # the main thread's worker is gone
    parallel_work()
    assert tids() - released  # and a new one comes with the next parallel region


def test_a_helper_thread_that_releases_leaves_no_workers_behind(two_threads):
    """What the server's embedding thread does after each call: its pool goes, the caller's stays."""
    parallel_work()
    before = tids()
    seen = {}

    def helper():
        torch.set_num_threads(2)
        parallel_work()
        seen["with_pool"] = tids()
        seen["released"] = release_openmp_pool()
        seen["after"] = tids()

    t = threading.Thread(target=helper)
    t.start()
    t.join(60)
    assert seen["released"]
    workers = seen["with_pool"] - seen["after"]
    assert workers and not workers & before  # the helper's own workers went, none of the caller's
    assert eventually(lambda: not (tids() - before))  # nothing the helper started is left


def test_starting_a_request_queue_hands_the_callers_workers_over(two_threads):
    """The server's thread that loaded the model starts the scheduler: its OpenMP workers go, so that the scheduler's
    thread (which decodes) keeps the only pool."""
    from utils.serving.scheduling import RequestQueue

    parallel_work()
    with_pool = tids()
    q = RequestQueue(embed_ahead=False)
    q.start(lambda: None)  # a scheduler loop that ends at once
    q.stop(10)
    assert eventually(lambda: not (tids() - with_pool))  # the scheduler's thread has gone
    assert with_pool - tids()  # and so has the main thread's worker
