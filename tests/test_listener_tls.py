"""DICOM TLS on the SCP: mutual TLS when a CA is configured."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from db.engine import Database
from db.migrate import upgrade
from listeners.dicom import StorageSCP
from tests.peers import free_port
from worker.settings import load_settings


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(d / "ext.cnf"),
            "-out",
            str(d / f"{name}.pem"),
        )
    return d


def _client_context(pki: Path, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    context.check_hostname = False
    if with_certificate:
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
    return context


def test_mutual_tls_echo(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'cb.db'}",
        archive_dir=tmp_path / "archive",
        dicom_port=port,
        dicom_tls_cert=pki / "server.pem",
        dicom_tls_key=pki / "server.key",
        dicom_tls_ca=pki / "ca.pem",
    )
    upgrade(settings.database_url)
    database = Database(settings.database_url)
    server = StorageSCP(settings, database).start()
    try:
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1", port, ae_title="CAREBRIDGE", tls_args=(_client_context(pki, True), None)
        )
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        # Without a client certificate the handshake fails: no association.
        assoc = ae.associate(
            "127.0.0.1", port, ae_title="CAREBRIDGE", tls_args=(_client_context(pki, False), None)
        )
        if assoc.is_established:  # TLS 1.3 reports the missing certificate late
            with pytest.raises(Exception):
                assoc.send_c_echo()
                raise RuntimeError("echo must not succeed")
        # Plain TCP to a TLS port: no association either.
        assoc = ae.associate("127.0.0.1", port, ae_title="CAREBRIDGE")
        assert not assoc.is_established
    finally:
        server.shutdown()
        database.dispose()
