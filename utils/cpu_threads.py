"""Stage support: one OpenMP thread pool at a time for the threads that compute on CPU.

PyTorch's CPU operators run in parallel through OpenMP (GNU ``libgomp`` in the Linux wheels). Every thread that starts
a parallel region gets a pool of worker threads of its own, and the pool lives as long as that thread. Between two
operators the workers spin, waiting for the next region, which is what makes a decoding step's ~1,300 small
operators cheap to start. But libgomp stops spinning almost at once (100 spins instead of 300,000) as soon as it
manages more threads than the process has CPUs; from then on every operator wakes its workers through the kernel.

A server is exactly that case: the main thread loads the model (its pool stays), and the scheduler's thread decodes
(a second pool). Measured on a 2-core Xeon with the embedded SmolLM2 in float32, one decoding step of 1 row took 40 ms
on the loading thread and 64 ms on another thread of the same process; 64 against 86 ms at 16 rows; once the loading
thread had released its pool, the other thread's step took 39 and 63 ms (``bench/profile_threads.py``,
docs/profile_threads.md).

:func:`release_openmp_pool` releases the calling thread's pool (``omp_pause_resource_all(omp_pause_soft)``, OpenMP
5.0, in libgomp since GCC 9 and in LLVM's libomp): a thread that hands its computing over to another one calls it, and
so does a helper thread after a burst of work (the server's query embedding, adapters scored in the background), so
that the threads decoding keep the only pool. The next parallel region of the releasing thread builds a new pool,
which costs a thread start (tens of microseconds), not a step's worth of wake-ups.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: omp_pause_soft (keep the runtime's state, free the threads)
RUNTIMES = ("libgomp", "libomp", "libiomp5")


_PAUSE: dict[str, object] = {}  # runtime path -> its omp_pause_resource_all, or None where it has none


def _runtimes() -> list:
    """``omp_pause_resource_all`` of every OpenMP runtime loaded in this process now: torch's, and the copies other
    wheels bundle (faiss-cpu brings its own libgomp, with pools of its own)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.rsplit(None, 1)[-1] for line in maps if "omp" in line}
    except OSError:  # not Linux: nothing to release this way
        return []
    for path in paths - _PAUSE.keys():
        name = path.rsplit("/", 1)[-1]
        _PAUSE[path] = None
        if any(name.startswith(r + ".") or name.startswith(r + "-") for r in RUNTIMES):
            try:
                pause = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError) as err:
                logger.debug("OpenMP runtime %s cannot release its threads: %s", path, err)
                continue
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            _PAUSE[path] = pause
    return [_PAUSE[p] for p in sorted(paths) if _PAUSE[p] is not None]


def release_openmp_pool() -> bool:
    """Release the calling thread's OpenMP worker threads in every OpenMP runtime loaded (module docstring). True when
    one was released; False where none can be (no OpenMP runtime found, or one older than OpenMP 5.0), which only costs
    speed."""
    return any([pause(OMP_PAUSE_SOFT) == 0 for pause in _runtimes()])
