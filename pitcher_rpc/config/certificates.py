"""What a certificate says of itself: its validity dates and the names it carries.

The ssl module reads a certificate only once it has verified a peer's, and
the configuration must judge its own files before anything connects: an
expired certificate, or an SNI name the certificate does not carry, is worth
a warning at ``pitcher check``. The certificate is parsed by the
``cryptography`` package (X.509 is not a format to parse by hand).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

__all__ = ["Leaf", "certificate_fields", "covers", "read_leaf"]


@dataclass(frozen=True, slots=True)
class Leaf:
    """The first certificate of a PEM chain: validity (Unix times) and its SAN names."""

    not_before: float
    not_after: float
    names: tuple[str, ...]  # DNS names, lower case, and IP addresses as text


def read_leaf(pem: str) -> Leaf:
    """The first certificate of a PEM text; ValueError if there is none or it is malformed."""
    return _fields(x509.load_pem_x509_certificate(pem.encode("ascii", "replace")))


def certificate_fields(der: bytes) -> Leaf:
    """Validity and subjectAltName names of a DER certificate; ValueError if malformed."""
    return _fields(x509.load_der_x509_certificate(der))


def _fields(certificate: x509.Certificate) -> Leaf:
    names: list[str] = []
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        pass
    else:
        alt = extension.value
        names.extend(name.lower() for name in alt.get_values_for_type(x509.DNSName))
        names.extend(str(address) for address in alt.get_values_for_type(x509.IPAddress))
    return Leaf(
        certificate.not_valid_before_utc.timestamp(),
        certificate.not_valid_after_utc.timestamp(),
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
