"""A PKCS#10 request's DER walked strictly before cryptography sees it, so that each malformed or
unusable part is refused with a reason naming it and where it is.

cryptography 38 parses a request's subject and extensions only when they are read, and some
well-formed-enough inputs then raise KeyError, TypeError, UnicodeDecodeError or
UnsupportedGeneralNameType (a CN that is an INTEGER, an odd-length BMPString, an x400Address SAN):
those were HTTP 500s. Everything this module accepts, cryptography reads without raising.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from .. import der


class CsrError(ValueError):
    """The body is not a usable PKCS#10 request; ``reason`` says what is wrong with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


NOT_A_CSR = "not a DER PKCS#10 certificate request"
BOOLEAN, OID = 0x01, 0x06
_ATTRIBUTES = 0xA0

_TAG_NAMES = {
    0x01: "BOOLEAN", 0x02: "INTEGER", 0x03: "BIT STRING", 0x04: "OCTET STRING", 0x05: "NULL",
    0x06: "OBJECT IDENTIFIER", 0x0A: "ENUMERATED", 0x0C: "UTF8String", 0x12: "NumericString",
    0x13: "PrintableString", 0x14: "TeletexString", 0x15: "VideotexString", 0x16: "IA5String",
    0x17: "UTCTime", 0x18: "GeneralizedTime", 0x19: "GraphicString", 0x1A: "VisibleString",
    0x1B: "GeneralString", 0x1C: "UniversalString", 0x1E: "BMPString", 0x30: "SEQUENCE", 0x31: "SET",
}
_OID_NAMES = {
    "2.5.4.3": "commonName", "2.5.4.5": "serialNumber", "2.5.4.6": "countryName", "2.5.4.7": "localityName",
    "2.5.4.8": "stateOrProvinceName", "2.5.4.10": "organizationName", "2.5.4.11": "organizationalUnitName",
    "1.2.840.113549.1.9.1": "emailAddress", "0.9.2342.19200300.100.1.1": "userId",
    "0.9.2342.19200300.100.1.25": "domainComponent",
    "2.5.29.14": "subjectKeyIdentifier", "2.5.29.15": "keyUsage", "2.5.29.17": "subjectAltName",
    "2.5.29.18": "issuerAltName", "2.5.29.19": "basicConstraints", "2.5.29.30": "nameConstraints",
    "2.5.29.31": "cRLDistributionPoints", "2.5.29.32": "certificatePolicies",
    "2.5.29.35": "authorityKeyIdentifier", "2.5.29.37": "extendedKeyUsage",
    "1.3.6.1.5.5.7.1.1": "authorityInfoAccess",
    "1.2.840.113549.1.9.14": "extensionRequest", "1.3.6.1.4.1.311.2.1.14": "extensionRequest",
    "1.2.840.113549.1.9.7": "challengePassword",
    "1.2.840.10045.2.1": "id-ecPublicKey", "1.2.840.113549.1.1.1": "rsaEncryption",
    "1.2.840.113549.1.1.10": "RSASSA-PSS", "1.3.101.110": "X25519", "1.3.101.111": "X448",
    "1.3.101.112": "Ed25519", "1.3.101.113": "Ed448",
}
_EXTENSION_REQUESTS = ("1.2.840.113549.1.9.14", "1.3.6.1.4.1.311.2.1.14")
"""PKCS#9 extensionRequest and Microsoft's older one; cryptography takes extensions from either."""
_GENERAL_NAMES = {0xA0: "otherName", 0x81: "rfc822Name", 0x82: "dNSName", 0xA3: "x400Address",
                  0xA4: "directoryName", 0xA5: "ediPartyName", 0x86: "uniformResourceIdentifier",
                  0x87: "iPAddress", 0x88: "registeredID"}
_IA5_NAMES = (0x81, 0x82, 0x86)
_UNREADABLE_NAMES = (0xA3, 0xA5)
"""GeneralName choices cryptography 38 cannot represent (it raises UnsupportedGeneralNameType)."""
_SAN_NEVER_ISSUED = (0xA0, 0xA3, 0xA4, 0xA5, 0x88)
"""subjectAltName choices this CA never issues for any node, refused as malformed requests (400)
before a token is touched; rfc822Name and iPAddress are names, left to the policy (403)."""
_PRINTABLE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"
_NUMERIC = b"0123456789 "
_ASCII = bytes(range(0x80))
_VISIBLE = bytes(range(0x20, 0x7F))
_STRINGS = "UTF8String, PrintableString, BMPString, UniversalString, IA5String, VisibleString, " \
           "NumericString or TeletexString"


class Element(NamedTuple):
    """One DER element of ``data``: its tag and where its content starts and ends."""

    tag: int
    start: int
    end: int


_element = tuple.__new__
"""Builds an `Element` without NamedTuple's keyword-handling constructor (a fifth of the walk's time)."""


def _article(name: str) -> str:
    return f"an {name}" if name[0].lower() in "aeiox" else f"a {name}"


def tag_name(tag: int) -> str:
    """A tag as ASN.1 names it (with its article), or its number."""
    return _article(_TAG_NAMES.get(tag, f"element with tag 0x{tag:02x}"))


def oid_name(dotted: str) -> str:
    """An OID's usual name, else its dotted form."""
    return _OID_NAMES.get(dotted, dotted)


def _at(where: str, index: int) -> str:
    return f"{where} element {index}" if index else where


def element(data: bytes, pos: int, end: int, where: str, index: int = 0) -> Element:
    """The DER element at ``pos`` inside ``data[:end]``: definite, minimal length, low tag number.
    Errors name ``where`` (its ``index``-th element, if given; the label is built only on error)."""
    if pos >= end:
        raise CsrError(f"{_at(where, index)}: missing (the data ends here)")
    tag = data[pos]
    if tag == 0:
        raise CsrError(f"{_at(where, index)}: an end-of-contents marker (tag 0), which only BER indefinite "
                       "lengths use")
    if tag & 0x1F == 0x1F:
        raise CsrError(f"{_at(where, index)}: uses a multi-octet tag (0x{tag:02x}...), which no part of a "
                       "certificate request has")
    if pos + 1 >= end:
        raise CsrError(f"{_at(where, index)}: the length octet is missing (the data ends)")
    size = data[pos + 1]
    pos += 2
    if size >= 0x80:
        count = size & 0x7F
        if count == 0:
            raise CsrError(f"{_at(where, index)}: indefinite length (BER); DER needs definite lengths")
        if count > 4:
            raise CsrError(f"{_at(where, index)}: length of {count} octets, more than any request can need")
        if pos + count > end:
            raise CsrError(f"{_at(where, index)}: the length octets run past the end of the data")
        size = int.from_bytes(data[pos:pos + count], "big")
        if size < 0x80 or data[pos] == 0:
            raise CsrError(f"{_at(where, index)}: length {size} is not in minimal DER form")
        pos += count
    if pos + size > end:
        raise CsrError(f"{_at(where, index)}: length {size} runs past the end of the data ({end - pos} bytes "
                       "left)")
    return _element(Element, (tag, pos, pos + size))


def children(data: bytes, parent: Element, where: str) -> list[Element]:
    """The elements that make up ``parent``'s content, exactly."""
    items: list[Element] = []
    pos, end = parent.start, parent.end
    while pos < end:
        item = element(data, pos, end, where, len(items) + 1)
        items.append(item)
        pos = item.end
    return items


def expect(item: Element, tag: int, where: str) -> None:
    if item.tag != tag:
        raise CsrError(f"{where}: expected {tag_name(tag)}, found {tag_name(item.tag)}")


def parts(data: bytes, item: Element, names: tuple[str, ...], where: str) -> list[Element]:
    """The children of SEQUENCE ``item``: exactly as many as ``names``."""
    expect(item, der.SEQUENCE, where)
    items = children(data, item, where)
    if len(items) != len(names):
        raise CsrError(f"{where}: expected {len(names)} elements ({', '.join(names)}), got {len(items)}")
    return items


def object_identifier(data: bytes, item: Element, where: str) -> str:
    """The dotted form of an OBJECT IDENTIFIER, refused unless it is minimal, complete DER."""
    expect(item, OID, where)
    content = data[item.start:item.end]
    dotted = _dotted(content)
    if dotted is None:
        raise CsrError(f"{where}: {content.hex() or 'empty'} is not a valid OBJECT IDENTIFIER")
    return dotted


@functools.lru_cache(maxsize=256)
def _dotted(content: bytes) -> str | None:
    """The dotted form of OID content octets, or None unless they are minimal and complete (cached:
    requests carry the same few OIDs)."""
    if not content or content[-1] & 0x80 or content[0] == 0x80 or (b"\x80" in content and any(
            byte == 0x80 and not content[i - 1] & 0x80 for i, byte in enumerate(content) if i)):
        return None
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in (first, arcs[0] - 40 * first, *arcs[1:]))


def _bad_byte(content: bytes, allowed: bytes) -> int | None:
    """The offset of the first byte of ``content`` not in ``allowed``, else None."""
    if not content.translate(None, allowed):
        return None
    return next(i for i, byte in enumerate(content) if byte not in allowed)


def check_string(data: bytes, item: Element, where: str) -> None:
    """A Name attribute value: one of the string types cryptography reads, correctly encoded."""
    content = data[item.start:item.end]
    kind = _TAG_NAMES.get(item.tag, "")
    if item.tag == 0x0C:
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CsrError(f"{where} is not valid UTF-8 (byte 0x{content[exc.start]:02x} at offset "
                           f"{exc.start})") from None
    elif item.tag in (0x1E, 0x1C):
        width, codec = (2, "utf-16-be") if item.tag == 0x1E else (4, "utf-32-be")
        if len(content) % width:
            raise CsrError(f"{where} is a {kind} of {len(content)} bytes; it needs {width} bytes per "
                           "character")
        try:
            content.decode(codec)
        except UnicodeDecodeError as exc:
            raise CsrError(f"{where} is not valid {kind} ({exc.reason} at offset {exc.start})") from None
    elif item.tag in (0x13, 0x12, 0x16, 0x1A, 0x14):
        allowed = {0x13: _PRINTABLE, 0x12: _NUMERIC, 0x1A: _VISIBLE}.get(item.tag, _ASCII)
        bad = _bad_byte(content, allowed)
        if bad is not None:
            note = "; only its ASCII subset is read here, send UTF8String" if item.tag == 0x14 else ""
            raise CsrError(f"{where} is not a valid {kind} (byte 0x{content[bad]:02x} at offset {bad}){note}")
    else:
        raise CsrError(f"{where} is {tag_name(item.tag)}, expected a string ({_STRINGS})")


def check_any(data: bytes, item: Element, where: str) -> None:
    """A value of type ANY (algorithm parameters, attribute values): universal primitives in DER form,
    as OpenSSL's decoder (which checks RSA signatures) insists on."""
    content = data[item.start:item.end]
    if item.tag == BOOLEAN and content not in (b"\x00", b"\xff"):
        raise CsrError(f"{where}: a BOOLEAN is one octet, 0x00 or 0xff, not {content.hex() or 'empty'}")
    if item.tag == der.INTEGER and (not content or (len(content) > 1 and (
            (content[0] == 0 and content[1] < 0x80) or (content[0] == 0xFF and content[1] >= 0x80)))):
        raise CsrError(f"{where}: INTEGER {content.hex() or '(empty)'} is not in minimal DER form")
    if item.tag == 0x05 and content:
        raise CsrError(f"{where}: a NULL has no content, this one has {len(content)} "
                       f"byte{'' if len(content) == 1 else 's'}")
    if item.tag == OID:
        object_identifier(data, item, where)
    if item.tag == der.BIT_STRING and (not content or content[0] > 7 or (len(content) == 1 and content[0])):
        raise CsrError(f"{where}: BIT STRING with a bad unused-bits octet")
    if item.tag in (0x0C, 0x12, 0x13, 0x14, 0x16, 0x1A, 0x1C, 0x1E):
        check_string(data, item, where)
    if 0x21 <= item.tag <= 0x3F and item.tag not in (der.SEQUENCE, der.SET):
        raise CsrError(f"{where}: constructed encoding of a primitive type (tag 0x{item.tag:02x}), which "
                       "is BER")


def check_name(data: bytes, name: Element, where: str) -> None:
    """A Name: RDN sets of (type, string value) pairs."""
    expect(name, der.SEQUENCE, where)
    count = 0
    for index, rdn in enumerate(children(data, name, where), 1):
        expect(rdn, der.SET, f"{where} attribute set {index}")
        members = children(data, rdn, f"{where} attribute set {index}")
        if not members:
            raise CsrError(f"{where} attribute set {index} is empty")
        for member in members:
            count += 1
            label = f"{where} attribute {count}"
            expect(member, der.SEQUENCE, label)
            pair = children(data, member, label)
            if len(pair) != 2:
                raise CsrError(f"{label}: expected an attribute type and a value, got {len(pair)} "
                               f"element{'' if len(pair) == 1 else 's'}")
            kind = oid_name(object_identifier(data, pair[0], f"{label} type"))
            check_string(data, pair[1], f"{label}: {kind}")


def check_bit_string(data: bytes, item: Element, where: str) -> None:
    """A key or signature BIT STRING: whole octets (no unused bits)."""
    expect(item, der.BIT_STRING, where)
    if item.start == item.end:
        raise CsrError(f"{where}: empty BIT STRING (not even its unused-bits octet)")
    unused = data[item.start]
    if unused:
        raise CsrError(f"{where}: BIT STRING with {unused} unused bit{'s' if unused > 1 else ''}; keys and "
                       "signatures are whole octets")


def check_algorithm(data: bytes, item: Element, where: str) -> str:
    """An AlgorithmIdentifier (OID, optional parameters); returns the OID."""
    expect(item, der.SEQUENCE, where)
    items = children(data, item, where)
    if not 1 <= len(items) <= 2:
        raise CsrError(f"{where}: expected an OBJECT IDENTIFIER and optional parameters, got {len(items)} "
                       f"element{'' if len(items) == 1 else 's'}")
    dotted = object_identifier(data, items[0], where)
    if len(items) == 2:
        check_any(data, items[1], f"{where} parameters")
    return dotted


def check_general_names(data: bytes, value: Element, extension: str, issued: bool) -> None:
    """GeneralNames: known choices, IA5 names in ASCII, IP addresses of 4 or 16 bytes; ``issued``
    (subjectAltName) also refuses the choices this CA never issues."""
    where = f"extension {extension}"
    names = element(data, value.start, value.end, where)
    if names.tag != der.SEQUENCE:
        raise CsrError(f"{where}: expected a SEQUENCE of GeneralNames, found {tag_name(names.tag)}")
    if names.end != value.end:
        extra = value.end - names.end
        raise CsrError(f"{where}: {extra} byte{'s' if extra > 1 else ''} after the GeneralNames")
    for index, name in enumerate(children(data, names, where), 1):
        label = f"{extension} entry {index}"
        choice = _GENERAL_NAMES.get(name.tag)
        content = data[name.start:name.end]
        if choice is None:
            raise CsrError(f"{label} has tag 0x{name.tag:02x}, which is no GeneralName choice")
        if issued and name.tag in _SAN_NEVER_ISSUED:
            raise CsrError(f"{label} is {_article(choice)}; this CA issues only uniformResourceIdentifier "
                           "(the node's SPIFFE ID) and dNSName subject alternative names")
        if name.tag in _UNREADABLE_NAMES:
            raise CsrError(f"{label} is {_article(choice)}, which this CA does not read")
        if name.tag in _IA5_NAMES:
            bad = _bad_byte(content, _ASCII)
            if bad is not None:
                raise CsrError(f"{label} ({choice}) is not ASCII (byte 0x{content[bad]:02x} at offset "
                               f"{bad}); it is an IA5String")
        if name.tag == 0x87 and len(content) not in (4, 16):
            raise CsrError(f"{label} (iPAddress) has {len(content)} bytes, expected 4 (IPv4) or 16 (IPv6)")


def check_extension(data: bytes, item: Element, index: int, seen: set[str]) -> None:
    """One Extension: extnID, critical (TRUE when present), OCTET STRING; each OID at most once."""
    expect(item, der.SEQUENCE, f"extension {index}")
    items = children(data, item, f"extension {index}")
    dotted = object_identifier(data, items[0], f"extension {index} extnID") if items else str(index)
    where = f"extension {oid_name(dotted)}"
    if len(items) not in (2, 3) or items[-1].tag != der.OCTET_STRING:
        found = ", ".join(_TAG_NAMES.get(i.tag, f"0x{i.tag:02x}") for i in items) or "nothing"
        raise CsrError(f"{where}: expected extnID, critical and an OCTET STRING value, found {found}")
    if len(items) == 3:
        critical = data[items[1].start:items[1].end]
        expect(items[1], BOOLEAN, f"{where} critical")
        if critical == b"\x00":
            raise CsrError(f"{where}: critical FALSE must be left out (it is the DEFAULT, and DER omits it)")
        if critical != b"\xff":
            raise CsrError(f"{where}: critical must be TRUE (0xff) when present, not 0x{critical.hex()}")
    if dotted in seen:
        raise CsrError(f"{where} ({dotted}) appears twice")
    seen.add(dotted)
    if dotted in ("2.5.29.17", "2.5.29.18"):
        check_general_names(data, items[-1], oid_name(dotted), issued=dotted == "2.5.29.17")


def check_attributes(data: bytes, attributes: Element) -> list[str]:
    """The [0] attributes: (type, SET of values) pairs, and at most one extension request holding one
    SEQUENCE of extensions; returns the names of the extensions requested."""
    requests = 0
    seen: set[str] = set()
    for index, attribute in enumerate(children(data, attributes, "attributes"), 1):
        label = f"attribute {index}"
        kind, values = parts(data, attribute, ("type", "values"), label)
        dotted = object_identifier(data, kind, f"{label} type")
        expect(values, der.SET, f"attribute {oid_name(dotted)} values")
        items = children(data, values, f"attribute {oid_name(dotted)} values")
        if dotted not in _EXTENSION_REQUESTS:
            for number, value in enumerate(items, 1):
                check_any(data, value, f"attribute {oid_name(dotted)} value {number}")
            continue
        requests += 1
        if requests > 1:
            raise CsrError("attribute extensionRequest appears twice")
        if len(items) != 1:
            raise CsrError(f"attribute extensionRequest: expected exactly one value, got {len(items)}")
        expect(items[0], der.SEQUENCE, "extensionRequest")
        for number, extension in enumerate(children(data, items[0], "extensionRequest"), 1):
            check_extension(data, extension, number, seen)
    return [oid_name(dotted) for dotted in sorted(seen)]


def check_request(data: bytes) -> list[str]:
    """Raise CsrError naming the first part of ``data`` that is not strict DER PKCS#10 or that
    cryptography could not read; returns the names of the extensions requested."""
    request = element(data, 0, len(data), NOT_A_CSR)
    if request.tag != der.SEQUENCE:
        raise CsrError(f"{NOT_A_CSR}: expected a SEQUENCE, found {tag_name(request.tag)}")
    if request.end != len(data):
        raise CsrError(f"{NOT_A_CSR}: {len(data) - request.end} bytes of trailing data after the request")
    info, algorithm, signature = parts(
        data, request, ("certificationRequestInfo", "signatureAlgorithm", "signature"), NOT_A_CSR)
    version, subject, spki, attributes = parts(
        data, info, ("version", "subject", "subjectPublicKeyInfo", "attributes"),
        "certificationRequestInfo")
    if version.tag != der.INTEGER or version.start == version.end:
        raise CsrError(f"version must be INTEGER 0, found {tag_name(version.tag)}")
    if data[version.start:version.end] != b"\x00":
        number = int.from_bytes(data[version.start:version.end], "big", signed=True)
        raise CsrError(f"version must be 0 (v1), not {number}")
    check_name(data, subject, "subject")
    key_algorithm, key = parts(data, spki, ("algorithm", "subjectPublicKey"),
                               "subjectPublicKeyInfo")
    check_algorithm(data, key_algorithm, "subjectPublicKeyInfo algorithm")
    check_bit_string(data, key, "subjectPublicKey")
    expect(attributes, _ATTRIBUTES, "attributes")
    extensions = check_attributes(data, attributes)
    check_algorithm(data, algorithm, "signatureAlgorithm")
    check_bit_string(data, signature, "signature")
    return extensions
