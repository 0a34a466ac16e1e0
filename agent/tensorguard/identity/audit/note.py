"""C2SP signed notes and tlog checkpoints (Ed25519): the signed statement of a log's size and root.

Formats follow https://c2sp.org/signed-note and https://c2sp.org/tlog-checkpoint, and the key
encodings (``name+hexid+base64(0x01||key)``, ``PRIVATE+KEY+name+hexid+base64(0x01||seed)``) are
those of the Go ``golang.org/x/mod/sumdb/note`` package, so keys and notes interoperate with the
Go tooling that witnesses and monitors use. Private key material never appears in an exception.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "  # em dash, space
MAX_SIGNATURES = 100  # the spec requires accepting at least 16; Go's note.Open stops at 100
MAX_NOTE_BYTES = 1 << 20  # post-quantum signatures reach ~5 kB each; 100 of them fit easily
MAX_TREE_SIZE = (1 << 64) - 1

_HEX_ID = re.compile(r"[0-9a-fA-F]{8}")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class NoteError(ValueError):
    """A note, key or checkpoint is malformed or not signed as required; the message says how."""


class MalformedNoteError(NoteError):
    """The bytes do not follow the signed-note or checkpoint syntax."""


class InvalidSignatureError(NoteError):
    """A signature from a known key did not verify: the whole note is rejected (spec: SHOULD)."""


class UnverifiedNoteError(NoteError):
    """No signature from a known key was present: the note text must be ignored (spec: MUST)."""


def is_valid_key_name(name: str) -> bool:
    """Key names are non-empty and contain no Unicode space, no plus and no control character."""
    return bool(name) and "+" not in name and not any(ch.isspace() or ord(ch) < 0x20 for ch in name)


def key_id(name: str, alg: int, public_key: bytes) -> int:
    """The recommended key ID: SHA-256(name || 0x0A || alg || public key)[:4] as a big-endian uint32."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MalformedNoteError(f"{what} is not valid base64") from None


def _check_name(name: str, what: str) -> None:
    if not is_valid_key_name(name):
        raise NoteError(f"{what} {name!r} is not a valid key name (non-empty, no spaces, no '+')")


class Ed25519Verifier:
    """An Ed25519 public key bound to a key name: what an auditor is configured with."""

    def __init__(self, name: str, public_key: bytes) -> None:
        _check_name(name, "verifier key name")
        if len(public_key) != 32:
            raise NoteError(f"Ed25519 public key for {name!r} must be 32 bytes, got {len(public_key)}")
        self.name = name
        self.public_key = bytes(public_key)
        self.key_id = key_id(name, ALG_ED25519, self.public_key)
        self._key = Ed25519PublicKey.from_public_bytes(self.public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> Ed25519Verifier:
        """Parse ``name+hexid+base64(0x01||pubkey)``, checking that the ID matches the key."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3 or not _HEX_ID.fullmatch(parts[1]):
            raise NoteError("verifier key must look like name+8-hex-digit-id+base64-key")
        name, hex_id, b64 = parts
        raw = _b64decode(b64, f"verifier key {name!r}")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError(f"verifier key {name!r} is not an Ed25519 (0x01) key of 32 bytes")
        verifier = cls(name, raw[1:])
        if verifier.key_id != int(hex_id, 16):
            raise NoteError(f"verifier key {name!r}: ID {hex_id} does not match the key "
                            f"(expected {verifier.key_id:08x})")
        return verifier

    @property
    def vkey(self) -> str:
        """The encoded verifier key to hand to auditors."""
        raw = base64.b64encode(bytes([ALG_ED25519]) + self.public_key).decode()
        return f"{self.name}+{self.key_id:08x}+{raw}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class Ed25519Signer:
    """An Ed25519 private key bound to a key name; repr and errors never show the key."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        _check_name(name, "signer key name")
        self.name = name
        self._key = private_key
        public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._verifier = Ed25519Verifier(name, public)
        self.key_id = self._verifier.key_id

    def __repr__(self) -> str:
        return f"Ed25519Signer(name={self.name!r}, key_id={self.key_id:08x})"

    @classmethod
    def generate(cls, name: str) -> Ed25519Signer:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_skey(cls, skey: str) -> Ed25519Signer:
        """Parse ``PRIVATE+KEY+name+hexid+base64(0x01||seed)``, checking the ID against the key."""
        parts = skey.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"] or not _HEX_ID.fullmatch(parts[3]):
            raise NoteError("signer key must look like PRIVATE+KEY+name+8-hex-digit-id+base64-key")
        name, hex_id, b64 = parts[2:]
        try:
            raw = base64.b64decode(b64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise NoteError(f"signer key {name!r} is not valid base64") from None
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError(f"signer key {name!r} is not an Ed25519 (0x01) seed of 32 bytes")
        signer = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if signer.key_id != int(hex_id, 16):
            raise NoteError(f"signer key {name!r}: ID {hex_id} does not match the key "
                            f"(expected {signer.key_id:08x})")
        return signer

    def skey(self) -> str:
        """The encoded private key; a secret, for a 0600 key file only."""
        seed = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        raw = base64.b64encode(bytes([ALG_ED25519]) + seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.key_id:08x}+{raw}"

    def verifier(self) -> Ed25519Verifier:
        return self._verifier

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


@dataclass(frozen=True)
class Signature:
    """One signature line: key name, key ID and the raw signature bytes (after the ID)."""

    name: str
    key_id: int
    signature: bytes

    def line(self) -> str:
        b64 = base64.b64encode(self.key_id.to_bytes(4, "big") + self.signature).decode()
        return f"{SIG_PREFIX}{self.name} {b64}\n"


@dataclass(frozen=True)
class Note:
    """A note's text (ending in newline) and every syntactically valid signature on it."""

    text: str
    signatures: tuple[Signature, ...]


@dataclass(frozen=True)
class OpenedNote:
    """A note whose text may be trusted: ``verified`` holds at least one good known signature."""

    text: str
    verified: tuple[Signature, ...]
    unverified: tuple[Signature, ...]


def _check_text(text: str, what: str) -> None:
    if not text.endswith("\n"):
        raise MalformedNoteError(f"{what} must end with a newline")
    for ch in text:
        if ord(ch) < 0x20 and ch != "\n":
            raise MalformedNoteError(f"{what} contains control character {ord(ch):#04x}")


def parse_note(data: bytes, *, max_bytes: int = MAX_NOTE_BYTES,
               max_signatures: int = MAX_SIGNATURES) -> Note:
    """Split a signed note into text and signatures, enforcing every syntax rule of the spec.

    Signatures are not checked here; use ``open_note`` before trusting the text.
    """
    if max_signatures < 16:
        raise ValueError("the signed-note spec requires accepting at least 16 signatures")
    if len(data) > max_bytes:
        raise MalformedNoteError(f"note is {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        message = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedNoteError(f"note is not valid UTF-8 (byte {exc.start})") from None
    for ch in message:
        if ord(ch) < 0x20 and ch != "\n":
            raise MalformedNoteError(f"note contains control character {ord(ch):#04x} "
                                     "(CRLF line ends are not allowed)")
    split = message.rfind("\n\n")
    if split < 0:
        raise MalformedNoteError("note has no blank line between text and signatures")
    text, block = message[:split + 1], message[split + 2:]
    if not block or not block.endswith("\n"):
        raise MalformedNoteError("note signature block is empty or does not end with a newline")
    signatures = []
    for number, line in enumerate(block[:-1].split("\n"), start=1):
        if number > max_signatures:
            raise MalformedNoteError(f"note has more than {max_signatures} signatures")
        if not line.startswith(SIG_PREFIX):
            raise MalformedNoteError(f"signature line {number} does not start with an em dash and a space")
        name, _, b64 = line[len(SIG_PREFIX):].partition(" ")
        if not is_valid_key_name(name) or not b64:
            raise MalformedNoteError(f"signature line {number} has no valid key name and signature")
        raw = _b64decode(b64, f"signature line {number}")
        if len(raw) < 5:
            raise MalformedNoteError(f"signature line {number} is shorter than a key ID and a signature")
        signatures.append(Signature(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    return Note(text, tuple(signatures))


def open_note(data: bytes, verifiers: Sequence[Ed25519Verifier], *, max_bytes: int = MAX_NOTE_BYTES,
              max_signatures: int = MAX_SIGNATURES) -> OpenedNote:
    """Parse and verify a note against known keys, with the spec's rules for unknown and bad ones.

    Signatures whose (name, key ID) is unknown are ignored; the first signature of a known key
    is verified and, if bad, rejects the whole note; a note with no good known signature fails.
    """
    known: dict[tuple[str, int], Ed25519Verifier] = {}
    for v in verifiers:
        if (v.name, v.key_id) in known and known[(v.name, v.key_id)].public_key != v.public_key:
            raise NoteError(f"two different verifier keys share name {v.name!r} and ID {v.key_id:08x}")
        known[(v.name, v.key_id)] = v
    note = parse_note(data, max_bytes=max_bytes, max_signatures=max_signatures)
    message = note.text.encode()
    verified: list[Signature] = []
    unverified: list[Signature] = []
    seen: set[tuple[str, int]] = set()
    for sig in note.signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            if sig not in unverified:
                unverified.append(sig)
            continue
        if (sig.name, sig.key_id) in seen:
            continue
        seen.add((sig.name, sig.key_id))
        if not verifier.verify(message, sig.signature):
            raise InvalidSignatureError(f"signature by {sig.name}+{sig.key_id:08x} does not verify")
        verified.append(sig)
    if not verified:
        names = ", ".join(f"{v.name}+{v.key_id:08x}" for v in known.values()) or "none"
        raise UnverifiedNoteError(f"note carries no signature from a known key (known: {names})")
    return OpenedNote(note.text, tuple(verified), tuple(unverified))


def sign_note(text: str, signers: Sequence[Ed25519Signer]) -> bytes:
    """Sign a note text (ending in newline) with each signer, in order."""
    _check_text(text, "note text")
    if not signers:
        raise ValueError("a signed note needs at least one signer")
    message = text.encode()
    lines = [Signature(s.name, s.key_id, s.sign(message)).line() for s in signers]
    return (text + "\n" + "".join(lines)).encode()


@dataclass(frozen=True)
class Checkpoint:
    """A tlog checkpoint body: origin, tree size, root hash and optional extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin or any(ord(c) < 0x20 for c in self.origin):
            raise MalformedNoteError("checkpoint origin must be a non-empty line without control characters")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise MalformedNoteError(f"checkpoint tree size {self.size} is outside 0..2**64-1")
        if len(self.root) != 32:
            raise MalformedNoteError(f"checkpoint root hash must be 32 bytes, got {len(self.root)}")
        for ext in self.extensions:
            if not ext or "\n" in ext or any(ord(c) < 0x20 for c in ext):
                raise MalformedNoteError("checkpoint extension lines must be non-empty single lines")

    def text(self) -> str:
        """The note text this checkpoint signs."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text strictly: decimal size without leading zeros, 32-byte root."""
        _check_text(text, "checkpoint text")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedNoteError(f"checkpoint text has {len(lines)} lines, needs at least 3")
        origin, size_line, root_line, *extensions = lines
        if not _DECIMAL.fullmatch(size_line):
            raise MalformedNoteError(f"checkpoint tree size {size_line!r} is not a decimal without "
                                     "leading zeros")
        root = _b64decode(root_line, "checkpoint root hash")
        if base64.b64encode(root).decode() != root_line:
            raise MalformedNoteError("checkpoint root hash is not canonical base64")
        return cls(origin, int(size_line), root, tuple(extensions))

    def sign(self, signer: Ed25519Signer) -> bytes:
        return sign_note(self.text(), [signer])


def open_checkpoint(data: bytes, verifiers: Sequence[Ed25519Verifier]) -> Checkpoint:
    """Verify a signed checkpoint and parse its body: the only way to get a trusted size and root."""
    return Checkpoint.from_text(open_note(data, verifiers).text)
