"""Real FHIR peers for tests: a FHIR R4 server (node + @medplum/fhir-router) and a SMART
token endpoint.

Plain helpers (no fixtures here), like :mod:`tests.peers`. :class:`FhirServerPeer` runs
``tests/fhir_server/server.mjs`` (see its README) on a loopback port and talks to its FHIR
API and test controls; :class:`TokenEndpoint` is an OAuth 2.0 token endpoint for SMART
Backend Services that checks client assertions strictly and issues access tokens the FHIR
server accepts (HS256 JWTs under a secret both share). :func:`fhir_server_missing` lets a
test fail with a clear reason where node or the npm packages are not installed (.ci/run
installs them).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt

from tests.peers import LOOPBACK, _stop, _tail

FHIR_SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300  # SMART Backend Services: exp at most five minutes ahead


def fhir_server_missing() -> str | None:
    """Why the test FHIR server cannot run here (None when it can)."""
    if shutil.which("node") is None:
        return "node is not installed (Debian package 'nodejs')"
    if not (FHIR_SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        return "the test FHIR server's packages are missing: run `npm ci` in tests/fhir_server"
    return None


# ------------------------------------------------------------------------ FHIR server


class FhirServerPeer:
    """The test FHIR R4 server on a loopback port; data lives in memory.

    Use as a context manager::

        with FhirServerPeer(tmp_path / "fhir") as ehr:
            FhirClient(ehr.base_url, None).post_transaction(bundle)
            assert len(ehr.search("Observation", identifier="urn:x|1")) == 1

    ``require_auth``: FHIR requests need ``Authorization: Bearer`` with one of
    ``static_tokens`` or an access token signed with ``token_secret`` (see
    :class:`TokenEndpoint`); the helpers here use a token of their own. ``token_url`` is
    published in ``{base}/.well-known/smart-configuration``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        require_auth: bool = False,
        static_tokens: Sequence[str] = (),
        token_secret: str | None = None,
        token_url: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        """Prepare (not start) the server."""
        self.workdir = Path(workdir)
        self.require_auth = require_auth
        self.static_tokens = list(static_tokens)
        self.token_secret = token_secret
        self.token_url = token_url
        self.start_timeout = start_timeout
        self.host = LOOPBACK
        self.port = 0
        self.log_path = self.workdir / "fhir-server.log"
        self.ready_path = self.workdir / "fhir-server.ready"
        self.startup_seconds: float | None = None
        self._helper_token = secrets.token_urlsafe(24)
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(timeout=30)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Origin of the server (admin paths live under ``/__admin/``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The FHIR base URL."""
        return f"{self.url}/fhir/R4"

    @property
    def pid(self) -> int | None:
        """PID of the running node process, if any."""
        return self._proc.pid if self._proc is not None else None

    def _env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("FHIR_TEST_")}
        env["FHIR_TEST_PORT"] = str(self.port)
        if self.require_auth:
            env["FHIR_TEST_AUTH"] = "1"
        env["FHIR_TEST_STATIC_TOKENS"] = ",".join([*self.static_tokens, self._helper_token])
        if self.token_secret:
            env["FHIR_TEST_TOKEN_SECRET"] = self.token_secret
        if self.token_url:
            env["FHIR_TEST_TOKEN_URL"] = self.token_url
        return env

    def start(self) -> FhirServerPeer:
        """Start node; return once the server listens. A restart keeps the same port."""
        reason = fhir_server_missing()
        if reason is not None:
            raise RuntimeError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.ready_path.open("wb") as ready, self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                ["node", "server.mjs"],
                cwd=FHIR_SERVER_DIR,
                env=self._env(),
                stdout=ready,
                stderr=log,
            )
        try:
            self.port = self._wait_ready()
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"FHIR server did not start: {exc}\n{_tail(self.log_path)}") from exc
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self) -> int:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            text = self.ready_path.read_text(errors="replace")
            if text.endswith("\n"):
                return int(json.loads(text.splitlines()[0])["port"])
            if self._proc.poll() is not None:
                raise RuntimeError(f"node exited with {self._proc.returncode}")
            time.sleep(0.02)
        raise TimeoutError(f"not listening after {self.start_timeout:.0f} s")

    def stop(self) -> None:
        """Stop the node process started by :meth:`start` (by its PID); data is lost."""
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None

    def close(self) -> None:
        """Stop the server and close the helper's HTTP client."""
        self.stop()
        self._http.close()

    def __enter__(self) -> FhirServerPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ FHIR API

    def _fhir(
        self, method: str, url: str, headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        # The server leaves requests marked as the helpers' out of its request log.
        all_headers = {
            "Authorization": f"Bearer {self._helper_token}",
            "Accept": "application/fhir+json",
            "X-Test-Helper": "1",
            **(headers or {}),
        }
        response = self._http.request(method, url, headers=all_headers, **kwargs)
        if response.status_code >= 300:
            raise RuntimeError(
                f"FHIR server {method} -> HTTP {response.status_code}: {response.text[:500]}"
            )
        return dict(response.json())

    def search(self, resource_type: str, **params: str | int) -> list[dict[str, Any]]:
        """Every resource matching the search, following ``next`` links."""
        found: list[dict[str, Any]] = []
        url: str | None = f"{self.base_url}/{resource_type}"
        query: Mapping[str, str | int] | None = params
        while url is not None:
            bundle = self._fhir("GET", url, params=query)
            found.extend(entry["resource"] for entry in bundle.get("entry", []))
            url = next(
                (ln["url"] for ln in bundle.get("link", []) if ln["relation"] == "next"), None
            )
            query = None
        return found

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET one resource."""
        return self._fhir("GET", f"{self.base_url}/{resource_type}/{resource_id}")

    def create(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """POST one resource (a plain create, no condition); the stored resource."""
        return self._fhir(
            "POST",
            f"{self.base_url}/{resource['resourceType']}",
            content=json.dumps(resource),
            headers={"Content-Type": "application/fhir+json"},
        )

    # ------------------------------------------------------------------ test controls

    def _admin(self, method: str, path: str, **params: Any) -> Any:
        response = self._http.request(method, f"{self.url}/__admin/{path}", params=params)
        response.raise_for_status()
        return response.json()

    def fail_next(self, status: int, count: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``count`` FHIR requests with ``status`` (and Retry-After)."""
        params: dict[str, Any] = {"status": status, "count": count}
        if retry_after is not None:
            params["retry_after"] = retry_after
        self._admin("POST", "fail", **params)

    def atomic_transactions(self, atomic: bool) -> None:
        """False: answer transactions like batches (200, failed entries inside) until reset."""
        self._admin("POST", "transactions", atomic=int(atomic))

    def revoke_tokens(self) -> int:
        """Revoke every access token the server has accepted so far; how many."""
        return int(self._admin("POST", "revoke-tokens")["revoked"])

    def reset(self) -> None:
        """Delete all resources, scripted failures, revocations and the request log;
        transactions are atomic again."""
        self._admin("POST", "reset")

    def requests(self) -> list[dict[str, Any]]:
        """FHIR requests answered so far, oldest first, without this class's own: method,
        path (no query), auth ("none", "refused", "static", "jwt:<jti>") and status."""
        return list(self._admin("GET", "requests")["requests"])


# --------------------------------------------------------------------- token endpoint


@dataclass
class TokenRequest:
    """One request the token endpoint received and what it answered."""

    form: dict[str, str]
    header: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)
    status: int = 0
    error: str | None = None
    access_token: str | None = None


class TokenEndpoint:
    """An OAuth 2.0 token endpoint for SMART Backend Services on a loopback port.

    Clients are registered with their public key. A token request must use the
    ``client_credentials`` grant with a ``private_key_jwt`` assertion: RS384 or ES384,
    ``iss`` = ``sub`` = a registered client id, ``aud`` = this endpoint's URL, ``exp`` at
    most five minutes ahead, a ``jti`` never seen before, valid signature. The access
    token issued is an HS256 JWT under :attr:`secret` (give it to :class:`FhirServerPeer`).
    Every request is recorded in :attr:`requests`.
    """

    def __init__(self, *, token_lifetime: int = 300) -> None:
        """Prepare (not start) the endpoint; ``token_lifetime`` is ``expires_in`` (s)."""
        self.secret = secrets.token_hex(32)
        self.token_lifetime = token_lifetime
        self.clients: dict[str, bytes] = {}
        self.requests: list[TokenRequest] = []
        self.seen_jtis: set[str] = set()
        self._failures: list[tuple[int, str | None]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The token URL (the ``aud`` of client assertions)."""
        assert self._server is not None, "start() first"
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/token"

    def register(self, client_id: str, public_key_pem: bytes) -> None:
        """Accept assertions from ``client_id`` signed by the key matching ``public_key_pem``."""
        self.clients[client_id] = public_key_pem

    def fail_next(self, status: int, count: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``count`` token requests with ``status``."""
        with self._lock:
            self._failures.extend([(status, retry_after)] * count)

    def requests_of(self, client_id: str) -> list[TokenRequest]:
        """The recorded requests whose assertion named ``client_id`` as issuer."""
        return [r for r in self.requests if r.claims.get("iss") == client_id]

    def start(self) -> TokenEndpoint:
        """Listen on a free loopback port in a background thread."""
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace")
                status, answer, headers = endpoint._answer(
                    self.path, self.headers.get("Content-Type", ""), body
                )
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return  # keep test output quiet

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> TokenEndpoint:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ the grant

    def _answer(
        self, path: str, content_type: str, body: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if path != "/token":
            return 404, {"error": "not_found"}, {}
        form = {key: values[0] for key, values in parse_qs(body).items()}
        record = TokenRequest(form=form)
        with self._lock:
            self.requests.append(record)
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            status, retry_after = failure
            record.status, record.error = status, "scripted failure"
            return (
                status,
                {"error": "temporarily_unavailable"},
                ({"Retry-After": retry_after} if retry_after else {}),
            )
        try:
            if content_type.split(";")[0].strip() != "application/x-www-form-urlencoded":
                raise _GrantError("invalid_request", "form-encoded body required")
            answer = self._grant(form, record)
        except _GrantError as exc:
            record.status, record.error = 400, f"{exc.error}: {exc.description}"
            return 400, {"error": exc.error, "error_description": exc.description}, {}
        record.status = 200
        record.access_token = answer["access_token"]
        return 200, answer, {}

    def _grant(self, form: dict[str, str], record: TokenRequest) -> dict[str, Any]:
        if form.get("grant_type") != "client_credentials":
            raise _GrantError("unsupported_grant_type", "only client_credentials")
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise _GrantError("invalid_client", "a jwt-bearer client_assertion is required")
        scope = form.get("scope", "")
        if not scope:
            raise _GrantError("invalid_scope", "scope is required")
        assertion = form.get("client_assertion", "")
        try:
            record.header = jwt.get_unverified_header(assertion)
            record.claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _GrantError("invalid_client", f"malformed assertion: {exc}") from None
        algorithm = record.header.get("alg")
        if algorithm not in ("RS384", "ES384"):
            raise _GrantError("invalid_client", "the assertion must be signed RS384 or ES384")
        client_id = record.claims.get("iss")
        if client_id not in self.clients or record.claims.get("sub") != client_id:
            raise _GrantError("invalid_client", "unknown client, or sub differs from iss")
        try:
            claims = jwt.decode(
                assertion,
                self.clients[client_id],
                algorithms=[algorithm],
                audience=self.url,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.PyJWTError as exc:
            raise _GrantError("invalid_client", f"assertion rejected: {exc}") from None
        now = time.time()
        if claims["exp"] > now + MAX_ASSERTION_LIFETIME_S:
            raise _GrantError("invalid_client", "assertion exp is more than five minutes ahead")
        with self._lock:
            if claims["jti"] in self.seen_jtis:
                raise _GrantError("invalid_client", "assertion jti was used before")
            self.seen_jtis.add(claims["jti"])
        access_token = jwt.encode(
            {
                "iss": self.url,
                "sub": client_id,
                "scope": scope,
                "iat": int(now),
                "exp": int(now) + self.token_lifetime,
                "jti": uuid.uuid4().hex,
            },
            self.secret,
            algorithm="HS256",
        )
        return {
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": self.token_lifetime,
            "scope": scope,
        }


class _GrantError(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
