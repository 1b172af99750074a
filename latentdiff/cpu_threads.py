"""How many CPU threads a CPU training run should use on cores that other processes may keep busy.

PyTorch starts one thread per core. When other processes hold some cores, the threads that land there wait, and
every step waits for the slowest: on 2 shared cores the demo took 7–12 s a step with two threads, against 0.68 s
with one (and 0.44 s with two on idle cores). So the run takes only the cores that are free now.

"Now" is the count of runnable threads in `/proc/loadavg` (Linux), sampled for a fraction of a second: the load
average lags about a minute behind, so right after `make setup` or a test run it still calls idle cores busy.
"""

import logging
import os
import statistics
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOADAVG = Path("/proc/loadavg")


def runnable_elsewhere(samples: int = 10, interval_s: float = 0.05) -> float | None:
    """The median number of threads, machine-wide, that are running or waiting for a core, besides the one that
    reads; None where the kernel does not say (not Linux, no /proc)."""
    counts = []
    try:
        for _ in range(samples):
            counts.append(int(LOADAVG.read_text().split()[3].split("/")[0]) - 1)  # "3/83": 3 runnable of 83
            time.sleep(interval_s)
    except (OSError, ValueError, IndexError):
        return None
    return statistics.median(counts)


def threads_for_free_cores(threads: int, cores: int, busy: float) -> int:
    """`threads`, lowered to the cores that `busy` runnable threads of other processes leave free (at least one)."""
    return max(1, min(threads, cores - round(busy)))


def use_free_cores() -> None:
    """Lower torch's CPU threads to the cores that other processes leave free; `OMP_NUM_THREADS`, when set, decides
    instead, and a machine with a GPU keeps its threads (they only feed the GPU)."""
    import torch

    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available() or torch.get_num_threads() == 1:
        return
    busy = runnable_elsewhere()
    if busy is None:
        return
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    fewer = threads_for_free_cores(threads, cores, busy)
    if fewer < threads:
        torch.set_num_threads(fewer)
        logger.warning(
            "Other processes keep %d of %d cores busy: training with %d thread(s) instead of %d, which is faster "
            "then (set OMP_NUM_THREADS to choose).", round(busy), cores, fewer, threads,
        )  # fmt: skip
