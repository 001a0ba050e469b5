"""Shared test set-up: every test session gets its own workspace, so tests never touch ./workspace.

The tiny presets are materialised once per session inside it and reused by every test.
"""

import os
import sys
from pathlib import Path

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
