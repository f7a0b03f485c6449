"""What a certificate says of itself: its validity dates and the names it carries.

The ssl module reads a certificate only once it has verified a peer's, and
the configuration must judge its own files before anything connects: an
expired certificate, or an SNI name the certificate does not carry, is worth
a warning at ``pitcher check``. So the few fields needed are read here from
the DER (RFC 5280 4.1), with no dependency::

    Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    tbsCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
        issuer, validity, subject, subjectPublicKeyInfo,
        [1] issuerUniqueID OPTIONAL, [2] subjectUniqueID OPTIONAL, [3] extensions OPTIONAL }
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["Leaf", "covers", "read_leaf"]

_BEGIN = "-----BEGIN CERTIFICATE-----"
_END = "-----END CERTIFICATE-----"
# subjectAltName's object identifier, 2.5.29.17, as DER.
_SUBJECT_ALT_NAME = bytes((0x06, 0x03, 0x55, 0x1D, 0x11))


@dataclass(frozen=True, slots=True)
class Leaf:
    """The first certificate of a PEM chain: validity (Unix times) and its SAN names."""

    not_before: float
    not_after: float
    names: tuple[str, ...]  # DNS names, lower case, and IP addresses as text


def read_leaf(pem: str) -> Leaf:
    """The first certificate of a PEM text; ValueError if there is none or it is malformed."""
    start = pem.index(_BEGIN)
    end = pem.index(_END, start) + len(_END)
    return certificate_fields(ssl.PEM_cert_to_DER_cert(pem[start:end]))


def certificate_fields(der: bytes) -> Leaf:
    """Validity and subjectAltName names of a DER certificate; ValueError if malformed."""
    _, start, _ = _tlv(der, 0, 0x30)
    _, position, tbs_end = _tlv(der, start, 0x30)
    tag, _, end = _tlv(der, position)
    if tag == 0xA0:  # version
        _, _, end = _tlv(der, end, 0x02)  # serialNumber
    elif tag != 0x02:
        raise ValueError("not a certificate")
    _, _, end = _tlv(der, end, 0x30)  # signature algorithm
    _, _, end = _tlv(der, end, 0x30)  # issuer
    _, inside, end = _tlv(der, end, 0x30)  # validity
    before_tag, before_start, before_end = _tlv(der, inside)
    after_tag, after_start, after_end = _tlv(der, before_end)
    _, _, end = _tlv(der, end, 0x30)  # subject
    _, _, end = _tlv(der, end, 0x30)  # subjectPublicKeyInfo
    names: list[str] = []
    while end < tbs_end:
        tag, content, end = _tlv(der, end)
        if tag == 0xA3:  # [3] extensions
            names = _alt_names(der, content)
    return Leaf(
        _asn1_time(before_tag, der[before_start:before_end]),
        _asn1_time(after_tag, der[after_start:after_end]),
        tuple(names),
    )


def covers(names: tuple[str, ...], host: str) -> bool:
    """Whether a certificate carrying ``names`` is valid for ``host`` (RFC 6125 wildcards).

    ``host`` may itself be a wildcard pattern ("*.example.com"): covered by
    the same wildcard only.
    """
    host = host.lower().rstrip(".")
    if host in names:
        return True
    if host.startswith("*."):
        return False
    label, _, parent = host.partition(".")
    return bool(label and parent) and f"*.{parent}" in names


def _alt_names(der: bytes, content: int) -> list[str]:
    _, position, end = _tlv(der, content, 0x30)  # Extensions
    while position < end:
        _, inside, position = _tlv(der, position, 0x30)  # Extension
        if der[inside : inside + len(_SUBJECT_ALT_NAME)] != _SUBJECT_ALT_NAME:
            continue
        tag, value, value_end = _tlv(der, inside + len(_SUBJECT_ALT_NAME))
        if tag == 0x01:  # critical BOOLEAN
            tag, value, value_end = _tlv(der, value_end)
        if tag != 0x04:  # extnValue OCTET STRING
            raise ValueError("not a certificate")
        _, name, names_end = _tlv(der, value, 0x30)  # GeneralNames
        found: list[str] = []
        while name < names_end:
            tag, start, name = _tlv(der, name)
            if tag == 0x82:  # dNSName
                found.append(der[start:name].decode("ascii", "replace").lower())
            elif tag == 0x87:  # iPAddress
                found.append(str(ipaddress.ip_address(der[start:name])))
        return found
    return []


def _tlv(data: bytes, offset: int, expected: int | None = None) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``offset``."""
    if offset + 2 > len(data):
        raise ValueError("truncated")
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if length & 0x80:
        size = length & 0x7F
        if not 0 < size <= 4 or start + size > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[start : start + size], "big")
        start += size
    end = start + length
    if end > len(data) or (expected is not None and tag != expected):
        raise ValueError("not a certificate")
    return tag, start, end


def _asn1_time(tag: int, value: bytes) -> float:
    text = value.decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 4.1.2.5.1)
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        raise ValueError("not a time")
    moment = datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    return moment.timestamp()
