"""docker-compose.yml wiring: brokers, databases, dependencies, GPU, and the Orthanc loop."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_PATH = ROOT / "docker-compose.yml"

# The configuration contract (PRODUCT.md, "Configuration"), plus the variables the project adds.
CONTRACT_VARIABLES = {
    "CONFIG",
    "DATABASE_URL",
    "BROKER_URL",
    "ARCHIVE_DIR",
    "DICOM_AE_TITLE",
    "DICOM_HOST",
    "DICOM_PORT",
    "DICOM_ALLOWED_AES",
    "DICOM_TLS_CERT",
    "DICOM_TLS_KEY",
    "DICOM_TLS_CA",
    "PACS_DESTINATIONS",
    "STUDY_STABLE_SECONDS",
    "FHIR_HOST",
    "FHIR_PORT",
    "WEBHOOK_TOKEN",
    "WEBHOOK_SECRET",
    "EHR_BASE_URL",
    "EHR_CLIENT_ID",
    "EHR_TOKEN_URL",
    "EHR_PRIVATE_KEY",
    "MODELS_DIR",
    "DEVICE",
}
PROJECT_VARIABLES = {"WORKER_CONCURRENCY", "JOB_LEASE_SECONDS"}
KNOWN_VARIABLES = {f"CAREBRIDGE_{name}" for name in CONTRACT_VARIABLES | PROJECT_VARIABLES}

CAREBRIDGE_SERVICES = {"migrate", "models", "listener", "fhir", "worker-cpu", "worker-gpu"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_PATH.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def command(service: dict[str, Any]) -> list[str]:
    raw = service.get("command") or []
    return raw.split() if isinstance(raw, str) else [str(part) for part in raw]


def depends(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def parse_destination(text: str) -> tuple[str, str, int]:
    match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d+)", text.strip())
    assert match, f"not AE@host:port: {text!r}"
    return match.group(1), match.group(2), int(match.group(3))


def test_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert CAREBRIDGE_SERVICES | {"redis", "postgres", "orthanc"} <= set(services)


def test_redis_and_postgres_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    redis_test = " ".join(services["redis"]["healthcheck"]["test"])
    assert "redis-cli" in redis_test and "ping" in redis_test
    assert services["redis"]["image"].startswith("redis:7")
    pg_test = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in pg_test
    assert services["postgres"]["image"].startswith("postgres:16")
    assert env(services["postgres"])["POSTGRES_DB"] == "carebridge"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])


def test_every_carebridge_service_uses_redis_and_postgres(
    services: dict[str, dict[str, Any]],
) -> None:
    pg_env = env(services["postgres"])
    for name in CAREBRIDGE_SERVICES:
        service = services[name]
        assert command(service)[0] == "carebridge", name
        assert service["build"]["context"] == "."
        variables = env(service)
        assert variables["CAREBRIDGE_BROKER_URL"] == "redis://redis:6379/0", name
        url = variables["CAREBRIDGE_DATABASE_URL"]
        match = re.fullmatch(r"postgresql\+psycopg://([^:@]+):([^@]+)@postgres:5432/(\w+)", url)
        assert match, f"{name}: {url}"
        assert match.group(1) == pg_env["POSTGRES_USER"]
        assert match.group(2) == pg_env["POSTGRES_PASSWORD"]
        assert match.group(3) == pg_env["POSTGRES_DB"]
    images = {services[name]["image"] for name in CAREBRIDGE_SERVICES}
    assert len(images) == 1, "all carebridge services run one image"


def test_one_shot_services(services: dict[str, dict[str, Any]]) -> None:
    assert command(services["migrate"]) == ["carebridge", "db", "upgrade"]
    assert depends(services["migrate"]) == {"postgres": "service_healthy"}
    assert command(services["models"]) == ["carebridge", "models", "demo"]
    for name in ("migrate", "models"):
        assert services[name]["restart"] == "no"
    models_dir = env(services["models"])["CAREBRIDGE_MODELS_DIR"]
    assert any(v == f"models:{models_dir}" for v in services["models"]["volumes"])


def test_listener_wiring(services: dict[str, dict[str, Any]]) -> None:
    listener = services["listener"]
    assert command(listener) == ["carebridge", "listen-dicom"]
    assert depends(listener) == {
        "redis": "service_healthy",
        "postgres": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    variables = env(listener)
    assert variables["CAREBRIDGE_DICOM_HOST"] == "0.0.0.0"
    port = int(variables.get("CAREBRIDGE_DICOM_PORT", "11112"))
    assert port == 11112
    assert f"{port}:{port}" in [str(p) for p in listener["ports"]]
    orthanc_aet = env(services["orthanc"])["ORTHANC__DICOM_AET"]
    allowed = [ae.strip() for ae in variables["CAREBRIDGE_DICOM_ALLOWED_AES"].split(",")]
    assert orthanc_aet in allowed


def test_fhir_webhook_is_public_only_with_a_token(services: dict[str, dict[str, Any]]) -> None:
    fhir = services["fhir"]
    assert command(fhir) == ["carebridge", "listen-fhir"]
    variables = env(fhir)
    assert variables["CAREBRIDGE_FHIR_HOST"] == "0.0.0.0"
    # Required from .env: compose refuses to start without it (":?").
    assert variables["CAREBRIDGE_WEBHOOK_TOKEN"].startswith("${CAREBRIDGE_WEBHOOK_TOKEN:?")
    assert fhir["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_workers(services: dict[str, dict[str, Any]]) -> None:
    for name in ("worker-cpu", "worker-gpu"):
        assert depends(services[name]) == {
            "redis": "service_healthy",
            "postgres": "service_healthy",
            "migrate": "service_completed_successfully",
            "models": "service_completed_successfully",
        }, name
    cpu = command(services["worker-cpu"])
    assert cpu[:2] == ["carebridge", "worker"]
    assert cpu[cpu.index("--queues") + 1].split(",") == ["cpu", "deliver"]
    assert "deploy" not in services["worker-cpu"]

    gpu = services["worker-gpu"]
    assert " ".join(command(gpu)) == "carebridge worker --queues gpu --concurrency 1"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices


def test_archive_and_models_are_shared(services: dict[str, dict[str, Any]]) -> None:
    for name in ("listener", "worker-cpu", "worker-gpu"):
        variables = env(services[name])
        volumes = services[name]["volumes"]
        assert f"archive:{variables['CAREBRIDGE_ARCHIVE_DIR']}" in volumes, name
        assert f"models:{variables['CAREBRIDGE_MODELS_DIR']}" in volumes, name


def test_orthanc_sends_to_the_listener(services: dict[str, dict[str, Any]]) -> None:
    orthanc_env = env(services["orthanc"])
    modalities = json.loads(orthanc_env["ORTHANC__DICOM_MODALITIES"])
    entry = modalities["CAREBRIDGE"]
    if isinstance(entry, list):
        entry = {"AET": entry[0], "Host": entry[1], "Port": entry[2]}
    listener_env = env(services["listener"])
    assert entry["Host"] == "listener"
    assert int(entry["Port"]) == int(listener_env.get("CAREBRIDGE_DICOM_PORT", "11112"))
    assert entry["AET"] == listener_env.get("CAREBRIDGE_DICOM_AE_TITLE", "CAREBRIDGE")
    assert orthanc_env.get("ORTHANC__DICOM_ALWAYS_ALLOW_STORE", "true") == "true"


def test_results_go_to_orthanc(services: dict[str, dict[str, Any]]) -> None:
    orthanc_env = env(services["orthanc"])
    orthanc_port = int(orthanc_env.get("ORTHANC__DICOM_PORT", "4242"))
    for name in ("listener", "worker-cpu", "worker-gpu"):
        destinations = env(services[name])["CAREBRIDGE_PACS_DESTINATIONS"].split(",")
        assert (orthanc_env["ORTHANC__DICOM_AET"], "orthanc", orthanc_port) in [
            parse_destination(d) for d in destinations
        ], name


def test_only_contract_variables_are_used() -> None:
    used = set(re.findall(r"\bCAREBRIDGE_[A-Z0-9_]+", COMPOSE_PATH.read_text()))
    assert used, "the compose file configures carebridge through CAREBRIDGE_* variables"
    assert used <= KNOWN_VARIABLES, f"not in the contract: {sorted(used - KNOWN_VARIABLES)}"


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source!r} is not declared"


def test_dockerfile_installs_cpu_torch_first() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    torch = next(i for i, line in enumerate(runs) if "pip install torch==2.13.0" in line)
    project = next(i for i, line in enumerate(runs) if re.search(r"pip install \.(\s|$)", line))
    assert torch < project
    assert "download.pytorch.org/whl/cpu" in text
