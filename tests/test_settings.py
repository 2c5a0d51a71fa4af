"""Settings fail closed, with messages that say what to set."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CAREBRIDGE_"):
            monkeypatch.delenv(key)


def test_defaults_are_the_embedded_deployment() -> None:
    settings = load_settings()
    assert settings.database_url == "sqlite:///./var/carebridge.db"
    assert settings.broker_url is None and settings.effective_broker_url == "filesystem://"
    assert settings.archive_dir == Path("./var/archive")
    assert (settings.dicom_ae_title, settings.dicom_host, settings.dicom_port) == (
        "CAREBRIDGE",
        "127.0.0.1",
        11112,
    )
    assert settings.study_stable_seconds == 10
    assert (settings.fhir_host, settings.fhir_port) == ("127.0.0.1", 8080)
    assert settings.models_dir == Path("./var/models")
    assert settings.device == "auto"
    assert settings.dicom_allowed_aes == [] and settings.pacs_destinations == []


def test_environment_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREBRIDGE_DICOM_ALLOWED_AES", "ORTHANC, CT1")
    monkeypatch.setenv("CAREBRIDGE_PACS_DESTINATIONS", "ORTHANC@pacs:4242,ARCH@10.0.0.2:104")
    settings = load_settings()
    assert settings.dicom_allowed_aes == ["ORTHANC", "CT1"]
    assert [str(d) for d in settings.destinations] == ["ORTHANC@pacs:4242", "ARCH@10.0.0.2:104"]


def test_public_bind_without_allow_list_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREBRIDGE_DICOM_HOST", "0.0.0.0")
    with pytest.raises(SettingsError, match="CAREBRIDGE_DICOM_ALLOWED_AES"):
        load_settings()
    monkeypatch.setenv("CAREBRIDGE_DICOM_ALLOWED_AES", "ORTHANC")
    assert load_settings().dicom_host == "0.0.0.0"


def test_half_configured_tls_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    monkeypatch.setenv("CAREBRIDGE_DICOM_TLS_CERT", str(cert))
    with pytest.raises(SettingsError, match="CAREBRIDGE_DICOM_TLS_KEY"):
        load_settings()
    monkeypatch.delenv("CAREBRIDGE_DICOM_TLS_CERT")
    monkeypatch.setenv("CAREBRIDGE_DICOM_TLS_CA", str(cert))
    with pytest.raises(SettingsError, match="mutual TLS"):
        load_settings()


def test_half_configured_smart_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREBRIDGE_EHR_CLIENT_ID", "carebridge")
    with pytest.raises(SettingsError, match="CAREBRIDGE_EHR_PRIVATE_KEY"):
        load_settings()


def test_ehr_credentials_without_base_url_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREBRIDGE_EHR_BEARER_TOKEN", "secret")
    with pytest.raises(SettingsError, match="CAREBRIDGE_EHR_BASE_URL"):
        load_settings()


def test_two_ways_to_authenticate_to_the_ehr_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not checked here")
    monkeypatch.setenv("CAREBRIDGE_EHR_BASE_URL", "https://ehr.example/fhir")
    monkeypatch.setenv("CAREBRIDGE_EHR_CLIENT_ID", "carebridge")
    monkeypatch.setenv("CAREBRIDGE_EHR_PRIVATE_KEY", str(key))
    monkeypatch.setenv("CAREBRIDGE_EHR_BEARER_TOKEN", "secret")
    with pytest.raises(SettingsError, match="choose one"):
        load_settings()


def test_public_webhook_without_credentials_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREBRIDGE_FHIR_HOST", "0.0.0.0")
    with pytest.raises(SettingsError, match="CAREBRIDGE_WEBHOOK_TOKEN"):
        load_settings()


def test_toml_file_and_unknown_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "carebridge.toml"
    config.write_text('dicom_port = 4242\npacs_destinations = ["PACS@pacs:104"]\n')
    monkeypatch.setenv("CAREBRIDGE_CONFIG", str(config))
    settings = load_settings()
    assert settings.dicom_port == 4242
    assert settings.pacs_destinations == ["PACS@pacs:104"]
    monkeypatch.setenv("CAREBRIDGE_DICOM_PORT", "5000")  # the environment wins
    assert load_settings().dicom_port == 5000
    config.write_text("dicom_prot = 4242\n")
    with pytest.raises(SettingsError, match="unknown setting 'dicom_prot'"):
        load_settings()
    monkeypatch.setenv("CAREBRIDGE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings()


def test_bad_values_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREBRIDGE_PACS_DESTINATIONS", "nonsense")
    with pytest.raises(SettingsError, match="pacs_destinations"):
        load_settings()
    monkeypatch.delenv("CAREBRIDGE_PACS_DESTINATIONS")
    monkeypatch.setenv("CAREBRIDGE_DICOM_AE_TITLE", "A" * 17)
    with pytest.raises(SettingsError, match="AE_TITLE"):
        load_settings()
    monkeypatch.delenv("CAREBRIDGE_DICOM_AE_TITLE")
    monkeypatch.setenv("CAREBRIDGE_DEVICE", "tpu")
    with pytest.raises(SettingsError, match="device"):
        load_settings()
