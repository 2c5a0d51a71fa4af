"""Real DICOM peers for tests: an Orthanc PACS, dcmtk's storescp/storescu/echoscu, dciodvfy.

Plain helpers (no fixtures here). Everything binds or talks to loopback ports chosen at run
time. The external programs come from the Debian packages ``orthanc``, ``dcmtk`` and
``dicom3tools``; :func:`missing_tools` lets a test skip with a clear reason where they are
not installed.

Orthanc 1.10 has no option to choose its bind address: it listens on all interfaces, on
the free ports picked here, with HTTP restricted to loopback clients
(``RemoteAccessAllowed: false``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

LOOPBACK = "127.0.0.1"
DCMTK_TIMEOUT_S = 120


def free_port() -> int:
    """Return a TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def missing_tools(*names: str) -> list[str]:
    """Return the executables among ``names`` that are not on PATH (Orthanc is also
    looked up in /usr/sbin, where Debian installs it)."""
    return [name for name in names if _which(name) is None]


def wait_for_port(host: str, port: int, timeout: float = 20.0, proc: Any = None) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and name == "Orthanc" and os.access("/usr/sbin/Orthanc", os.X_OK):
        found = "/usr/sbin/Orthanc"
    return found


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def _stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Terminate one child process by its PID, then kill it if it does not exit."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------- Orthanc


class OrthancPeer:
    """An Orthanc server in ``workdir`` with its own config, storage and free ports.

    Use as a context manager::

        with OrthancPeer(tmp_path / "orthanc", {"CAREBRIDGE": ("CAREBRIDGE", host, port)}) as pacs:
            pacs.upload(path)
            pacs.send_study_to_modality(study_id, "CAREBRIDGE")
    """

    def __init__(
        self,
        workdir: Path,
        modalities: Mapping[str, Sequence[str | int]] | None = None,
        *,
        aet: str = "ORTHANC",
        name: str = "carebridge-test-orthanc",
        stable_age: int = 1,
        start_timeout: float = 30.0,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Prepare (not start) Orthanc; ``modalities`` maps a name to (AE, host, port)."""
        self.workdir = Path(workdir)
        self.modalities = {key: list(value) for key, value in (modalities or {}).items()}
        self.aet = aet
        self.name = name
        self.stable_age = stable_age
        self.start_timeout = start_timeout
        self.extra_config = dict(extra_config or {})
        self.host = LOOPBACK
        self.http_port = 0
        self.dicom_port = 0
        self.config_path = self.workdir / "config.json"
        self.log_path = self.workdir / "orthanc.log"
        self.session = requests.Session()
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        """PID of the running Orthanc process, if any."""
        return self._proc.pid if self._proc is not None else None

    def config(self) -> dict[str, Any]:
        """The configuration written to ``config.json`` (ports must be set first)."""
        config: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpDescribeErrors": True,
            "HttpTimeout": 30,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomScuTimeout": 10,
            "DicomScpTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": self.modalities,
            "OverwriteInstances": True,
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "StorageCompression": False,
            "ExecuteLuaEnabled": False,
        }
        config.update(self.extra_config)
        return config

    def start(self) -> OrthancPeer:
        """Write the config and start Orthanc; return once its REST API answers."""
        binary = _which("Orthanc")
        if binary is None:
            raise RuntimeError("Orthanc is not installed (Debian package 'orthanc')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(3):  # a picked port can be taken before Orthanc binds it
            self.http_port, self.dicom_port = free_port(), free_port()
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [binary, str(self.config_path)],
                    cwd=self.workdir,
                    env=_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                self._wait_ready()
                return self
            except RuntimeError as exc:
                last_error = str(exc)
                _stop(self._proc)
                self._proc = None
        raise RuntimeError(f"Orthanc did not start: {last_error}\n{_tail(self.log_path)}")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}")
            with contextlib.suppress(requests.RequestException):
                if self.session.get(f"{self.url}/system", timeout=2).ok:
                    wait_for_port(self.host, self.dicom_port, timeout=5, proc=self._proc)
                    return
            time.sleep(0.2)
        raise RuntimeError(f"GET /system did not answer within {self.start_timeout:.0f} s")

    def stop(self) -> None:
        """Stop the Orthanc process started by :meth:`start` (by its PID)."""
        self.session.close()
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None

    def __enter__(self) -> OrthancPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST API

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        response = self.session.request(method, f"{self.url}{path}", **kwargs)
        if not response.ok:
            raise RuntimeError(
                f"Orthanc {method} {path} -> HTTP {response.status_code}: {response.text[:500]}"
            )
        return response

    def system(self) -> dict[str, Any]:
        """GET /system (name, version, AET, ports)."""
        return dict(self._request("GET", "/system").json())

    def upload(self, data: Path | str | bytes) -> dict[str, Any]:
        """Store one DICOM file (a path or its bytes) with POST /instances."""
        body = data if isinstance(data, bytes) else Path(data).read_bytes()
        response = self._request(
            "POST", "/instances", data=body, headers={"Content-Type": "application/dicom"}
        )
        return dict(response.json())

    def studies(self) -> list[str]:
        """Orthanc identifiers of all stored studies."""
        return list(self._request("GET", "/studies").json())

    def study(self, orthanc_study_id: str) -> dict[str, Any]:
        """GET /studies/{id} (MainDicomTags, Series, ...)."""
        return dict(self._request("GET", f"/studies/{orthanc_study_id}").json())

    def study_instances(self, orthanc_study_id: str) -> list[dict[str, Any]]:
        """The instances of a study, expanded (ID, MainDicomTags, ParentSeries, ...)."""
        return list(self._request("GET", f"/studies/{orthanc_study_id}/instances").json())

    def find_instances_by_study_uid(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Instances whose StudyInstanceUID is the given one (POST /tools/find, expanded)."""
        query = {
            "Level": "Instance",
            "Query": {"StudyInstanceUID": study_instance_uid},
            "Expand": True,
        }
        return list(self._request("POST", "/tools/find", json=query).json())

    def wait_for_instances(
        self, study_instance_uid: str, count: int = 1, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Poll until the study has at least ``count`` instances; return them."""
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            found = self.find_instances_by_study_uid(study_instance_uid)
            if len(found) >= count:
                return found
            time.sleep(0.25)
        raise TimeoutError(
            f"Orthanc holds {len(found)} of {count} expected instances after {timeout:.0f} s"
        )

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of an instance, byte for byte."""
        return self._request("GET", f"/instances/{orthanc_id}/file").content

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """GET /instances/{id}/simplified-tags (keyword -> value)."""
        return dict(self._request("GET", f"/instances/{orthanc_id}/simplified-tags").json())

    def delete_study(self, orthanc_study_id: str) -> None:
        """DELETE /studies/{id}."""
        self._request("DELETE", f"/studies/{orthanc_study_id}")

    def send_study_to_modality(
        self, orthanc_study_id: str, modality_name: str, synchronous: bool = True
    ) -> dict[str, Any]:
        """C-STORE a study to a declared modality (POST /modalities/{name}/store).

        Synchronous: returns once the transfer ended (Orthanc answers an error if it
        failed); otherwise returns the job (ID, Path) at once.
        """
        body = {"Resources": [orthanc_study_id], "Synchronous": synchronous}
        return dict(self._request("POST", f"/modalities/{modality_name}/store", json=body).json())

    def echo(self, modality_name: str, timeout: int = 10) -> bool:
        """C-ECHO a declared modality; True when it answered."""
        response = self.session.post(
            f"{self.url}/modalities/{modality_name}/echo",
            json={"Timeout": timeout},
            timeout=timeout + 30,
        )
        return response.ok

    def add_modality(self, name: str, ae: str, host: str, port: int) -> None:
        """Declare (or replace) a modality at run time (PUT /modalities/{name})."""
        self._request("PUT", f"/modalities/{name}", json={"AET": ae, "Host": host, "Port": port})
        self.modalities[name] = [ae, host, port]

    def list_modalities(self) -> list[str]:
        """Names of the declared modalities."""
        return list(self._request("GET", "/modalities").json())


# ------------------------------------------------------------------------------ dcmtk


class StoreSCP:
    """dcmtk ``storescp`` on a free loopback port, writing what it receives to ``outdir``.

    Accepts every transfer syntax dcmtk knows and writes the data set as received
    (``+B``). Use as a context manager; :meth:`files` lists what arrived.
    """

    def __init__(
        self,
        outdir: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        refuse: bool = False,
    ) -> None:
        """Prepare (not start) the SCP; ``refuse`` rejects every association (permanent)."""
        self.outdir = Path(outdir)
        self.aet = aet
        self.refuse = refuse
        self.host = LOOPBACK
        self.port = port or free_port()
        self.log_path = self.outdir.parent / f"{self.outdir.name}.storescp.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        """Start storescp and wait until it accepts connections."""
        if _which("storescp") is None:
            raise RuntimeError("storescp is not installed (Debian package 'dcmtk')")
        self.outdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                ["storescp", "-aet", self.aet, "-od", str(self.outdir), "+xa", "+B",
                 "-fe", ".dcm", *(["--refuse"] if self.refuse else []), str(self.port)],
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_for_port(self.host, self.port, timeout=20, proc=self._proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"storescp did not start: {exc}\n{_tail(self.log_path)}") from exc
        return self

    def stop(self) -> None:
        """Stop the storescp process (by its PID)."""
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None

    def files(self) -> list[Path]:
        """Received files, sorted."""
        return sorted(p for p in self.outdir.rglob("*") if p.is_file())

    def wait_for_files(self, count: int = 1, timeout: float = 30.0) -> list[Path]:
        """Poll until at least ``count`` files arrived; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.files()
            if len(found) >= count:
                return found
            time.sleep(0.2)
        raise TimeoutError(f"storescp received {len(self.files())} of {count} files")

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def storescu(
    host: str,
    port: int,
    paths: Iterable[Path | str],
    *,
    calling_ae: str,
    called_ae: str,
    extra_args: Sequence[str] = (),
    required: bool = True,
    timeout: float = DCMTK_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Send files or folders with dcmtk ``storescu``; the caller checks ``returncode``.

    ``required`` (``-R``) proposes only the SOP classes of the files, which SR and SEG
    need (they are not in storescu's default list). Folders are scanned recursively
    (``+sd +r``).
    """
    path_args = [str(p) for p in paths]
    args = ["storescu", "-aet", calling_ae, "-aec", called_ae]
    if required:
        args.append("-R")
    if any(Path(p).is_dir() for p in path_args):
        args += ["+sd", "+r"]
    args += [*extra_args, host, str(port), *path_args]
    return subprocess.run(
        args, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def echoscu(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    extra_args: Sequence[str] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO with dcmtk ``echoscu``; ``returncode`` 0 means the peer answered."""
    args = ["echoscu", "-aet", calling_ae, "-aec", called_ae, *extra_args, host, str(port)]
    return subprocess.run(
        args, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


# ------------------------------------------------------------------------- dicom3tools


def run_dciodvfy(path: Path | str, *, timeout: float = 120) -> list[str]:
    """Validate a DICOM file with dicom3tools' ``dciodvfy``; return its "Error" lines.

    dciodvfy reports on stderr; warnings are not returned. An empty list means no error.
    """
    result = subprocess.run(
        ["dciodvfy", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    lines = (result.stderr + "\n" + result.stdout).splitlines()
    return [line for line in lines if line.startswith("Error")]
