"""The control plane's ASGI app (so far: health and EST): EST on a fast path, FastAPI for the rest."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .. import __version__
from .ca import CertificateAuthority, read_trust_domain
from .enrol import EnrolmentService
from .est import EstEndpoints, EstFastPath, build_router
from .peer import PeerVerifier
from .policy import IssuancePolicy
from .settings import ServerSettings
from .store import CAStore, SQLiteStore
from .timeutil import Clock, utc_now


def create_app(settings: ServerSettings, clock: Clock = utc_now, store: CAStore | None = None) -> EstFastPath:
    """Load the CA from ``settings.ca_dir`` (fails with CAError if unusable) and wire the endpoints;
    the FastAPI app (OpenAPI at /docs) is the result's ``fallback``."""
    trust_domain = read_trust_domain(settings.ca_dir)
    policy = IssuancePolicy(trust_domain, settings.cert_lifetime, settings.backdate, settings.dns_templates)
    ca = CertificateAuthority.load(settings.ca_dir, policy)
    if store is None:
        store = SQLiteStore(settings.paths.database, settings.sqlite_synchronous)
    # The only TLS extension the app sees comes from tlsproto's protocols, after a handshake that
    # verified the client's chain with this intermediate as its only anchor.
    peers = PeerVerifier(ca.cert, trust_domain, signature_checked_by_tls=True)
    service = EnrolmentService(ca, store, peers, clock)
    endpoints = EstEndpoints(service, settings.max_body_bytes)
    app = FastAPI(title="TensorGuard control plane", version=__version__, docs_url="/docs",
                  description="Certificate authority with RFC 7030 (EST) enrolment for robot identities.")
    app.state.enrolment = service

    @app.get("/healthz", tags=["health"], summary="Liveness and CA validity")
    async def healthz() -> dict[str, Any]:
        """The server is up and its intermediate can sign now."""
        now = clock()
        return {"status": "ok" if ca.not_before <= now < ca.not_after else "ca_expired",
                "trust_domain": trust_domain, "intermediate_not_after": ca.not_after.isoformat()}

    app.include_router(build_router(endpoints))
    return EstFastPath(endpoints, app)
