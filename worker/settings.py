"""carebridge settings: one typed object, read once by the entry points and passed down.

Every variable of PRODUCT.md is a field here; the environment prefix is ``CAREBRIDGE_`` and
an optional TOML file named by ``CAREBRIDGE_CONFIG`` may set the same fields (lower-case
keys). The object fails closed: a configuration that would expose the SCP or the webhook
without access control, or that half-configures TLS or SMART, is refused with a message
that names the variable to set.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.senders.dicom import DicomDestination, parse_destinations

ENV_PREFIX = "CAREBRIDGE_"


class SettingsError(RuntimeError):
    """The configuration is unusable; the message says what to set."""


def is_loopback(host: str) -> bool:
    """True for a loopback host name or address (a bind that no other host can reach)."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All of carebridge's configuration (see PRODUCT.md, "Configuration")."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    # Storage and queues
    database_url: str = Field(
        "sqlite:///./var/carebridge.db", description="SQLAlchemy URL; PostgreSQL in production."
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker; unset = embedded filesystem broker under ./var/broker.",
    )
    archive_dir: Path = Field(
        Path("./var/archive"), description="Received instances and produced objects."
    )
    models_dir: Path = Field(Path("./var/models"), description="Model directories.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="Inference device.")
    rules_file: Path | None = Field(
        None, description="Routing rules (YAML); unset = the shipped default rules."
    )
    clinical_rules_file: Path | None = Field(
        None,
        description="Clinical routing rules (YAML); unset = the shipped default rules.",
    )

    # DICOM SCP
    dicom_ae_title: str = Field("CAREBRIDGE", description="Our AE title (called AE).")
    dicom_host: str = Field("127.0.0.1", description="Bind address of the SCP.")
    dicom_port: int = Field(11112, ge=1, le=65535, description="Port of the SCP.")
    dicom_allowed_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles allowed; empty is allowed only on a loopback bind.",
    )
    dicom_tls_cert: Path | None = Field(None, description="Server certificate (PEM).")
    dicom_tls_key: Path | None = Field(None, description="Server private key (PEM).")
    dicom_tls_ca: Path | None = Field(
        None, description="CA bundle; when set, clients must present a certificate (mutual TLS)."
    )
    dicom_max_associations: int = Field(
        16, ge=1, le=1024, description="Concurrent associations per listener process."
    )
    pacs_destinations: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="AE@host:port[,...] where SR/SEG are sent."
    )
    study_stable_seconds: float = Field(
        10.0, ge=0, description="Quiet period before a study is processed."
    )

    # FHIR webhook
    fhir_host: str = Field("127.0.0.1", description="Bind address of the FHIR webhook.")
    fhir_port: int = Field(8080, ge=1, le=65535, description="Port of the FHIR webhook.")
    webhook_token: SecretStr | None = Field(None, description="Bearer token for notifications.")
    webhook_secret: SecretStr | None = Field(
        None, description="Standard Webhooks HMAC secret for notifications."
    )
    cds_hooks_jwks: Path | None = Field(
        None,
        description="JWK Set (JSON file) of the CDS Clients (EHRs) allowed to call the CDS "
        "Hooks service; their JWTs are verified.",
    )
    cds_hooks_issuers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="CDS Hooks: the JWT 'iss' values trusted."
    )
    cds_hooks_audience: str | None = Field(
        None,
        description="CDS Hooks: this service's public base URL, as CDS Clients put it in 'aud' "
        "(default: the URL the request was sent to).",
    )
    ehr_base_url: str | None = Field(None, description="FHIR R4 base URL results are pushed to.")
    ehr_client_id: str | None = Field(None, description="SMART Backend Services client id.")
    ehr_token_url: str | None = Field(None, description="SMART token endpoint.")
    ehr_private_key: Path | None = Field(None, description="SMART private key (PEM, RS384).")
    ehr_key_id: str | None = Field(None, description="SMART: the key id (JWT kid) of that key.")
    ehr_scope: str = Field(
        "system/*.read system/*.write", description="SMART: the scopes requested."
    )
    ehr_bearer_token: SecretStr | None = Field(
        None, description="A static bearer token for the EHR, instead of SMART."
    )
    patient_id_system: str = Field(
        "urn:carebridge:dicom-patient-id",
        description="Identifier system of DICOM PatientID in FHIR (an imaging result's subject).",
    )
    patient_stable_seconds: float = Field(
        2.0, ge=0, description="Quiet period after a patient's last event before clinical work."
    )

    # Work execution (carebridge additions to PRODUCT.md's table)
    worker_concurrency: int = Field(1, ge=1, le=64, description="Worker processes per worker.")
    job_lease_seconds: float = Field(
        600.0, gt=0, description="A running job whose lease expired is taken over."
    )
    job_max_attempts: int = Field(3, ge=1, description="Attempts before a job is FAILED.")
    delivery_max_attempts: int = Field(
        10, ge=1, description="Attempts before a delivery is dead-lettered."
    )
    delivery_backoff_seconds: float = Field(
        2.0, gt=0, description="First retry delay; doubles per attempt, capped at 300 s."
    )
    sweep_interval_seconds: float = Field(
        0.5, gt=0, description="How often the sweeper looks for stable studies and stuck work."
    )
    requeue_after_seconds: float = Field(
        30.0, gt=0, description="A queued job or delivery not picked up after this is re-sent."
    )

    @field_validator("dicom_allowed_aes", "pacs_destinations", "cds_hooks_issuers", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 16 or "\\" in value or not value.isprintable():
            raise ValueError("CAREBRIDGE_DICOM_AE_TITLE must be 1-16 printable characters")
        return value

    @field_validator("pacs_destinations")
    @classmethod
    def _destinations(cls, value: list[str]) -> list[str]:
        parse_destinations(",".join(value))  # raises ValueError with the bad entry
        return value

    @model_validator(mode="after")
    def _fail_closed(self) -> Settings:
        if not self.dicom_allowed_aes and not is_loopback(self.dicom_host):
            raise ValueError(
                f"CAREBRIDGE_DICOM_HOST={self.dicom_host} is not a loopback address but "
                "CAREBRIDGE_DICOM_ALLOWED_AES is empty: set CAREBRIDGE_DICOM_ALLOWED_AES to "
                "the calling AE titles of your PACS/modalities (comma-separated), or bind to "
                "127.0.0.1"
            )
        if (self.dicom_tls_cert is None) != (self.dicom_tls_key is None):
            raise ValueError(
                "DICOM TLS is half-configured: set both CAREBRIDGE_DICOM_TLS_CERT and "
                "CAREBRIDGE_DICOM_TLS_KEY, or neither"
            )
        if self.dicom_tls_ca is not None and self.dicom_tls_cert is None:
            raise ValueError(
                "CAREBRIDGE_DICOM_TLS_CA is set without CAREBRIDGE_DICOM_TLS_CERT and "
                "CAREBRIDGE_DICOM_TLS_KEY: mutual TLS needs the server certificate and key"
            )
        for name in ("dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca", "ehr_private_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"CAREBRIDGE_{name.upper()}={path} is not a readable file")
        # The token endpoint is optional: it is discovered from the EHR's
        # .well-known/smart-configuration when not set.
        smart = {
            "CAREBRIDGE_EHR_CLIENT_ID": self.ehr_client_id,
            "CAREBRIDGE_EHR_PRIVATE_KEY": self.ehr_private_key,
        }
        if (any(smart.values()) or self.ehr_token_url) and not all(smart.values()):
            missing = ", ".join(name for name, value in smart.items() if not value)
            raise ValueError(f"SMART Backend Services is half-configured: also set {missing}")
        if all(smart.values()) and self.ehr_bearer_token is not None:
            raise ValueError(
                "both SMART Backend Services and CAREBRIDGE_EHR_BEARER_TOKEN are set: "
                "choose one way to authenticate to the EHR"
            )
        if (all(smart.values()) or self.ehr_bearer_token) and not self.ehr_base_url:
            raise ValueError("EHR credentials are set but CAREBRIDGE_EHR_BASE_URL is not")
        if self.cds_hooks_jwks is not None and not self.cds_hooks_issuers:
            raise ValueError(
                "CAREBRIDGE_CDS_HOOKS_JWKS is set but CAREBRIDGE_CDS_HOOKS_ISSUERS is empty: "
                "name the CDS Clients (their JWT 'iss', comma-separated) allowed to call"
            )
        if self.cds_hooks_jwks is None and (self.cds_hooks_issuers or self.cds_hooks_audience):
            raise ValueError(
                "CDS Hooks JWT checks are half-configured: set CAREBRIDGE_CDS_HOOKS_JWKS (the "
                "CDS Clients' public keys) too"
            )
        if (
            not is_loopback(self.fhir_host)
            and self.webhook_token is None
            and self.webhook_secret is None
        ):
            raise ValueError(
                f"CAREBRIDGE_FHIR_HOST={self.fhir_host} is not a loopback address but neither "
                "CAREBRIDGE_WEBHOOK_TOKEN nor CAREBRIDGE_WEBHOOK_SECRET is set"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(f"{ENV_PREFIX}CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    # Derived values -----------------------------------------------------------------

    @property
    def destinations(self) -> list[DicomDestination]:
        """PACS_DESTINATIONS parsed."""
        return parse_destinations(",".join(self.pacs_destinations))

    @property
    def var_dir(self) -> Path:
        """The directory that holds the embedded defaults (the archive's parent)."""
        return self.archive_dir.resolve().parent

    @property
    def effective_broker_url(self) -> str:
        """The broker URL; the embedded default is kombu's filesystem transport."""
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        """Folder of the embedded filesystem broker."""
        return self.var_dir / "broker"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings once; raise SettingsError with a readable message."""
    config_file = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if config_file and not Path(config_file).is_file():
        raise SettingsError(f"CAREBRIDGE_CONFIG={config_file} does not exist")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = (
                    f"unknown setting {where!r} (in CAREBRIDGE_CONFIG or the environment); "
                    "check its spelling against the documented variables"
                )
                lines.append(message)
            else:
                lines.append(f"{where}: {message}" if where != "settings" else message)
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
