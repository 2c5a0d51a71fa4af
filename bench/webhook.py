"""Webhook latency: time to 202 with many concurrent EHR requests.

    .venv/bin/python bench/webhook.py [--concurrency 200] [--rounds 5] [--database-url URL]
                                      [--client raw|httpx] [--processes 1,2]

Runs `carebridge listen-fhir` (embedded defaults: SQLite, filesystem broker; or the given
database) and POSTs a vitals Observation from ``--concurrency`` clients at once, ``--rounds``
times. Every request is authenticated (bearer token), validated against the FHIR R4B
models, committed with its audit event and answered 202. The reference, measured in the
same run on the same machine, is a bare uvicorn application that reads the body, parses the
JSON and answers 202 without validating or storing anything. Target: p99 < 200 ms.
``--processes`` lists the group sizes to measure (``listen-fhir --processes N``: N
processes on one port); the reference runs as one uvicorn process.
Nothing here is a pass/fail test. CPU per request is the server's CPU time from the first
request until it is quiet again (so it includes the broker hand-over done after the 202s),
divided by the requests.

The latency of a request runs from the moment its client starts it (connecting first when
no kept-alive connection is free) until the whole response is read. The default client
writes prepared HTTP/1.1 requests on asyncio streams: it costs a fraction of a millisecond
per request, so on a small machine the numbers are the servers' and not the client's;
``--client httpx`` uses httpx.AsyncClient instead (about 2.5 ms of CPU per request on 2
cores, which then dominates the reference's numbers). Requests that fail (a refused or
reset connection, a status other than 202) are counted and reported, not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.peers import free_port, wait_for_port  # noqa: E402

TOKEN = "bench-token"
OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs",
                }
            ]
        }
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
    "subject": {"reference": "Patient/bench"},
    "effectiveDateTime": "2026-11-28T10:00:00Z",
    "valueQuantity": {
        "value": 128,
        "unit": "mmHg",
        "system": "http://unitsofmeasure.org",
        "code": "mm[Hg]",
    },
}

REFERENCE_APP = textwrap.dedent(
    """
    import json
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/fhir/Observation")
    async def take(request: Request):
        json.loads(await request.body())
        return JSONResponse({"resourceType": "OperationOutcome", "issue": []}, status_code=202)
    """
)


PATH = "/fhir/Observation"
WARM_UP = 20  # requests before the timed rounds (imports, first connections)


@dataclass
class Burst:
    """Latencies (ms) of the requests answered 202, and the failures by kind."""

    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)


async def _rounds(one: Callable[[Burst], Awaitable[None]], concurrency: int, rounds: int) -> Burst:
    warm_up = Burst()
    await asyncio.gather(*(one(warm_up) for _ in range(min(concurrency, WARM_UP))))
    burst = Burst()
    for _ in range(rounds):
        await asyncio.gather(*(one(burst) for _ in range(concurrency)))
    return burst


def _request_bytes(port: int) -> bytes:
    body = json.dumps(OBSERVATION).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/fhir+json\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _burst_raw(port: int, concurrency: int, rounds: int) -> Burst:
    """Prepared HTTP/1.1 requests on asyncio streams, connections kept alive and reused."""
    request = _request_bytes(port)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one(burst: Burst) -> None:
        started = time.perf_counter()
        try:
            if idle:
                reader, writer = idle.pop()
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            burst.failures[type(exc).__name__] += 1
            return
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            fields = dict(
                (name.strip().lower(), value.strip())
                for name, _, value in (line.partition(":") for line in lines[1:] if line)
            )
            await reader.readexactly(int(fields.get("content-length", "0")))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            burst.failures[type(exc).__name__] += 1
            writer.close()
            return
        elapsed = time.perf_counter() - started
        if status != 202:
            burst.failures[f"HTTP {status}"] += 1
        else:
            burst.latencies.append(elapsed * 1000)
        if fields.get("connection", "").lower() == "close":
            writer.close()
        else:
            idle.append((reader, writer))

    try:
        return await _rounds(one, concurrency, rounds)
    finally:
        for _, writer in idle:
            writer.close()


async def _burst_httpx(port: int, concurrency: int, rounds: int) -> Burst:
    url = f"http://127.0.0.1:{port}{PATH}"
    body = json.dumps(OBSERVATION).encode()
    headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(burst: Burst) -> None:
            started = time.perf_counter()
            try:
                response = await client.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                burst.failures[type(exc).__name__] += 1
                return
            elapsed = time.perf_counter() - started
            if response.status_code != 202:
                burst.failures[f"HTTP {response.status_code}"] += 1
            else:
                burst.latencies.append(elapsed * 1000)

        return await _rounds(one, concurrency, rounds)


CLIENTS: dict[str, Callable[[int, int, int], Coroutine[Any, Any, Burst]]] = {
    "raw": _burst_raw,
    "httpx": _burst_httpx,
}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _serve(
    args: list[str], env: dict[str, str], port: int, log: Path, ready: str | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as stream:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)
    wait_for_port("127.0.0.1", port, timeout=60, proc=proc)
    deadline = time.monotonic() + 120
    while ready is not None and ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not get ready: see {log}")
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _group(pid: int) -> list[int]:
    """The process and its children (a listen-fhir group), from Linux /proc."""
    pids = [pid]
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids += [int(child) for child in children.read_text().split()]
        except OSError:
            continue
    return pids


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process and its children so far (Linux /proc), None
    elsewhere."""
    total = 0.0
    for member in _group(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            if member == pid:
                return None
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


QUIET_S = 0.5  # no more than QUIET_CPU_S of CPU for this long: the server is done
QUIET_CPU_S = 0.02
QUIET_WAIT_S = 30.0


def _cpu_seconds_once_quiet(pid: int) -> float | None:
    """CPU time once the server is quiet again: work it defers past its answers (handing
    the events to the broker) is part of what the requests cost."""
    last = _cpu_seconds(pid)
    deadline = time.monotonic() + QUIET_WAIT_S
    while last is not None and time.monotonic() < deadline:
        time.sleep(QUIET_S)
        now = _cpu_seconds(pid)
        if now is None or now - last <= QUIET_CPU_S:
            return now
        last = now
    return last


@dataclass
class Result:
    """One server's burst and the CPU time it spent on it (per request, ms)."""

    burst: Burst
    cpu_ms_per_request: float | None


def _measure(
    proc: subprocess.Popen[bytes], port: int, client: str, concurrency: int, rounds: int
) -> Result:
    before = _cpu_seconds(proc.pid)
    burst = asyncio.run(CLIENTS[client](port, concurrency, rounds))
    after = _cpu_seconds_once_quiet(proc.pid)
    requests = min(concurrency, WARM_UP) + concurrency * rounds
    cpu = None if before is None or after is None else (after - before) / requests * 1000
    return Result(burst, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--client", choices=sorted(CLIENTS), default="raw")
    parser.add_argument(
        "--processes",
        default="1,2",
        help="comma-separated webhook group sizes to measure (listen-fhir --processes N)",
    )
    args = parser.parse_args()
    sizes = [int(n) for n in args.processes.split(",")]
    with tempfile.TemporaryDirectory(prefix="carebridge-bench-") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
        port = free_port()
        url = args.database_url or f"sqlite:///{root / 'var' / 'carebridge.db'}"
        env.update(
            CAREBRIDGE_DATABASE_URL=url,
            CAREBRIDGE_ARCHIVE_DIR=str(root / "var" / "archive"),
            CAREBRIDGE_FHIR_PORT=str(port),
            CAREBRIDGE_WEBHOOK_TOKEN=TOKEN,
            PYTHONUNBUFFERED="1",
        )
        subprocess.run(
            [sys.executable, "-m", "listeners.cli", "db", "upgrade"], cwd=REPO, env=env, check=True
        )
        results: dict[str, Result] = {}
        for size in sizes:
            proc = _serve(
                [sys.executable, "-m", "listeners.cli", "listen-fhir", "--processes", str(size)],
                env,
                port,
                root / f"fhir-{size}.log",
                ready="carebridge listen-fhir: ready",
            )
            try:
                results[f"carebridge x{size}"] = _measure(
                    proc, port, args.client, args.concurrency, args.rounds
                )
            finally:
                _stop(proc)
        app_file = root / "reference_app.py"
        app_file.write_text(REFERENCE_APP)
        ref_port = free_port()
        proc = _serve(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(root),
                "--port",
                str(ref_port),
                "--log-level",
                "warning",
                "reference_app:app",
            ],
            env,
            ref_port,
            root / "reference.log",
        )
        try:
            results["reference"] = _measure(
                proc, ref_port, args.client, args.concurrency, args.rounds
            )
        finally:
            _stop(proc)
    print(
        f"{args.concurrency} concurrent requests x {args.rounds} rounds "
        f"({'PostgreSQL' if args.database_url else 'SQLite'}; client {args.client})"
    )
    print(f"{'server':<14} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU ms/req':>11}  failures")
    for name, result in results.items():
        values = result.burst.latencies or [float("nan")]
        cpu = "n/a" if result.cpu_ms_per_request is None else f"{result.cpu_ms_per_request:.2f}"
        failures = ", ".join(f"{k} x{n}" for k, n in result.burst.failures.items()) or "none"
        print(
            f"{name:<14} {statistics.median(values):8.1f} {_percentile(values, 0.99):8.1f} "
            f"{max(values):8.1f} {cpu:>11}  {failures}"
        )
    ref99 = _percentile(results["reference"].burst.latencies or [float("nan")], 0.99)
    for name, result in results.items():
        if name == "reference":
            continue
        p99 = _percentile(result.burst.latencies or [float("nan")], 0.99)
        print(
            f"{name}: p99 / bare-app p99 = {p99 / ref99:.2f}x; target p99 < 200 ms: "
            f"{'met' if p99 < 200 else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
