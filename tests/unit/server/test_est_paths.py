"""The EST fast path and the documented FastAPI routes answer byte for byte alike, audits included."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.responses import JSONResponse, Response

from tensorguard.server.app import create_app
from tensorguard.server.asgi import ASGIApp
from tensorguard.server.est import EstFastPath
from tensorguard.server.settings import ServerSettings
from tensorguard.server.store import SQLiteStore
from tensorguard.server.tokens import new_token, token_hash

from .helpers import NOW, b64, make_ca, make_csr, p256, tamper_signature

EST = "/.well-known/est"
PKCS10 = {"content-type": "application/pkcs10"}


class Clock:
    """The app's clock, fixed at NOW (the test CA's certificates are valid then)."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[EstFastPath, SQLiteStore]]:
    make_ca(tmp_path / "ca")
    store = SQLiteStore(tmp_path / "ca" / "ca.sqlite3")
    yield create_app(ServerSettings(ca_dir=tmp_path / "ca"), clock=Clock(), store=store), store


def _token(store: SQLiteStore, node: str) -> str:
    token = new_token()
    store.add_token(token_hash(token), node, NOW, NOW + timedelta(hours=1))
    return token


def _request(target: ASGIApp, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, tls: Mapping[str, object] | None = None) -> httpx.Response:
    async def run() -> httpx.Response:
        async def with_tls(scope, receive, send):  # type: ignore[no-untyped-def]
            if tls is not None:
                scope.setdefault("extensions", {})["tls"] = tls
            await target(scope, receive, send)

        transport = httpx.ASGITransport(app=with_tls, client=("10.1.2.3", 4567))
        async with httpx.AsyncClient(transport=transport, base_url="https://ca.test") as client:
            return await client.request(method, path, content=body, headers=headers)
    return asyncio.run(run())


def _cases(store: SQLiteStore, node: str) -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    good = b64(make_csr(p256(), cn=node))
    return [
        ("GET", f"{EST}/cacerts", None, {}),
        ("POST", f"{EST}/simpleenroll", good, {**PKCS10, "authorization": f"Bearer {_token(store, node)}"}),
        ("POST", f"{EST}/simpleenroll", good, {**PKCS10, "authorization": f"Bearer {_token(store, node)}"}),
        ("POST", f"{EST}/simpleenroll", good, PKCS10),
        ("POST", f"{EST}/simpleenroll", good, {"content-type": "text/plain"}),
        ("POST", f"{EST}/simpleenroll", b"A" * 20000, PKCS10),
        ("POST", f"{EST}/simpleenroll", base64.b64encode(tamper_signature(make_csr(p256(), cn=node))),
         {**PKCS10, "authorization": f"Bearer {_token(store, node)}"}),
        ("POST", f"{EST}/simplereenroll", good, PKCS10),
        ("GET", f"{EST}/simpleenroll", None, {}),
    ]


def test_fast_path_and_fastapi_routes_answer_alike(app: tuple[EstFastPath, SQLiteStore]) -> None:
    fast, store = app
    answers = []
    for target, node in ((fast, "fast-1"), (fast.fallback, "slow-1")):
        before = len(store.audit_records())
        got = []
        for method, path, body, headers in _cases(store, node):
            response = _request(target, method, path, body, headers)
            text = response.text if response.headers.get("content-type") != "application/pkcs7-mime; " \
                "smime-type=certs-only" else "<certificate>"
            got.append((response.status_code, text.replace(node, "NODE"), response.headers.get("content-type"),
                        response.headers.get("www-authenticate"),
                        response.headers.get("content-transfer-encoding")))
        audits = store.audit_records()[before:]
        answers.append((got, [(a.kind, a.reason and a.reason.replace(node, "NODE"), a.remote) for a in audits]))
    assert answers[0] == answers[1]
    statuses = [status for status, *_ in answers[0][0]]
    assert statuses == [200, 200, 200, 401, 415, 413, 400, 401, 405]
    assert answers[0][0][2][1] == "<certificate>"  # the second token works too; replays are covered elsewhere
    assert {remote for *_, remote in answers[0][1]} == {"10.1.2.3:4567"}


def test_reenroll_through_the_fast_path_uses_the_connection_certificate(
        app: tuple[EstFastPath, SQLiteStore], tmp_path: Path) -> None:
    fast, store = app
    ca = fast.endpoints.service.ca
    cert = ca.issue(make_csr(p256()), "robot-7", NOW)
    tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(cert.public_bytes(serialization.Encoding.DER))]}
    response = _request(fast, "POST", f"{EST}/simplereenroll", b64(make_csr(p256())), PKCS10, tls)
    assert response.status_code == 200
    assert [r.kind for r in store.issued("robot-7")] == ["reenroll"]


def test_fast_path_writes_what_fastapi_responses_wrote(app: tuple[EstFastPath, SQLiteStore]) -> None:
    fast, store = app
    for method, path, body, headers in _cases(store, "r-1")[:-1]:  # the 405 is FastAPI's own
        response = _request(fast, method, path, body, headers)
        if response.headers["content-type"] == "application/json":
            extra = {"WWW-Authenticate": response.headers["www-authenticate"]} if response.status_code == 401 \
                else None
            expected: Response = JSONResponse(response.json(), status_code=response.status_code, headers=extra)
        else:
            expected = Response(response.content, media_type=response.headers["content-type"],
                                headers={"Content-Transfer-Encoding": "base64"})
        assert response.content == expected.body
        assert [(k.lower(), v) for k, v in response.headers.raw] == expected.raw_headers


def test_a_client_that_disconnects_mid_body_gets_no_answer(app: tuple[EstFastPath, SQLiteStore]) -> None:
    fast, store = app
    sent: list[object] = []
    messages = iter([{"type": "http.request", "body": b"AAAA", "more_body": True}, {"type": "http.disconnect"}])

    async def receive():  # type: ignore[no-untyped-def]
        return next(messages)

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": f"{EST}/simpleenroll", "headers": [
        (b"content-type", b"application/pkcs10")], "client": ("127.0.0.1", 1)}
    asyncio.run(fast(scope, receive, send))
    assert sent == [] and store.issued() == []
