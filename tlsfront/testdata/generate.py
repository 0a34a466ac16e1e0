"""Regenerate the certificates `src/client_auth.rs` tests against (run from anywhere; needs cryptography).

Their dates do not matter to the front (it checks a client certificate at its own notBefore), so these
fixed files stay valid for the tests forever: the robots' leaves are even long expired on purpose.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).parent
START = datetime(2024, 1, 1, tzinfo=UTC)


def name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                signer: ec.EllipticCurvePrivateKey, *, ca: bool, usage: list[x509.ObjectIdentifier] | None = None,
                lifetime: timedelta = timedelta(days=3650)) -> bytes:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(START)
               .not_valid_after(START + lifetime)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def main() -> None:
    issuer_key, other_key, sub_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    issuer = name("fleet.test intermediate")
    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    hour = timedelta(hours=1)
    files = {
        "issuer.der": certificate(issuer, issuer_key, name("fleet.test root"), other_key, ca=True),
        # an expired robot certificate of the issuer: the front leaves dates to the API
        "robot.der": certificate(name("r1"), leaf_key, issuer, issuer_key, ca=False, usage=client, lifetime=hour),
        "server_only.der": certificate(name("r2"), leaf_key, issuer, issuer_key, ca=False,
                                       usage=[ExtendedKeyUsageOID.SERVER_AUTH], lifetime=hour),
        # the issuer's name, another key: what a forger without the issuer's key can send
        "forged.der": certificate(name("r3"), leaf_key, issuer, other_key, ca=False, usage=client, lifetime=hour),
        # a sub-CA the issuer signed, and a robot certificate of that sub-CA: a chain webpki would build
        # through the intermediate the client sends, which the fleet never issues
        "sub_ca.der": certificate(name("fleet.test sub-CA"), sub_key, issuer, issuer_key, ca=True),
        "sub_robot.der": certificate(name("r4"), leaf_key, name("fleet.test sub-CA"), sub_key, ca=False,
                                     usage=client, lifetime=hour),
    }
    for file, der in files.items():
        (HERE / file).write_bytes(der)


if __name__ == "__main__":
    main()
