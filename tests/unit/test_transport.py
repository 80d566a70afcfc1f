"""providers/transport.py: aiohttp's import-time TLS contexts skipped, and https backends verified all the same."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import sys

import pytest

from appliance.providers.transport import ConnectError, Limits, Transport

LIMITS = Limits(total_s=10, connect_s=5)


def test_the_import_leaves_aiohttp_no_ca_bundle_to_read_and_ssl_as_it_was():
    """In a fresh interpreter, as at start-up: aiohttp's default contexts hold no CA (built without reading the
    bundle, and failing closed if ever used); the ssl functions the import borrowed are back."""
    script = (
        "import json, ssl; create = ssl.create_default_context\n"
        "import appliance.providers.transport, aiohttp.connector as c\n"
        "print(json.dumps([c._SSL_CONTEXT_VERIFIED.cert_store_stats()['x509_ca'],\n"
        "                  c._SSL_CONTEXT_VERIFIED.verify_mode == ssl.CERT_REQUIRED,\n"
        "                  ssl.create_default_context is create,\n"
        "                  ssl.create_default_context().cert_store_stats()['x509_ca'] > 0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [0, True, True, True]


@pytest.fixture
def tls_server(tmp_path):
    """An https server on loopback with a self-signed certificate: (url, certificate file)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass  # the client refused our certificate
    finally:
        writer.close()


async def _call(server_context: ssl.SSLContext) -> tuple[int | None, Transport, str | None]:
    server = await asyncio.start_server(_answer, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    transport = await Transport.open()
    try:
        answer = await transport.request("GET", f"https://127.0.0.1:{port}/v1/models", limits=LIMITS)
        return answer.status, transport, None
    except ConnectError as exc:
        return None, transport, str(exc)
    finally:
        await transport.close()
        server.close()


def test_an_https_backend_is_verified_against_the_system_store(tls_server, monkeypatch):
    server_context, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL reads it when the first https call builds the context
    status, transport, _ = asyncio.run(_call(server_context))
    assert status == 200
    assert transport._tls is not None and transport._tls.cert_store_stats()["x509"] == 1  # built once, from the file

    monkeypatch.delenv("SSL_CERT_FILE")
    status, _, error = asyncio.run(_call(server_context))
    assert status is None and "certificate verify failed" in error
