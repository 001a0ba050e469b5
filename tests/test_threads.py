"""Training's CPU threads step aside for a busy process on the same cores, and come back when it is gone."""

import os
import subprocess
import sys
import time

import pytest
import torch

from pipelines import threads
from pipelines.threads import ThreadShare


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_threads_step_aside_while_another_process_is_busy(monkeypatch):
    monkeypatch.setattr(threads, "CHECK_EVERY_S", 0.5)
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    torch.set_num_threads(cores)
    lines = []
    try:
        share = ThreadShare(lines.append)
        share.check()  # the first reading
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a whole core, like a busy browser
        try:
            time.sleep(1)
            share.check()
            assert torch.get_num_threads() == cores - 1
            assert f"training on {cores - 1} of {cores} threads" in lines[-1]
        finally:
            busy.kill()
            busy.wait()
        for _ in range(20):  # the machine quietens
            time.sleep(0.5)
            share.check()
            if torch.get_num_threads() == cores:
                break
        assert torch.get_num_threads() == cores
        assert lines[-1] == f"The CPU is free again: training on {cores} threads."
    finally:
        torch.set_num_threads(before)
