"""Shared test set-up: every test session gets its own workspace, so tests never touch ./workspace.

The tiny presets are materialised once per session inside it and reused by every test.
"""

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

pytest_plugins = ["tests.browser"]  # the server/browser/page fixtures


@pytest.fixture(scope="session", autouse=True)
def studio_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("workspace")
    os.environ["STUDIO_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach for the network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return home


@pytest.fixture(scope="session")
def assets() -> Path:
    return ROOT / "assets"


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(tmp_path):
    """After each test, end what is still running on that test's own files: a worker of a run in its
    workspace, a `studio train` following it. A test that failed or timed out would otherwise leave its
    worker training, taking a core from the tests after it until they miss their own timeouts."""
    yield
    mine, ended = str(tmp_path), []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid != os.getpid() and any(mine in part for part in process.info["cmdline"] or ()):
            try:
                if os.getpgid(process.pid) == process.pid:  # a worker leads its group, with any ranks it started
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
                ended.append(process)
                print(f"ended a leftover process of this test: {' '.join(process.info['cmdline'])}", file=sys.stderr)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
    psutil.wait_procs(ended, timeout=10)  # reaps those this process started
