"""How many CPU threads training uses: the physical cores it may run on, one fewer while other processes
keep them busy.

Torch's intra-op threads wait for each other at the end of every operation, so one of them pre-empted
stalls all the others. With 2 threads on 2 cores, a browser watching the run with a third of a core cost
training ~45% of its speed (`bench/ui_vs_cli.py`); one thread beside the browser lost ~15%. So while the
machine's other processes and this one's threads want more cores than there are, training runs on one
thread fewer, and goes back to all of them once the others have quietened.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import psutil
import torch

CHECK_EVERY_S = 2.0
STEP_ASIDE_ABOVE = 0.2   # cores wanted beyond the machine's, before a thread steps aside
COME_BACK_BELOW = 0.1    # the others' spare margin needed before it comes back


def allowed_cpus() -> list[int] | None:
    """The logical CPUs this process may run on (what a container or `taskset` allows); None where the
    platform cannot tell."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def usable_cores() -> int:
    """Physical cores this process may run on. A core's second hyperthread adds nothing to torch's matrix
    products and its threads then stall each other (torch's own default is the physical cores)."""
    cpus = allowed_cpus()
    allowed = len(cpus) if cpus else (os.cpu_count() or 1)
    physical, logical = psutil.cpu_count(logical=False), psutil.cpu_count()
    if physical and logical and physical < logical:
        allowed = allowed * physical // logical
    return max(1, allowed)


class ThreadShare:
    """Call `check()` from the training loop's own thread, once per step: the thread count that torch sets
    belongs to the thread that sets it."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.full = torch.get_num_threads()
        self.cpus = allowed_cpus()
        self.cores = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        self.process = psutil.Process()
        self.last = None

    def check(self) -> None:
        if self.full < 2:
            return
        now = time.monotonic()
        if self.last is not None and now - self.last[0] < CHECK_EVERY_S:
            return
        busy, own = self._busy_seconds(), self._own_seconds()
        if self.last is not None:
            last_time, last_busy, last_own = self.last
            others = max(0.0, (busy - last_busy) - (own - last_own)) / (now - last_time)  # cores in use
            threads = torch.get_num_threads()
            if threads == self.full and others + threads > self.cores + STEP_ASIDE_ABOVE:
                torch.set_num_threads(threads - 1)
                self.log(f"Other processes keep {others:.1f} cores busy: training on {threads - 1} of "
                         f"{self.full} threads until they quieten.")
            elif threads < self.full and others + self.full < self.cores + COME_BACK_BELOW:
                torch.set_num_threads(self.full)
                self.log(f"The CPU is free again: training on {self.full} threads.")
        self.last = (now, busy, own)

    def _busy_seconds(self) -> float:
        """CPU time spent by anything on the cores this process may use (time stolen by a hypervisor and
        time waiting for disks excluded: neither is a process here competing for a core)."""
        per_cpu = psutil.cpu_times(percpu=True)
        chosen = [per_cpu[i] for i in self.cpus if i < len(per_cpu)] if self.cpus else per_cpu
        return sum(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) for t in chosen)

    def _own_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system
