"""C2SP signed notes and checkpoints: published vectors and every parsing rule of the specs."""

from __future__ import annotations

import base64
import hashlib

import pytest

from tensorguard.identity.audit import note as n
from tensorguard.identity.audit.note import (
    Checkpoint,
    Ed25519Signer,
    Ed25519Verifier,
    InvalidSignatureError,
    MalformedNoteError,
    NoteError,
    UnverifiedNoteError,
)

# Published example from the Go package golang.org/x/mod/sumdb/note (package documentation,
# "Example" section): signer key, verifier key, note text and the resulting signed note, plus
# the same note re-signed by a second key "EnochRoot" whose verifier key is not published.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
GO_SIG_LINE = ("\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvq"
               "fqdngotpRZb6KE6RyyBwJnAM=\n")
GO_ENOCH_LINE = ("\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTG"
                 "wnWLox33WWd1RvMc+QQ=\n")
GO_NOTE = (GO_TEXT + "\n" + GO_SIG_LINE).encode()

# Example checkpoint from the C2SP tlog-checkpoint specification (https://c2sp.org/tlog-checkpoint).
C2SP_CHECKPOINT = ("example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
                   "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/"
                   "Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n").encode()


@pytest.fixture(scope="module")
def go_verifier() -> Ed25519Verifier:
    return Ed25519Verifier.from_vkey(GO_VKEY)


def test_go_vector_signs_byte_for_byte() -> None:
    signer = Ed25519Signer.from_skey(GO_SKEY)
    assert signer.key_id == 0xC74F20A3
    assert signer.skey() == GO_SKEY
    assert signer.verifier().vkey == GO_VKEY
    assert n.sign_note(GO_TEXT, [signer]) == GO_NOTE


def test_key_id_is_sha256_of_name_newline_alg_key(go_verifier: Ed25519Verifier) -> None:
    expected = hashlib.sha256(b"PeterNeumann\n\x01" + go_verifier.public_key).digest()[:4]
    assert go_verifier.key_id.to_bytes(4, "big") == expected
    assert n.key_id("PeterNeumann", 1, go_verifier.public_key) == int.from_bytes(expected, "big")


def test_go_vector_opens(go_verifier: Ed25519Verifier) -> None:
    opened = n.open_note(GO_NOTE, [go_verifier])
    assert opened.text == GO_TEXT
    assert [(s.name, s.key_id) for s in opened.verified] == [("PeterNeumann", 0xC74F20A3)]
    assert opened.unverified == ()


def test_unknown_key_signature_is_ignored(go_verifier: Ed25519Verifier) -> None:
    both = (GO_TEXT + "\n" + GO_SIG_LINE + GO_ENOCH_LINE).encode()
    opened = n.open_note(both, [go_verifier])
    assert [s.name for s in opened.verified] == ["PeterNeumann"]
    assert [s.name for s in opened.unverified] == ["EnochRoot"]
    # Order does not matter, and a signature only by unknown keys is not enough.
    assert n.open_note((GO_TEXT + "\n" + GO_ENOCH_LINE + GO_SIG_LINE).encode(), [go_verifier]).verified
    with pytest.raises(UnverifiedNoteError, match="no signature from a known key"):
        n.open_note((GO_TEXT + "\n" + GO_ENOCH_LINE).encode(), [go_verifier])


def test_bad_signature_from_known_key_rejects_the_note(go_verifier: Ed25519Verifier) -> None:
    raw = bytearray(base64.b64decode(GO_SIG_LINE.split(" ")[2]))
    raw[10] ^= 1
    bad_line = f"\u2014 PeterNeumann {base64.b64encode(bytes(raw)).decode()}\n"
    with pytest.raises(InvalidSignatureError, match="PeterNeumann\\+c74f20a3"):
        n.open_note((GO_TEXT + "\n" + bad_line).encode(), [go_verifier])
    # A good signature elsewhere does not rescue a note carrying a bad one from the same key
    # when the bad one comes first (the first signature of a known key decides, as in Go).
    with pytest.raises(InvalidSignatureError):
        n.open_note((GO_TEXT + "\n" + bad_line + GO_SIG_LINE).encode(), [go_verifier])


def test_edited_text_fails_signature(go_verifier: Ed25519Verifier) -> None:
    edited = GO_NOTE.replace(b"problem is", b"problem was")
    with pytest.raises(InvalidSignatureError):
        n.open_note(edited, [go_verifier])


def test_wrong_key_id_or_name_is_an_unknown_key(go_verifier: Ed25519Verifier) -> None:
    raw = bytearray(base64.b64decode(GO_SIG_LINE.split(" ")[2]))
    raw[0] ^= 0xFF  # same name, different key ID
    wrong_id = f"\u2014 PeterNeumann {base64.b64encode(bytes(raw)).decode()}\n"
    with pytest.raises(UnverifiedNoteError):
        n.open_note((GO_TEXT + "\n" + wrong_id).encode(), [go_verifier])
    wrong_name = GO_SIG_LINE.replace("PeterNeumann", "PeterNeuman")  # same ID, different name
    with pytest.raises(UnverifiedNoteError):
        n.open_note((GO_TEXT + "\n" + wrong_name).encode(), [go_verifier])
    # ...and an unknown key beside a good signature is merely ignored.
    opened = n.open_note((GO_TEXT + "\n" + wrong_id + GO_SIG_LINE).encode(), [go_verifier])
    assert len(opened.verified) == 1 and len(opened.unverified) == 1


@pytest.mark.parametrize(("data", "reason"), [
    (GO_TEXT.encode() + GO_SIG_LINE.encode(), "no blank line"),
    (GO_NOTE.replace(b"\n", b"\r\n"), "control character 0x0d"),
    (GO_NOTE.replace(b"cryptography", b"crypto\tgraphy"), "control character 0x09"),
    (GO_NOTE[:-1], "does not end with a newline"),
    (GO_TEXT.encode() + b"\n", "signature block is empty"),
    (GO_NOTE.replace("\u2014 ".encode(), b"-- "), "em dash"),
    (GO_NOTE.replace("\u2014 ".encode(), "\u2014".encode()), "em dash"),
    (GO_NOTE.replace(b"PeterNeumann x08go", b"Peter+Neumann x08go"), "key name"),
    (GO_NOTE.replace(b"PeterNeumann x08go", b"PeterNeumann  x08go"), "base64"),
    (GO_NOTE.replace(b"x08go", b"x08g!"), "base64"),
    (GO_TEXT.encode() + "\n\u2014 PeterNeumann AAAAAA==\n".encode(), "shorter than a key ID"),
    (GO_TEXT.encode() + "\n\u2014 PeterNeumann\n".encode(), "key name and signature"),
    (b"\xff" + GO_NOTE, "UTF-8"),
])
def test_malformed_notes_are_rejected(data: bytes, reason: str, go_verifier: Ed25519Verifier) -> None:
    with pytest.raises(MalformedNoteError, match=reason):
        n.open_note(data, [go_verifier])


def test_text_may_contain_blank_lines_split_is_at_the_last_one(go_verifier: Ed25519Verifier) -> None:
    signer = Ed25519Signer.generate("quasimodo.example/salvatore")
    text = "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned \u00e8 subito sera.\n"
    opened = n.open_note(n.sign_note(text, [signer]), [signer.verifier()])
    assert opened.text == text


def test_size_limit() -> None:
    signer = Ed25519Signer.generate("example.com/log")
    small = n.sign_note("x\n", [signer])
    with pytest.raises(MalformedNoteError, match="more than the limit of 50"):
        n.open_note(small, [signer.verifier()], max_bytes=50)
    huge = n.sign_note("y" * n.MAX_NOTE_BYTES + "\n", [signer])
    with pytest.raises(MalformedNoteError, match=f"limit of {n.MAX_NOTE_BYTES}"):
        n.open_note(huge, [signer.verifier()])


def test_signature_count_limit() -> None:
    signer = Ed25519Signer.generate("example.com/log")
    others = [Ed25519Signer.generate(f"example.com/witness{i}") for i in range(n.MAX_SIGNATURES)]
    at_limit = n.sign_note("x\n", [signer, *others[:n.MAX_SIGNATURES - 1]])
    assert n.open_note(at_limit, [signer.verifier()]).verified
    over = n.sign_note("x\n", [signer, *others])
    with pytest.raises(MalformedNoteError, match=f"more than {n.MAX_SIGNATURES} signatures"):
        n.open_note(over, [signer.verifier()])
    with pytest.raises(ValueError, match="at least 16"):
        n.parse_note(at_limit, max_signatures=15)


def test_duplicate_verifiers_with_same_key_are_fine_and_signing_needs_valid_text() -> None:
    signer = Ed25519Signer.generate("example.com/log")
    note = n.sign_note("a\n", [signer, signer])
    assert len(n.open_note(note, [signer.verifier(), signer.verifier()]).verified) == 1
    with pytest.raises(MalformedNoteError, match="end with a newline"):
        n.sign_note("a", [signer])
    with pytest.raises(MalformedNoteError, match="control character"):
        n.sign_note("a\r\n", [signer])
    with pytest.raises(ValueError, match="at least one signer"):
        n.sign_note("a\n", [])


@pytest.mark.parametrize(("vkey", "reason"), [
    ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match the key"),
    ("PeterNeumann+c74f20a+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "8-hex-digit"),
    ("PeterNeumann+0xf20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "8-hex-digit"),
    ("PeterNeumann+c74f20a3+AhpcN2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "base64"),
    ("PeterNeumann+c74f20a3+Ahpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "0x01"),
    ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "not a valid key name"),
    ("PeterNeumann", "name\\+8-hex-digit-id"),
])
def test_bad_verifier_keys(vkey: str, reason: str) -> None:
    with pytest.raises(NoteError, match=reason):
        Ed25519Verifier.from_vkey(vkey)


def test_verifier_key_must_be_one_algorithm_byte_and_32_bytes(go_verifier: Ed25519Verifier) -> None:
    short = base64.b64encode(b"\x01" + go_verifier.public_key[:31]).decode()
    with pytest.raises(NoteError, match="32 bytes"):
        Ed25519Verifier.from_vkey(f"PeterNeumann+c74f20a3+{short}")
    other_alg = base64.b64encode(b"\x02" + go_verifier.public_key).decode()
    with pytest.raises(NoteError, match="0x01"):
        Ed25519Verifier.from_vkey(f"PeterNeumann+c74f20a3+{other_alg}")
    assert Ed25519Verifier.from_vkey(GO_VKEY.replace("c74f20a3", "C74F20A3")).key_id == 0xC74F20A3


def test_bad_signer_keys_never_echo_the_secret() -> None:
    seed_b64 = GO_SKEY.rsplit("+", 1)[1]
    for bad in [GO_SKEY.replace("PRIVATE+KEY", "PRIVATE+KEX"), GO_SKEY.replace("c74f20a3", "c74f20a4"),
                GO_SKEY[:-2], GO_SKEY.replace("+AYEK", "+AiEK")]:
        with pytest.raises(NoteError) as info:
            Ed25519Signer.from_skey(bad)
        assert seed_b64[:12] not in str(info.value)
    signer = Ed25519Signer.from_skey(GO_SKEY)
    assert seed_b64[:12] not in repr(signer)


def test_checkpoint_round_trip_and_c2sp_example() -> None:
    parsed = Checkpoint.from_text(n.parse_note(C2SP_CHECKPOINT).text)
    assert parsed.origin == "example.com/behind-the-sofa"
    assert parsed.size == 20852163
    assert parsed.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    signer = Ed25519Signer.generate("example.com/behind-the-sofa")
    with pytest.raises(UnverifiedNoteError):  # the spec's example is signed by a key we do not know
        n.open_checkpoint(C2SP_CHECKPOINT, [signer.verifier()])
    cp = Checkpoint("example.com/log", 0, hashlib.sha256(b"").digest(), ("ext one", "ext-2"))
    assert cp.text() == "example.com/log\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\next one\next-2\n"
    signed = cp.sign(signer)
    assert n.open_checkpoint(signed, [signer.verifier()]) == cp


@pytest.mark.parametrize(("text", "reason"), [
    ("o\n01\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n", "leading zeros"),
    ("o\n-1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n", "decimal"),
    ("o\n+1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n", "decimal"),
    ("o\n1 \nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n", "decimal"),
    ("o\n18446744073709551616\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n", "outside"),
    ("o\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I\n", "base64"),
    ("o\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2J=\n", "canonical"),
    ("o\n1\nAAAA\n", "32 bytes"),
    ("o\n1\n", "at least 3"),
    ("\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n", "origin"),
    ("o\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n", "extension"),
    ("o\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=", "newline"),
])
def test_checkpoint_body_rules(text: str, reason: str) -> None:
    with pytest.raises(MalformedNoteError, match=reason):
        Checkpoint.from_text(text)


def test_largest_tree_size_is_accepted() -> None:
    root = "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
    assert Checkpoint.from_text(f"o\n18446744073709551615\n{root}\n").size == 2**64 - 1
