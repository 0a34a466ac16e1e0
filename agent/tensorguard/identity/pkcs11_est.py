"""EST re-enrolment (RFC 7030 4.2.2) whose TLS client authentication is done by a PKCS#11 token.

Python's ssl module can only present a key it can read, and a token key cannot be read, so this
runs curl (OpenSSL flavour) with OpenSSL's pkcs11 engine (Debian: libengine-pkcs11-openssl) as a
subprocess, without a shell. The PIN never reaches a command line, the environment or the disk:
it is handed to the engine as ``pin-source=file:/dev/fd/N`` on an in-memory file (memfd) that only
curl inherits. Answers mean what they mean for est.EstClient: 4xx is EstError with the server's
reason, no connection or 5xx/429 is EstUnavailable.
"""

from __future__ import annotations

import base64
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509

from .est import MAX_RESPONSE, WELL_KNOWN, EstClient, EstError, EstUnavailable, parse_certs_only, reason_of
from .pkcs11 import LABEL_RE, read_pin

CURL = "curl"
ENGINE = "pkcs11"
# variables that would send the request elsewhere or trust other CAs than the trust anchor
_SCRUBBED = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir",
             "curl_ca_bundle", "curl_home"}
_EXIT_ENGINE = 53
_EXIT_LOCAL_CERT = 58
_EXIT_PEER_VERIFY = 60
_EXIT_TOO_LARGE = 63
_EXIT_BAD_CACERT = 77


@dataclass(frozen=True)
class Pkcs11Credential:
    """The current certificate (a PEM file) and where its key lives on the token."""

    cert_file: Path
    module: Path
    token_label: str
    key_label: str
    pin_file: Path


def key_uri(token_label: str, key_label: str, pin_source: str | None = None) -> str:
    """RFC 7512 URI of a private key for OpenSSL's pkcs11 engine (libp11 reads pin-source as a
    path attribute, not a query)."""
    if not LABEL_RE.match(key_label):
        raise ValueError(f"key label {key_label!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
    uri = f"pkcs11:token={quote(token_label, safe='')};object={quote(key_label, safe='')};type=private"
    return uri + (f";pin-source={pin_source}" if pin_source else "")


def engine_problem(curl: str = CURL) -> str | None:
    """Why curl cannot use OpenSSL's pkcs11 engine here (None: it can), for start-up checks and tests."""
    try:
        result = subprocess.run([curl, "-q", "--silent", "--show-error", "--engine", ENGINE, "--output",
                                 os.devnull, "file:///dev/null"], capture_output=True, text=True,
                                timeout=30, check=False, env=_env(None))
    except FileNotFoundError:
        return f"{curl} is not installed (Debian: apt install curl)"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {curl}: {exc}"
    if result.returncode == _EXIT_ENGINE:
        return ("OpenSSL's pkcs11 engine is not installed or cannot be loaded "
                "(Debian: apt install libengine-pkcs11-openssl)")
    if result.returncode != 0:
        return f"{curl} --engine {ENGINE} fails: {_last_line(result.stderr)}"
    return None


def simplereenroll_pkcs11(server_url: str, trust_anchor: Path, credential: Pkcs11Credential,
                          csr_der: bytes, *, timeout: float = 15.0,
                          curl: str = CURL) -> list[x509.Certificate]:
    """Renewal over mTLS with the token's key: what est.EstClient.simplereenroll returns."""
    target = EstClient(server_url, trust_anchor, timeout=timeout)  # validates and splits the URL
    host = f"[{target.host}]" if ":" in target.host else target.host
    where = f"{target.host}:{target.port}"
    url = f"https://{host}:{target.port}{target.prefix}{WELL_KNOWN}/simplereenroll"
    pin = read_pin(credential.pin_file).encode("utf-8")
    pin_fd = os.memfd_create("tensorguard-pkcs11-pin", os.MFD_CLOEXEC)
    try:
        os.write(pin_fd, pin)
        with tempfile.TemporaryDirectory(prefix="tensorguard-est-") as scratch:
            headers, body, no_capath = Path(scratch, "headers"), Path(scratch, "body"), Path(scratch, "ca")
            no_capath.mkdir()
            args = [curl, "-q", "--silent", "--show-error", "--http1.1", "--tlsv1.2", "--proto", "=https",
                    "--noproxy", "*", "--cacert", str(trust_anchor), "--capath", str(no_capath),
                    "--engine", ENGINE, "--cert", str(credential.cert_file), "--cert-type", "PEM",
                    "--key-type", "ENG", "--key", key_uri(credential.token_label, credential.key_label,
                                                          f"file:/dev/fd/{pin_fd}"),
                    "--connect-timeout", f"{timeout:g}", "--max-time", f"{timeout:g}",
                    "--max-filesize", str(MAX_RESPONSE), "--request", "POST",
                    "--header", "Content-Type: application/pkcs10",
                    "--header", "Content-Transfer-Encoding: base64", "--header", "Expect:",
                    "--data-binary", "@-", "--dump-header", str(headers), "--output", str(body),
                    "--write-out", "%{http_code}", url]
            try:
                result = subprocess.run(args, input=base64.encodebytes(csr_der), capture_output=True,
                                        timeout=timeout + 10, check=False, pass_fds=(pin_fd,),
                                        env=_env(credential.module))
            except FileNotFoundError:
                raise EstUnavailable(f"cannot renew with the PKCS#11 key: {curl} is not installed") from None
            except subprocess.TimeoutExpired:
                raise EstUnavailable(f"cannot reach {where}: no answer within {timeout:g} s") from None
            if result.returncode != 0:
                raise _curl_failure(result.returncode, result.stderr.decode("utf-8", "replace"),
                                    where, trust_anchor, credential)
            code = result.stdout.decode("ascii", "replace").strip()
            status = int(code) if code.isdigit() else 0
            retry_after = _header(headers, "retry-after")
            data = body.read_bytes() if body.exists() else b""
    finally:
        os.close(pin_fd)
    if status >= 500 or status == 429:
        raise EstUnavailable(f"the CA answered HTTP {status}",
                             float(retry_after) if retry_after and retry_after.isdigit() else None)
    if status >= 400:
        raise EstError(status, reason_of(data))
    if status != 200:
        raise EstUnavailable(f"the CA answered HTTP {status}, expected 200")
    if len(data) > MAX_RESPONSE:
        raise EstError(status, f"response larger than {MAX_RESPONSE} bytes")
    return parse_certs_only(data)


def _env(module: Path | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name.lower() not in _SCRUBBED}
    if module is not None:
        env["PKCS11_MODULE_PATH"] = str(module)  # the engine's module, instead of p11-kit's proxy
    return env


def _curl_failure(code: int, stderr: str, where: str, trust_anchor: Path,
                  credential: Pkcs11Credential) -> EstUnavailable | EstError:
    detail = _last_line(stderr)
    token = f"key {credential.key_label!r} on PKCS#11 token {credential.token_label!r}"
    if code == _EXIT_ENGINE:
        return EstUnavailable("cannot renew with the PKCS#11 key: OpenSSL's pkcs11 engine is not installed "
                              "or cannot be loaded (Debian: apt install libengine-pkcs11-openssl)")
    if code == _EXIT_LOCAL_CERT or code < 0:
        return EstUnavailable(f"cannot set up TLS with the certificate {credential.cert_file} and the "
                              f"{token} (module {credential.module}; key missing, wrong PIN or engine "
                              f"failure): {detail}")
    if code == _EXIT_PEER_VERIFY:
        return EstUnavailable(f"the server at {where} failed verification against {trust_anchor}: {detail}")
    if code == _EXIT_BAD_CACERT:
        return EstUnavailable(f"cannot set up TLS: cannot read the trust anchor {trust_anchor}: {detail}")
    if code == _EXIT_TOO_LARGE:
        return EstError(200, f"response larger than {MAX_RESPONSE} bytes")
    return EstUnavailable(f"cannot reach {where}: {detail}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def _header(path: Path, name: str) -> str | None:
    """``name`` from the last response in a curl --dump-header file."""
    try:
        text = path.read_text(encoding="latin-1")
    except OSError:
        return None
    value = None
    for line in text.splitlines():
        if line.startswith("HTTP/"):
            value = None
        key, sep, rest = line.partition(":")
        if sep and key.strip().lower() == name:
            value = rest.strip()
    return value
