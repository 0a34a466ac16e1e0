"""The robot's credential life cycle, blocking and synchronous: enrol, renew, install into the
state directory and every sink, reload the services, and audit each step.

The identity unit runs these in a worker thread and decides *when* (renewal.py); tests and the
fault harness can call them directly. Order of an issuance, each step audited:

1. a new key and CSR are made here (the key never leaves the robot);
2. the CA answers over EST (bootstrap token, or mTLS with the current certificate);
3. the answer is checked: the certificate is for our key, names our SPIFFE ID, chains to the
   trust anchor and is currently valid;
4. key, certificate, chain and renewal anchor are swapped into ``state_dir/live`` atomically —
   from here on the new identity is ours, even after a crash;
5. every sink gets the set (atomically too) and its reload hook runs.

A crash between 4 and 5 leaves sinks one certificate behind; ``sync_sinks`` (run at start and
after every issuance) reinstalls any sink whose certificate differs from the live one.
"""

from __future__ import annotations

import datetime
import grp
import logging
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding

from ..config.schema import IdentitySettings, IdentitySink
from .atomicdir import AtomicDir, AtomicDirError, CredentialSet, FileNames
from .audit.log import AuditLog, EntryKind
from .certinfo import validity_of
from .clocks import Clocks
from .est import ClientCredential, EstClient, EstError, EstUnavailable, pick_leaf
from .keys import build_csr, cert_spiffe_ids, generate_key, key_pem, public_der, spiffe_id
from .kube import KubeSinkError, SecretTarget, install_secret
from .pkcs11 import Pkcs11Error, Pkcs11KeyStore, build_csr_pkcs11, new_label
from .pkcs11_est import Pkcs11Credential, key_uri, simplereenroll_pkcs11
from .reload import ReloadError, ReloadHook
from .renewal import Anchor, Validity

log = logging.getLogger(__name__)

ANCHOR_FILE = "anchor.json"
KEY_LABEL_FILE = "key.label"
"""With key_store = "pkcs11": the label of the current key on the token (key.pem then holds its
RFC 7512 URI, which is what nginx or curl take with OpenSSL's pkcs11 engine)."""
SINK_FILES = FileNames(key="key.pem", cert="cert.pem", chain="chain.pem", bundle="fullchain.pem")
"""What a files sink holds: fullchain.pem (certificate + intermediates) is what TLS servers serve."""


class IdentityError(Exception):
    """An issuance or install failed; the message says which step and why (never a secret)."""


@dataclass(frozen=True)
class Current:
    """The identity in ``state_dir/live`` right now."""

    creds: CredentialSet
    cert: x509.Certificate
    validity: Validity
    anchor: Anchor | None

    @property
    def serial(self) -> str:
        return f"{self.cert.serial_number:x}"


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.S)


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (cryptography 38 loads only the first)."""
    return [x509.load_pem_x509_certificate(block) for block in _PEM_CERT.findall(data)]


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class NewKey:
    """A key made for one issuance: its CSR, and what goes to key.pem."""

    csr: x509.CertificateSigningRequest
    public_der: bytes
    key_file: bytes = field(repr=False)
    token_label: str | None = None


class Sink:
    """One configured destination and its reload hook."""

    def __init__(self, config: IdentitySink) -> None:
        self.config = config
        self.name = config.name
        self.hook = ReloadHook(tuple(config.reload_command), config.reload_signal,
                               Path(config.reload_pidfile) if config.reload_pidfile else None)
        self.directory: AtomicDir | None = None
        if config.kind == "files":
            assert config.directory is not None
            uid = pwd.getpwnam(config.owner).pw_uid if config.owner else -1
            gid = grp.getgrnam(config.group).gr_gid if config.group else -1
            self.directory = AtomicDir(config.directory, mode=0o644, key_mode=int(config.key_mode, 8),
                                       uid=uid, gid=gid, names=SINK_FILES)

    def installed_cert(self) -> bytes | None:
        """The certificate this sink holds now (files sinks; None when unknown or empty)."""
        if self.directory is None:
            return None
        try:
            current = self.directory.current()
        except (AtomicDirError, OSError):
            return None
        return current.cert if current else None

    def install(self, creds: CredentialSet, node_id: str) -> str:
        if self.directory is not None:
            path = Path(self.directory.path)
            if not path.exists():
                path.mkdir(mode=0o750, parents=True)
            self.directory.install(CredentialSet(creds.key, creds.cert, creds.chain,
                                                 creds.cert + creds.chain))
            return f"files in {path}"
        target = SecretTarget(self.config.namespace, self.config.secret or "",
                              Path(self.config.kubeconfig) if self.config.kubeconfig else None)
        version = install_secret(target, creds.cert + creds.chain, creds.key, creds.chain,
                                 {"tensorguard.io/node": node_id})
        return f"secret {target.namespace}/{target.name} (resourceVersion {version})"


class CredentialManager:
    """Owns ``state_dir/live``, the sinks and the audit trail of one robot."""

    def __init__(self, settings: IdentitySettings, node_id: str, clocks: Clocks, audit: AuditLog,
                 *, est: Callable[[], EstClient] | None = None) -> None:
        self.settings = settings
        self.node_id = node_id
        self.clocks = clocks
        self.audit = audit
        self.spiffe_id = spiffe_id(settings.trust_domain, node_id)
        state = Path(settings.state_dir)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        live = state / "live"
        live.mkdir(mode=0o700, exist_ok=True)
        self.live = AtomicDir(live, mode=0o600, key_mode=0o600)
        self.live.recover()
        self.sinks = [Sink(s) for s in settings.sink]
        self.sink_problems: list[str] = []
        """What the last sync_sinks could not do (retried at the next one)."""
        self._est = est or (lambda: EstClient(settings.server_url or "", Path(settings.trust_anchor)))

    # -- what is installed ----------------------------------------------------------------------

    def current(self) -> Current | None:
        creds = self.live.current()
        if creds is None:
            return None
        cert = x509.load_pem_x509_certificate(creds.cert)
        anchor_bytes = creds.extra_file(ANCHOR_FILE)
        anchor = None
        if anchor_bytes is not None:
            try:
                anchor = Anchor.from_bytes(anchor_bytes, f"{self.live.path}/{ANCHOR_FILE}")
            except ValueError as exc:
                log.warning("identity: %s; renewal timing falls back to the wall clock", exc)
        return Current(creds, cert, validity_of(creds.cert, f"{self.live.path}/cert.pem"), anchor)

    # -- issuance -------------------------------------------------------------------------------

    def enrol(self, token: str) -> Current:
        """First enrolment (or the way back after expiry) with a one-time bootstrap token."""
        return self._issue("enrol", lambda client, csr: client.simpleenroll(csr, token))

    def renew(self) -> Current:
        """Re-enrolment over mTLS with the current, unexpired certificate."""
        current = self.current()
        if current is None:
            raise IdentityError("nothing to renew: not enrolled yet (needs a bootstrap token)")
        live = Path(self.live.path)
        label = current.creds.extra_file(KEY_LABEL_FILE)
        if self.settings.key_store == "pkcs11" and label is not None:
            p11 = self.settings.pkcs11
            token_key = Pkcs11Credential(live / "cert.pem", Path(p11.module), p11.token_label,
                                         label.decode().strip(), Path(p11.pin_file))
            return self._issue("renew", lambda _client, csr: simplereenroll_pkcs11(
                self.settings.server_url or "", Path(self.settings.trust_anchor), token_key,
                csr.public_bytes(Encoding.DER)))
        credential = ClientCredential(live / "cert.pem", live / "key.pem")
        return self._issue("renew", lambda client, csr: client.simplereenroll(csr, credential))

    def _new_key(self) -> NewKey:
        """A fresh key, in a file-to-be or on the PKCS#11 token, and its CSR."""
        if self.settings.key_store == "file":
            key = generate_key(self.settings.key_type)
            return NewKey(build_csr(key, self.settings.trust_domain, self.node_id), public_der(key),
                          key_pem(key))
        p11 = self.settings.pkcs11
        label = new_label()
        try:
            with Pkcs11KeyStore.from_settings(p11) as store:
                spki = store.generate(label, self.settings.key_type)
                der = build_csr_pkcs11(store, label, self.settings.trust_domain, self.node_id)
        except (Pkcs11Error, OSError) as exc:
            raise IdentityError(f"PKCS#11: {exc}") from None
        uri = key_uri(p11.token_label, label) + "\n"  # where the key is; no secret in it
        return NewKey(x509.load_der_x509_csr(der), spki, uri.encode(), label)

    def prune_token_keys(self) -> list[str]:
        """Delete keys a crash left on the token: every one of ours but the live one."""
        if self.settings.key_store != "pkcs11":
            return []
        current = self.current()
        label = current.creds.extra_file(KEY_LABEL_FILE) if current else None
        keep = {label.decode().strip()} if label else set()
        try:
            with Pkcs11KeyStore.from_settings(self.settings.pkcs11) as store:
                removed = store.prune(keep)
        except (Pkcs11Error, OSError) as exc:
            log.warning("identity: cannot tidy the PKCS#11 token: %s", exc)
            return []
        if removed:
            log.info("identity: removed %d unused key(s) from the PKCS#11 token", len(removed))
        return removed

    def _forget_token_key(self, label: str | None) -> None:
        """Delete a key from the token (an unused new one, or the one a renewal replaced)."""
        if label is None:
            return
        try:
            with Pkcs11KeyStore.from_settings(self.settings.pkcs11) as store:
                store.delete(label)
        except (Pkcs11Error, OSError) as exc:
            log.warning("identity: could not delete key %s from the PKCS#11 token: %s", label, exc)

    def _issue(self, kind: str, request: Callable[[EstClient, x509.CertificateSigningRequest],
                                                  list[x509.Certificate]]) -> Current:
        entry_kind = EntryKind.ENROL if kind == "enrol" else EntryKind.RENEW
        previous = self.current()
        new = self._new_key()
        try:
            client = self._est()
            certs = request(client, new.csr)
            leaf, chain = pick_leaf(certs, new.public_der)
            if not any(c.subject == leaf.issuer for c in chain):
                # RFC 7030 4.1: the chain comes from /cacerts; serve it without the root itself
                chain = [c for c in client.cacerts() if c.subject != c.issuer]
            self._check(leaf, chain)
        except EstError as exc:
            self._forget_token_key(new.token_label)
            self._fail(kind, exc.reason, status=exc.status)
            raise IdentityError(f"{kind}: {exc}") from None
        except (EstUnavailable, IdentityError) as exc:
            self._forget_token_key(new.token_label)
            self._fail(kind, str(exc))
            raise IdentityError(f"{kind}: {exc}") from None
        anchor = Anchor.take(self.clocks)
        extra = [(ANCHOR_FILE, anchor.to_bytes())]
        if new.token_label is not None:
            extra.append((KEY_LABEL_FILE, new.token_label.encode() + b"\n"))
        creds = CredentialSet(new.key_file, leaf.public_bytes(Encoding.PEM), _pem(chain),
                              extra=tuple(extra))
        try:
            self.live.install(creds)
        except AtomicDirError as exc:
            self._forget_token_key(new.token_label)
            self._fail(kind, f"installing in {self.live.path}: {exc}")
            raise IdentityError(f"{kind}: {exc}") from None
        if previous is not None and new.token_label is not None:
            old = previous.creds.extra_file(KEY_LABEL_FILE)
            self._forget_token_key(old.decode().strip() if old else None)
        self.audit.append(entry_kind, {"node": self.node_id, "spiffe_id": self.spiffe_id,
                                       "serial": f"{leaf.serial_number:x}",
                                       "not_after": _iso(validity_of(creds.cert).not_after),
                                       "key_type": self.settings.key_type,
                                       "key_store": self.settings.key_store})
        log.info("identity: %s: certificate %x valid until %s", kind, leaf.serial_number,
                 leaf.not_valid_after.isoformat())
        self.sync_sinks()
        current = self.current()
        assert current is not None
        return current

    def _check(self, leaf: x509.Certificate, chain: list[x509.Certificate]) -> None:
        """Accept only a certificate that is ours, names us and chains to the trust anchor."""
        ids = cert_spiffe_ids(leaf)
        if ids != [self.spiffe_id]:
            raise IdentityError(f"the CA issued a certificate for {ids or 'no SPIFFE ID'}, "
                                f"expected {self.spiffe_id}")
        validity = Validity(leaf.not_valid_before.replace(tzinfo=datetime.UTC).timestamp(),
                            leaf.not_valid_after.replace(tzinfo=datetime.UTC).timestamp())
        now = self.clocks.wall()
        if now >= validity.not_after:
            raise IdentityError(f"the CA issued a certificate that expired at {_iso(validity.not_after)}")
        anchors = load_pem_certificates(Path(self.settings.trust_anchor).read_bytes())
        issuer = leaf
        for _ in range(len(chain) + 1):
            if any(issuer.issuer == a.subject and _signed_by(issuer, a) for a in anchors):
                return
            parent = next((c for c in chain if c.subject == issuer.issuer and _signed_by(issuer, c)),
                          None)
            if parent is None:
                break
            issuer = parent
        raise IdentityError(f"the certificate does not chain to the trust anchor "
                            f"{self.settings.trust_anchor}")

    def _fail(self, kind: str, reason: str, **fields: Any) -> None:
        log.error("identity: %s failed: %s", kind, reason)
        self.audit.append(EntryKind.FAILURE, {"node": self.node_id, "operation": kind,
                                              "reason": reason[:500], **fields})

    # -- sinks ----------------------------------------------------------------------------------

    def sync_sinks(self) -> list[str]:
        """Install the live set into every sink that does not hold it yet, then reload it.

        Returns the problems (also logged and audited); a failed sink is retried next time."""
        current = self.current()
        if current is None:
            return []
        problems = []
        for sink in self.sinks:
            if sink.directory is not None and sink.installed_cert() == current.creds.cert:
                continue
            try:
                where = sink.install(current.creds, self.node_id)
            except (AtomicDirError, KubeSinkError, OSError) as exc:
                problems.append(f"sink {sink.name}: {exc}")
                self._fail("install", f"sink {sink.name}: {exc}", sink=sink.name)
                continue
            self.audit.append(EntryKind.INSTALL, {"node": self.node_id, "sink": sink.name,
                                                  "serial": current.serial, "where": where})
            if sink.hook.describe() == "none":
                continue
            try:
                sink.hook.run()
            except ReloadError as exc:
                problems.append(f"sink {sink.name}: {exc}")
                self._fail("reload", str(exc), sink=sink.name)
                continue
            self.audit.append(EntryKind.RELOAD, {"node": self.node_id, "sink": sink.name,
                                                 "serial": current.serial, "hook": sink.hook.describe()})
        self.sink_problems = problems
        return problems


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """cryptography 38 has no verify_directly_issued_by: check the signature by key type."""
    public = issuer.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            assert cert.signature_hash_algorithm is not None
            public.verify(cert.signature, cert.tbs_certificate_bytes,
                          ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, AssertionError):
        return False
    return True
