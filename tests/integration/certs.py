"""A throw-away CA and a server certificate for 127.0.0.1, made with ``openssl`` for the TLS tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_server_certificate(directory: Path) -> dict[str, Path]:
    """Write ``ca.crt`` (a one-day CA) and ``server.crt`` / ``server.key`` (signed by it, valid for
    127.0.0.1 and localhost) into ``directory``; returns their paths."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "1", "-subj", "/CN=liveavatar-test-ca", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "1", "-extfile", "san.ext", cwd=directory)
    return {"ca": directory / "ca.crt", "cert": directory / "server.crt", "key": directory / "server.key"}
