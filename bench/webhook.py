"""Webhook latency: time to 202 with many concurrent EHR requests.

    .venv/bin/python bench/webhook.py [--concurrency 200] [--rounds 5] [--database-url URL]

Runs `carebridge listen-fhir` (embedded defaults: SQLite, filesystem broker; or the given
database) and POSTs a vitals Observation from ``--concurrency`` clients at once, ``--rounds``
times. Every request is authenticated (bearer token), validated against the FHIR R4B
models, committed with its audit event and answered 202. The reference, measured in the
same run on the same machine, is a bare uvicorn application that reads the body, parses the
JSON and answers 202 without validating or storing anything. Target: p99 < 200 ms.
Nothing here is a pass/fail test.
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
from pathlib import Path

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


async def _burst(url: str, concurrency: int, rounds: int) -> list[float]:
    body = json.dumps(OBSERVATION).encode()
    headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> None:
            started = time.perf_counter()
            response = await client.post(url, content=body, headers=headers)
            elapsed = time.perf_counter() - started
            if response.status_code != 202:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
            latencies.append(elapsed * 1000)

        await asyncio.gather(*(one() for _ in range(min(concurrency, 20))))  # warm-up
        latencies.clear()
        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _serve(args: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stream:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)
    wait_for_port("127.0.0.1", port, timeout=60, proc=proc)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
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
        results: dict[str, list[float]] = {}
        proc = _serve(
            [sys.executable, "-m", "listeners.cli", "listen-fhir"], env, port, root / "fhir.log"
        )
        try:
            results["carebridge"] = asyncio.run(
                _burst(f"http://127.0.0.1:{port}/fhir/Observation", args.concurrency, args.rounds)
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
            results["reference"] = asyncio.run(
                _burst(
                    f"http://127.0.0.1:{ref_port}/fhir/Observation", args.concurrency, args.rounds
                )
            )
        finally:
            _stop(proc)
    print(
        f"{args.concurrency} concurrent requests x {args.rounds} rounds "
        f"({'PostgreSQL' if args.database_url else 'SQLite'})"
    )
    print(f"{'server':<12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, values in results.items():
        print(
            f"{name:<12} {statistics.median(values):8.1f} {_percentile(values, 0.99):8.1f} "
            f"{max(values):8.1f}"
        )
    p99 = _percentile(results["carebridge"], 0.99)
    ref99 = _percentile(results["reference"], 0.99)
    print(
        f"carebridge p99 / bare-app p99 = {p99 / ref99:.2f}x; target p99 < 200 ms: "
        f"{'met' if p99 < 200 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
