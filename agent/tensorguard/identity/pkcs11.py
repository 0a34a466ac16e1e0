"""The robot's identity key on a PKCS#11 token (HSM, smart card, TPM via tpm2-pkcs11, softhsm2):
generated on the token as non-extractable, used only through the token, so a stolen disk or a
root compromise after the fact cannot copy it.

The token is reached through PyKCS11 (Debian: python3-pykcs11). A key is an ECDSA P-256 pair
named by its label; every renewal makes a new label (``new_label``) and the previous pair is
deleted only once the new certificate is installed (``delete`` / ``prune``).

Ed25519 is refused on a token: Debian 12's OpenSSL pkcs11 engine (libp11 0.4.12), which does the
mTLS of re-enrolment, cannot use EdDSA keys, and one EdDSA key on a token makes it fail to list
every other private key of that token too.

``build_csr_pkcs11`` writes the PKCS#10 DER itself, because cryptography 38 can only sign with a
key it holds; the content is byte for byte what ``keys.build_csr`` asks for.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import secrets
import stat
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from .. import der
from .keys import KeyType, spiffe_id

if TYPE_CHECKING:
    from ..config.schema import Pkcs11Settings

LABEL_PREFIX = "tensorguard-identity-"
LABEL_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")
"""DER OBJECT IDENTIFIER prime256v1 (1.2.840.10045.3.1.7), the CKA_EC_PARAMS of a P-256 key."""
P256_POINT_LEN = 65
"""Uncompressed P-256 point: 0x04 || X || Y."""
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_SUBJECT_ALT_NAME = "2.5.29.17"


class Pkcs11Error(Exception):
    """The token cannot do what was asked; the message names the module, token or key (never the PIN)."""


@dataclass(frozen=True)
class KeyProtection:
    """How the token protects a private key, as it reports it (audited, and checked after generation)."""

    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool
    local: bool


def new_label() -> str:
    """A fresh label per key, so the old key survives until the new certificate is installed."""
    return LABEL_PREFIX + secrets.token_hex(8)


def read_pin(path: Path) -> str:
    """The user PIN from ``path``: 0600/0640 only, one trailing newline ignored (as written by echo)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Pkcs11Error(f"cannot read the PKCS#11 PIN file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise Pkcs11Error(f"the PKCS#11 PIN file {path} is not a regular file")
        if info.st_mode & 0o037:
            raise Pkcs11Error(f"the PKCS#11 PIN file {path} has mode {stat.S_IMODE(info.st_mode):o}: "
                              "it must be 0600 or 0640 (no group write, nothing for others)")
        data = handle.read(1025)
    if len(data) > 1024:
        raise Pkcs11Error(f"the PKCS#11 PIN file {path} is larger than 1024 bytes")
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    try:
        pin = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Pkcs11Error(f"the PKCS#11 PIN file {path} is not UTF-8 text") from None
    if not pin or "\n" in pin:
        raise Pkcs11Error(f"the PKCS#11 PIN file {path} must hold exactly one non-empty line")
    return pin


# -- the binding and the loaded modules --------------------------------------------------------------


@dataclass
class _Module:
    """One loaded PKCS#11 module. PyKCS11 1.5 finalizes the module when a PyKCS11Lib is freed, which
    would close every other session of the process, so each module is loaded once and kept; it is
    initialized without OS locking, so every call into it holds ``lock``."""

    lib: Any
    lock: threading.RLock


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()


def binding() -> ModuleType:
    """PyKCS11, or an error that says which package to install."""
    try:
        return importlib.import_module("PyKCS11")
    except ImportError:
        raise Pkcs11Error("identity.key_store = \"pkcs11\" needs the Python PKCS#11 binding PyKCS11 "
                          "(Debian: apt install python3-pykcs11)") from None


def _load(module: Path) -> _Module:
    p11 = binding()
    with _MODULES_LOCK:
        loaded = _MODULES.get(str(module))
        if loaded is None:
            if not module.is_file():
                raise Pkcs11Error(f"the PKCS#11 module {module} does not exist")
            lib = p11.PyKCS11Lib()
            try:
                lib.load(str(module))
            except p11.PyKCS11Error as exc:
                raise Pkcs11Error(f"cannot load the PKCS#11 module {module}: {exc}") from None
            loaded = _MODULES[str(module)] = _Module(lib, threading.RLock())
        return loaded


# -- the key store ---------------------------------------------------------------------------------


class Pkcs11KeyStore:
    """A logged-in session on one token; keys are addressed by label. Use as a context manager."""

    def __init__(self, module: Path, token_label: str, pin: str) -> None:
        self.module = Path(module)
        self.token_label = token_label
        self._p11 = binding()
        self._mod = _load(self.module)
        self._session: Any = None
        with self._mod.lock:
            slot = self._find_slot()
            try:
                self._session = self._mod.lib.openSession(
                    slot, self._p11.CKF_SERIAL_SESSION | self._p11.CKF_RW_SESSION)
            except self._p11.PyKCS11Error as exc:
                raise Pkcs11Error(f"cannot open a session on {self._where()}: {exc}") from None
            self._login(pin)

    @classmethod
    def from_settings(cls, settings: Pkcs11Settings) -> Pkcs11KeyStore:
        """The store that ``[identity.pkcs11]`` names, with the PIN read from its pin_file."""
        return cls(Path(settings.module), settings.token_label, read_pin(Path(settings.pin_file)))

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore({self._where()})"

    def close(self) -> None:
        """End the session. No C_Logout: login state is shared by all sessions of the process, and
        it ends by itself when the last one closes."""
        with self._mod.lock:
            if self._session is not None:
                with contextlib.suppress(self._p11.PyKCS11Error):
                    self._session.closeSession()
                self._session = None

    # -- keys ------------------------------------------------------------------------------------

    def generate(self, label: str, key_type: KeyType = "ecdsa-p256") -> bytes:
        """Make a key pair on the token (sensitive, never extractable, sign only); its SPKI DER."""
        _check_label(label)
        if key_type != "ecdsa-p256":
            raise Pkcs11Error(f"key type {key_type} is not supported on a PKCS#11 token: OpenSSL's pkcs11 "
                              "engine (libp11 0.4.12, Debian 12) cannot use EdDSA keys for the mTLS of "
                              "re-enrolment; use key_type = \"ecdsa-p256\"")
        p11 = self._p11
        with self._mod.lock:
            if self._objects(label):
                raise Pkcs11Error(f"a key labelled {label!r} already exists on {self._where()}")
            key_id = secrets.token_bytes(16)
            common = [(p11.CKA_TOKEN, p11.CK_TRUE), (p11.CKA_LABEL, label), (p11.CKA_ID, key_id),
                      (p11.CKA_KEY_TYPE, p11.CKK_EC)]
            public = [(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY), *common, (p11.CKA_EC_PARAMS, P256_PARAMS),
                      (p11.CKA_VERIFY, p11.CK_TRUE), (p11.CKA_PRIVATE, p11.CK_FALSE)]
            private = [(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY), *common, (p11.CKA_PRIVATE, p11.CK_TRUE),
                       (p11.CKA_SENSITIVE, p11.CK_TRUE), (p11.CKA_EXTRACTABLE, p11.CK_FALSE),
                       (p11.CKA_SIGN, p11.CK_TRUE), (p11.CKA_DERIVE, p11.CK_FALSE)]
            try:
                self._session.generateKeyPair(public, private, mecha=p11.MechanismECGENERATEKEYPAIR)
            except p11.PyKCS11Error as exc:
                raise Pkcs11Error(f"cannot generate an ECDSA P-256 key {label!r} on {self._where()}: "
                                  f"{exc}") from None
            try:
                protection = self.protection(label)
                if not protection.sensitive or protection.extractable:
                    raise Pkcs11Error(f"{self._where()} generated key {label!r} as extractable or not "
                                      "sensitive although asked not to: refusing to use it")
                return self.public_key_der(label)
            except Pkcs11Error:
                self.delete(label)
                raise

    def public_key_der(self, label: str) -> bytes:
        """The SubjectPublicKeyInfo (DER) of the key pair ``label``, as a CSR and pick_leaf need it."""
        p11 = self._p11
        with self._mod.lock:
            handle = self._one(label, p11.CKO_PUBLIC_KEY)
            params, point = self._attributes(handle, [p11.CKA_EC_PARAMS, p11.CKA_EC_POINT], label)
        if params is None or bytes(params) != P256_PARAMS or point is None:
            raise Pkcs11Error(f"key {label!r} on {self._where()} is not an ECDSA P-256 key")
        raw = bytes(point)
        if len(raw) == P256_POINT_LEN + 2 and raw[:2] == bytes([0x04, P256_POINT_LEN]):
            raw = raw[2:]  # CKA_EC_POINT is a DER OCTET STRING (PKCS#11 2.40); some tokens omit it
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        except ValueError:
            raise Pkcs11Error(f"key {label!r} on {self._where()} has an invalid EC point") from None
        return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    def sign(self, label: str, data: bytes) -> bytes:
        """ECDSA with SHA-256 over ``data`` by the token, DER-encoded (Ecdsa-Sig-Value) as X.509 wants.

        The hash is computed here and the token runs plain CKM_ECDSA, which every token has."""
        p11 = self._p11
        digest = hashlib.sha256(data).digest()
        with self._mod.lock:
            handle = self._one(label, p11.CKO_PRIVATE_KEY)
            try:
                raw = bytes(self._session.sign(handle, digest, p11.Mechanism(p11.CKM_ECDSA, None)))
            except p11.PyKCS11Error as exc:
                raise Pkcs11Error(f"{self._where()} cannot sign with key {label!r}: {exc}") from None
        if len(raw) != 64:
            raise Pkcs11Error(f"{self._where()} returned a {len(raw)}-byte signature for key {label!r}, "
                              "expected 64 (r || s of P-256)")
        return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))

    def delete(self, label: str) -> int:
        """Destroy every object labelled ``label`` (private and public key); how many there were."""
        _check_label(label)
        with self._mod.lock:
            handles = self._objects(label)
            for handle in handles:
                try:
                    self._session.destroyObject(handle)
                except self._p11.PyKCS11Error as exc:
                    raise Pkcs11Error(f"cannot delete key {label!r} on {self._where()}: {exc}") from None
        return len(handles)

    def labels(self, prefix: str = LABEL_PREFIX) -> list[str]:
        """Labels of the private keys on the token that start with ``prefix`` (ours), sorted."""
        p11 = self._p11
        found = set()
        with self._mod.lock:
            for handle in self._find([(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY)]):
                (label,) = self._attributes(handle, [p11.CKA_LABEL], "?")
                if isinstance(label, str) and label.startswith(prefix):
                    found.add(label)
        return sorted(found)

    def prune(self, keep: Collection[str], prefix: str = LABEL_PREFIX) -> list[str]:
        """Delete our keys other than ``keep`` (left by a crash or a failed issuance); their labels."""
        gone = [label for label in self.labels(prefix) if label not in keep]
        for label in gone:
            self.delete(label)
        return gone

    def protection(self, label: str) -> KeyProtection:
        """What the token says about the private key ``label``."""
        p11 = self._p11
        names = [p11.CKA_SENSITIVE, p11.CKA_EXTRACTABLE, p11.CKA_ALWAYS_SENSITIVE,
                 p11.CKA_NEVER_EXTRACTABLE, p11.CKA_LOCAL]
        with self._mod.lock:
            values = self._attributes(self._one(label, p11.CKO_PRIVATE_KEY), names, label)
        # an attribute the token does not report counts as the unsafe answer
        sensitive, extractable, always, never, local = (bool(v) if v is not None else None for v in values)
        return KeyProtection(sensitive is True, extractable is not False, always is True, never is True,
                             local is True)

    # -- helpers ---------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"PKCS#11 token {self.token_label!r} (module {self.module})"

    def _find_slot(self) -> int:
        p11 = self._p11
        try:
            slots = self._mod.lib.getSlotList(tokenPresent=True)
            labels = {slot: self._mod.lib.getTokenInfo(slot).label.strip() for slot in slots}
        except p11.PyKCS11Error as exc:
            raise Pkcs11Error(f"cannot list the tokens of PKCS#11 module {self.module}: {exc}") from None
        matches = [slot for slot, label in labels.items() if label == self.token_label]
        if len(matches) != 1:
            seen = ", ".join(repr(label) for label in sorted(labels.values()) if label) or "none"
            problem = "no token" if not matches else f"{len(matches)} tokens"
            raise Pkcs11Error(f"{problem} labelled {self.token_label!r} in PKCS#11 module {self.module} "
                              f"(tokens present: {seen})")
        return int(matches[0])

    def _login(self, pin: str) -> None:
        p11 = self._p11
        try:
            self._session.login(pin)
        except p11.PyKCS11Error as exc:
            code = exc.value
            if code == p11.CKR_USER_ALREADY_LOGGED_IN:
                return
            self.close()
            if code == p11.CKR_PIN_INCORRECT:
                message = f"wrong PIN for {self._where()}"
            elif code == p11.CKR_PIN_LOCKED:
                message = (f"the PIN of {self._where()} is locked (too many wrong PINs): "
                           "reset it with the SO PIN")
            elif code == p11.CKR_USER_PIN_NOT_INITIALIZED:
                message = f"{self._where()} has no user PIN yet: initialise it first"
            else:
                message = f"cannot log in to {self._where()}: {p11.CKR.get(code, hex(code))}"
            raise Pkcs11Error(message) from None

    def _find(self, template: list[tuple[int, Any]]) -> list[Any]:
        if self._session is None:
            raise Pkcs11Error(f"the session on {self._where()} is closed")
        try:
            return list(self._session.findObjects(template))
        except self._p11.PyKCS11Error as exc:
            raise Pkcs11Error(f"cannot search {self._where()}: {exc}") from None

    def _objects(self, label: str) -> list[Any]:
        return self._find([(self._p11.CKA_LABEL, label)])

    def _one(self, label: str, cls: int) -> Any:
        _check_label(label)
        handles = self._find([(self._p11.CKA_CLASS, cls), (self._p11.CKA_LABEL, label)])
        kind = "private" if cls == self._p11.CKO_PRIVATE_KEY else "public"
        if len(handles) != 1:
            count = "no" if not handles else str(len(handles))
            raise Pkcs11Error(f"{count} {kind} key labelled {label!r} on {self._where()}")
        return handles[0]

    def _attributes(self, handle: Any, names: list[int], label: str) -> list[Any]:
        try:
            return list(self._session.getAttributeValue(handle, names, allAsBinary=False))
        except self._p11.PyKCS11Error as exc:
            raise Pkcs11Error(f"cannot read key {label!r} on {self._where()}: {exc}") from None


def _check_label(label: str) -> None:
    if not LABEL_RE.match(label):
        raise ValueError(f"key label {label!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")


# -- PKCS#10 ---------------------------------------------------------------------------------------


def certification_request_info(public_key_der: bytes, trust_domain: str, node_id: str) -> bytes:
    """The to-be-signed part of the CSR (RFC 2986): CN = node id, extensionRequest with the URI SAN."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]).public_bytes()
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(trust_domain, node_id))])
    extension = der.extension(der.oid(OID_SUBJECT_ALT_NAME), False, san.public_bytes())
    request = der.tlv(der.SEQUENCE, der.oid(OID_EXTENSION_REQUEST)
                      + der.tlv(der.SET, der.tlv(der.SEQUENCE, extension)))
    return der.tlv(der.SEQUENCE, der.integer(0) + subject + public_key_der + der.tlv(0xA0, request))


def build_csr_pkcs11(store: Pkcs11KeyStore, label: str, trust_domain: str, node_id: str) -> bytes:
    """The same request as keys.build_csr, signed by the token key ``label``: DER PKCS#10."""
    info = certification_request_info(store.public_key_der(label), trust_domain, node_id)
    signature = store.sign(label, info)
    return der.tlv(der.SEQUENCE, info + der.ECDSA_WITH_SHA256 + der.tlv(der.BIT_STRING, b"\x00" + signature))
