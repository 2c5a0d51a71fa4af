"""The EHR connection built from the settings: base URL plus SMART or a static bearer."""

from __future__ import annotations

from worker.senders.fhir import FhirClient
from worker.senders.smart import SmartBackendAuth, StaticBearer
from worker.settings import Settings


def ehr_client(settings: Settings) -> FhirClient | None:
    """A client for EHR_BASE_URL, or None when no EHR is configured."""
    if not settings.ehr_base_url:
        return None
    auth: SmartBackendAuth | StaticBearer | None = None
    if settings.ehr_client_id and settings.ehr_private_key:
        auth = SmartBackendAuth(
            settings.ehr_base_url,
            settings.ehr_client_id,
            settings.ehr_private_key.read_bytes(),
            token_url=settings.ehr_token_url,
            scope=settings.ehr_scope,
            key_id=settings.ehr_key_id,
        )
    elif settings.ehr_bearer_token is not None:
        auth = StaticBearer(settings.ehr_bearer_token.get_secret_value())
    return FhirClient(settings.ehr_base_url, auth)
