"""RFC 7030 (EST) endpoints over FastAPI: wire formats, body limits and error bodies only.

Requests are `application/pkcs10` (base64 DER, line breaks tolerated; PEM accepted too); answers are
`application/pkcs7-mime; smime-type=certs-only` base64 DER. Refusals are JSON
``{"detail": <reason>, "code": <code>}`` with a 4xx status, and each one is audited.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .enrol import ENROLL, REENROLL, EnrolmentError, EnrolmentService

PREFIX = "/.well-known/est"
PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
PKCS10 = "application/pkcs10"

_CSR_BODY = {
    "requestBody": {
        "required": True,
        "content": {PKCS10: {"schema": {"type": "string", "format": "base64",
                                        "description": "base64 DER PKCS#10 (or PEM) certificate request"}}},
    },
    "responses": {
        "200": {"description": "the issued certificate",
                "content": {PKCS7_CERTS_ONLY: {"schema": {"type": "string", "format": "base64"}}}},
        "400": {"description": "malformed request, bad self-signature or key type not allowed"},
        "401": {"description": "missing, unknown, used or expired credentials"},
        "403": {"description": "the request asks for a name this node may not have"},
        "413": {"description": "body larger than the limit"},
        "415": {"description": "Content-Type is not application/pkcs10"},
    },
}


class BodyError(Exception):
    """The HTTP envelope is wrong before the CSR is even looked at."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known (or seen) to exceed ``limit`` bytes."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != PKCS10:
        raise BodyError(415, "bad_content_type",
                        f"Content-Type must be {PKCS10}, not {media_type or 'missing'}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BodyError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise BodyError(413, "too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyError(413, "too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _remote(request: Request) -> str | None:
    return f"{request.client.host}:{request.client.port}" if request.client else None


def _error(status: int, code: str, reason: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="est"'} if status == 401 else None
    return JSONResponse({"detail": reason, "code": code}, status_code=status, headers=headers)


def _certs(body: bytes) -> Response:
    return Response(body, media_type=PKCS7_CERTS_ONLY, headers={"Content-Transfer-Encoding": "base64"})


def build_router(service: EnrolmentService, max_body: int) -> APIRouter:
    """The three EST endpoints, bound to one enrolment service."""
    router = APIRouter(prefix=PREFIX, tags=["EST (RFC 7030)"])

    @router.get("/cacerts", summary="CA certificates (intermediate and root)",
                responses={200: {"content": {"application/pkcs7-mime": {}}}}, response_class=Response)
    async def cacerts() -> Response:
        """The certificates a client needs to trust this CA, as base64 certs-only PKCS#7."""
        return Response(service.cacerts, media_type="application/pkcs7-mime",
                        headers={"Content-Transfer-Encoding": "base64"})

    @router.post("/simpleenroll", summary="First certificate, authorised by a bootstrap token",
                 openapi_extra=_CSR_BODY, response_class=Response)
    async def simpleenroll(request: Request) -> Response:
        """Send `Authorization: Bearer tgbt_...`; the token is single-use and bound to one node."""
        try:
            body = await read_body(request, max_body)
        except BodyError as exc:
            service.refuse(ENROLL, exc.status, exc.code, exc.reason, _remote(request))
            return _error(exc.status, exc.code, exc.reason)
        try:
            return _certs(service.enroll(body, request.headers.get("authorization"), _remote(request)))
        except EnrolmentError as exc:
            return _error(exc.status, exc.code, exc.reason)

    @router.post("/simplereenroll", summary="Renewal, authorised by the current client certificate (mTLS)",
                 openapi_extra=_CSR_BODY, response_class=Response)
    async def simplereenroll(request: Request) -> Response:
        """Present the current, unexpired certificate in the TLS handshake; the new one is for its node."""
        try:
            body = await read_body(request, max_body)
        except BodyError as exc:
            service.refuse(REENROLL, exc.status, exc.code, exc.reason, _remote(request))
            return _error(exc.status, exc.code, exc.reason)
        try:
            tls = request.scope.get("extensions", {}).get("tls")
            return _certs(service.reenroll(body, tls, _remote(request)))
        except EnrolmentError as exc:
            return _error(exc.status, exc.code, exc.reason)

    return router
