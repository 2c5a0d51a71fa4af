"""Shared fixtures: a tiny trained CXR model, deployments, real peers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.engine import Database
from db.migrate import upgrade
from tests.harness import Carebridge
from tests.peers import OrthancPeer

os.environ.setdefault("TCP_NODELAY", "1")


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite database migrated to head once per session, for tests to copy."""
    path = tmp_path_factory.mktemp("template") / "carebridge.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def database(tmp_path: Path, migrated_template: Path) -> Iterator[Database]:
    """A migrated SQLite database of this test's own (a copy of a migrated template)."""
    path = tmp_path / "carebridge.db"
    shutil.copy(migrated_template, path)
    database = Database(f"sqlite:///{path}")
    yield database
    database.dispose()


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
