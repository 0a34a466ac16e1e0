"""Identity audit trail: an RFC 9162 Merkle log of identity operations with C2SP signed checkpoints."""

from .log import (
    AuditError,
    AuditLog,
    EntryKind,
    OpenReport,
    VerifyError,
    VerifyResult,
    verify_log_directory,
)
from .merkle import ProofError, verify_consistency, verify_inclusion
from .note import Checkpoint, Ed25519Signer, Ed25519Verifier, NoteError
from .storage import KeyFileError, create_signer_key, load_or_create_signer_key, load_signer_key

__all__ = [
    "AuditError",
    "AuditLog",
    "Checkpoint",
    "Ed25519Signer",
    "Ed25519Verifier",
    "EntryKind",
    "KeyFileError",
    "NoteError",
    "OpenReport",
    "ProofError",
    "VerifyError",
    "VerifyResult",
    "create_signer_key",
    "load_or_create_signer_key",
    "load_signer_key",
    "verify_consistency",
    "verify_inclusion",
    "verify_log_directory",
]
