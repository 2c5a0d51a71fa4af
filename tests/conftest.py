"""Shared fixtures: a tiny trained CXR model, deployments, real peers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Carebridge
from tests.peers import OrthancPeer

os.environ.setdefault("TCP_NODELAY", "1")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODELS_DIR with every pipeline's model, made small by `carebridge models demo`."""
    directory = tmp_path_factory.mktemp("models")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
    env["CAREBRIDGE_MODELS_DIR"] = str(directory)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "listeners.cli",
            "models",
            "demo",
            "--quick",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return directory


@pytest.fixture
def deployment(tmp_path: Path, models_dir: Path) -> Iterator[Carebridge]:
    """carebridge on SQLite with the embedded broker; migrated, nothing started."""
    with Carebridge(tmp_path / "cb", models_dir) as carebridge:
        carebridge.upgrade()
        yield carebridge


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    with OrthancPeer(tmp_path / "orthanc") as peer:
        yield peer
