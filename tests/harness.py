"""A carebridge deployment for tests: its own ./var, real processes, captured logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from db.engine import Database
from tests.peers import free_port, wait_for_port

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379"


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"carebridge_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_broker() -> Iterator[str]:
    """A Redis database number of its own for one test, flushed before and after."""
    import redis

    number = 1 + (os.getpid() + int(time.time())) % 14
    url = f"{REDIS_URL}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()


class Carebridge:
    """carebridge under test: environment, CLI, listener and worker processes, logs."""

    def __init__(self, root: Path, models_dir: Path, **settings: Any) -> None:
        self.root = root
        self.logs_dir = root / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = int(settings.pop("dicom_port", free_port()))
        self.env = {
            key: value for key, value in os.environ.items() if not key.startswith("CAREBRIDGE_")
        }
        defaults: dict[str, Any] = {
            "database_url": f"sqlite:///{root / 'var' / 'carebridge.db'}",
            "archive_dir": root / "var" / "archive",
            "models_dir": models_dir,
            "dicom_port": self.dicom_port,
            "fhir_port": free_port(),
            "study_stable_seconds": 1,
            "sweep_interval_seconds": 0.2,
            "device": "cpu",
        }
        defaults.update(settings)
        for key, value in defaults.items():
            if value is not None:
                self.env[f"CAREBRIDGE_{key.upper()}"] = str(value)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["OMP_NUM_THREADS"] = "1"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_paths: dict[str, Path] = {}
        self._log_count = 0
        self.database = Database(self.env["CAREBRIDGE_DATABASE_URL"])

    # Commands -------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run ``carebridge ARGS`` with this deployment's environment."""
        result = subprocess.run(
            [sys.executable, "-m", "listeners.cli", *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self._log_count += 1
        (self.logs_dir / f"cli-{self._log_count}.log").write_text(result.stdout + result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                f"carebridge {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def upgrade(self) -> None:
        self.cli("db", "upgrade")

    def start(self, *, worker: bool = True) -> None:
        """Migrate, then start the listener (with its sweeper) and, by default, a worker."""
        self.upgrade()
        self.start_listener()
        if worker:
            self.start_worker()

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self._log_count += 1
        path = self.logs_dir / f"{name}-{self._log_count}.log"
        self.log_paths[name] = path
        log = path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "listeners.cli", *args],
            env=self.env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = proc
        return proc

    def start_listener(self) -> subprocess.Popen[bytes]:
        proc = self._spawn("listener", "listen-dicom", "--log-level", "DEBUG")
        wait_for_port("127.0.0.1", self.dicom_port, timeout=60, proc=proc)
        return proc

    @property
    def fhir_url(self) -> str:
        return f"http://127.0.0.1:{self.env['CAREBRIDGE_FHIR_PORT']}"

    def start_fhir(self) -> subprocess.Popen[bytes]:
        """The FHIR webhook (``listen-fhir``); the sweeper runs in the DICOM listener."""
        proc = self._spawn("fhir", "listen-fhir", "--log-level", "DEBUG")
        wait_for_port("127.0.0.1", int(self.env["CAREBRIDGE_FHIR_PORT"]), timeout=60, proc=proc)
        return proc

    def start_worker(self, queues: str = "gpu,cpu,deliver") -> subprocess.Popen[bytes]:
        proc = self._spawn("worker", "worker", "--queues", queues, "--log-level", "DEBUG")
        path = self.log_paths["worker"]
        wait_until(
            lambda: proc.poll() is not None or " ready." in path.read_text(errors="replace"),
            timeout=90,
            what="the worker to be ready",
        )
        if proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{path.read_text(errors='replace')}")
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process and all its children (the whole session)."""
        proc = self.processes.pop(name)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(30)

    def stop(self) -> None:
        for name in list(self.processes):
            proc = self.processes[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    with suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            self.processes.pop(name)
        self.database.dispose()

    def __enter__(self) -> Carebridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Observations ---------------------------------------------------------------------

    def logs(self) -> str:
        """Everything every process of this deployment logged so far."""
        return "\n".join(
            path.read_text(errors="replace") for path in sorted(self.logs_dir.glob("*.log"))
        )

    def audit_show(self, study_instance_uid: str) -> dict[str, Any]:
        result = self.cli("audit", "show", study_instance_uid, "--json")
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def scalar(self, sql: str, **params: Any) -> Any:
        from sqlalchemy import text

        with self.database.engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()
