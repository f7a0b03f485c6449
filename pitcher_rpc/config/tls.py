"""``[server.tls]`` and ``[clusters.NAME.tls]``: certificates checked as the rest of the file.

Every file is read and loaded into an SSLContext while the configuration is
validated, so ``pitcher check`` and a reload refuse what the proxy could not
serve (a file that cannot be read, a key that does not match its
certificate, an encrypted key, a CA file with no certificate), each at its
key's line, and the snapshot carries the context it checked. An expired
certificate is a warning, not a refusal: nginx serves one too, and refusing
to start would turn a renewal that came late into an outage of plain
errors instead of certificate warnings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .certificates import covers, read_leaf
from .checks import Checks
from .issues import one_of_message, show, type_message
from .lines import KeyPath
from .model import ClusterTlsConfig, Config, ServerTlsConfig, SniCertificate
from .schema import (
    CLUSTER_TLS_KEYS,
    HOST_NAME,
    SERVER_TLS_KEYS,
    SNI_CERTIFICATE_KEYS,
)

__all__ = [
    "TLS_VERSIONS",
    "client_context",
    "cluster_tls_section",
    "describe_listener",
    "load_chain",
    "named_for_discovery",
    "server_context",
    "server_tls_section",
    "tls_digest",
]

CLIENT_CERTIFICATE_MODES = ("required", "optional")
# The listener speaks HTTP/1.1 only; ALPN says so to clients that ask (curl, browsers).
ALPN = ("http/1.1",)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
# A PEM file is small; bounded so that a path to /dev/zero cannot hang a reload.
_PEM_LIMIT = 1 << 20


# -- contexts -------------------------------------------------------------------------

# The versions a side may be held to at least; older ones are never offered.
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _no_passphrase(*_: object) -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key:
    # a service must fail at once instead, with the reason.
    raise ssl.SSLError("the key is encrypted; a passphrase-protected key is not supported")


def server_context(
    certificate: str,
    key: str,
    *,
    client_ca: str | None = None,
    client_required: bool = True,
    min_version: str = "1.2",
    alpn: tuple[str, ...] = (),
) -> ssl.SSLContext:
    """A server's context: its chain and key, optionally verifying client certificates.

    ``client_ca`` makes it ask every client for a certificate signed by that
    CA: refused without one when ``client_required``, else optional (a
    client that sends one must still send a valid one). Raises OSError or
    ssl.SSLError as the ssl module does.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[min_version]
    # Renegotiation is a denial-of-service lever and nothing here needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    load_chain(context, certificate, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED if client_required else ssl.CERT_OPTIONAL
    return context


def client_context(
    ca: str | None = None,
    certificate: str | None = None,
    key: str | None = None,
    *,
    min_version: str = "1.2",
) -> ssl.SSLContext:
    """A client's context: trusts ``ca`` (default: the system's store), may present a certificate.

    The node's certificate is always verified, host name included.
    """
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = TLS_VERSIONS[min_version]
    if certificate is not None:
        load_chain(context, certificate, key)
    return context


def load_chain(context: ssl.SSLContext, certificate: str, key: str | None) -> None:
    """Load a certificate chain and its key; an encrypted key fails at once (no prompt)."""
    context.load_cert_chain(certificate, key, password=_no_passphrase)


# -- sections -------------------------------------------------------------------------


def server_tls_section(
    checks: Checks, table: Mapping[str, Any], path: KeyPath
) -> ServerTlsConfig | None:
    """The listener's TLS settings with a context built from them; None (and issues) if unusable."""
    checks._check_keys(table, path, SERVER_TLS_KEYS)
    errors_before = len(checks.issues)
    digest = hashlib.sha256()
    min_version = _min_version(checks, table, path)
    certificate, key = _pair(checks, table, path, required=True, digest=digest)
    if certificate is not None:
        _check_leaf(checks, (*path, "certificate"), certificate)
    client_ca = _file(checks, table, (*path, "client_ca"), "CA certificates", digest)
    mode = checks._string(table, (*path, "client_certificate"))
    if mode is None:
        mode = "required"
    elif mode not in CLIENT_CERTIFICATE_MODES:
        checks.report((*path, "client_certificate"), one_of_message(mode, CLIENT_CERTIFICATE_MODES))
    elif "client_ca" not in table:
        checks.report(
            (*path, "client_certificate"),
            "needs client_ca: the CA file client certificates are verified against",
        )
    sni = _sni_certificates(checks, table, (*path, "certificates"), digest)
    if client_ca is not None and not _loads_as_ca(checks, (*path, "client_ca"), client_ca):
        client_ca = None  # the pairs below are still checked, without it
    if certificate is None or key is None:
        return None
    digest.update(repr((min_version, mode, [c.names for c in sni])).encode())

    def build(chain: str, private_key: str, where: KeyPath) -> ssl.SSLContext | None:
        try:
            return server_context(
                chain,
                private_key,
                client_ca=client_ca,
                client_required=mode == "required",
                min_version=min_version,
                alpn=ALPN,
            )
        except (OSError, ssl.SSLError) as exc:
            _load_failed(checks, where, chain, private_key, exc)
            return None

    context = build(certificate, key, path)
    chosen: dict[str, ssl.SSLContext] = {}
    for index, entry in enumerate(sni):
        built = build(entry.certificate, entry.key, (*path, "certificates", index))
        if built is not None:
            for name in entry.names:
                chosen[name] = built
    if context is None or len(checks.issues) > errors_before:
        return None
    if chosen:
        context.sni_callback = _chooser(chosen)
    return ServerTlsConfig(
        certificate=certificate,
        key=key,
        min_version=min_version,
        client_ca=client_ca,
        client_certificate=mode,
        certificates=sni,
        digest=digest.hexdigest(),
        context=context,
    )


def cluster_tls_section(
    checks: Checks, table: Mapping[str, Any], path: KeyPath
) -> ClusterTlsConfig | None:
    """How the proxy reaches a cluster's tls:// nodes; None (and issues) if unusable."""
    checks._check_keys(table, path, CLUSTER_TLS_KEYS)
    errors_before = len(checks.issues)
    digest = hashlib.sha256()
    min_version = _min_version(checks, table, path)
    ca = _file(checks, table, (*path, "ca"), "CA certificates", digest)
    certificate, key = _pair(checks, table, path, required=False, digest=digest)
    if certificate is not None:
        _check_leaf(checks, (*path, "certificate"), certificate)
    server_name = checks._string(table, (*path, "server_name"))
    if server_name is not None:
        server_name = server_name.lower().rstrip(".")
        if not _is_host(server_name):
            checks.report(
                (*path, "server_name"),
                f"must be a host name or an IP address, got {show(server_name)}",
            )
    if len(checks.issues) > errors_before:
        return None
    digest.update(repr((min_version, server_name)).encode())
    try:
        context = client_context(ca, min_version=min_version)
    except (OSError, ssl.SSLError) as exc:
        checks.report((*path, "ca"), f"cannot load {show(ca)}: {_reason(exc)}")
        return None
    if certificate is not None and key is not None:
        try:
            load_chain(context, certificate, key)
        except (OSError, ssl.SSLError) as exc:
            _load_failed(checks, path, certificate, key, exc)
            return None
    return ClusterTlsConfig(
        ca=ca,
        certificate=certificate,
        key=key,
        server_name=server_name,
        min_version=min_version,
        digest=digest.hexdigest(),
        context=context,
    )


def named_for_discovery(tls: ClusterTlsConfig | None, name: str) -> ClusterTlsConfig:
    """A cluster's TLS settings for tls:// nodes found in DNS: ``server_name`` is the DNS name.

    The nodes are the name's addresses, and their certificates name the DNS
    name, not each address. ``tls`` None: the system's trust store.
    """
    if tls is None:
        tls = ClusterTlsConfig(context=client_context())
    digest = hashlib.sha256(f"{tls.digest} {name}".encode()).hexdigest()
    return dataclasses.replace(tls, server_name=name.lower().rstrip("."), digest=digest)


def describe_listener(tls: ServerTlsConfig | None) -> str:
    """For the start-up line: "TLS 1.2+, 3 certificates, client certificates required; "."""
    if tls is None:
        return ""
    parts = [f"TLS {tls.min_version}+"]
    if tls.certificates:
        parts.append(f"{len(tls.certificates) + 1} certificates by SNI")
    if tls.client_ca is not None:
        parts.append(f"client certificates {tls.client_certificate}")
    return ", ".join(parts) + "; "


def tls_digest(config: Config) -> str:
    """One digest of every certificate, key and CA file a configuration loaded, and their settings.

    The master sends it with a reload: a worker that reads different files
    (one was replaced in between) refuses, as it does a changed configuration file.
    """
    digest = hashlib.sha256()
    if config.server.tls is not None:
        digest.update(config.server.tls.digest.encode())
    for name, cluster in sorted(config.clusters.items()):
        if cluster.tls is not None:
            digest.update(f"{name}={cluster.tls.digest}".encode())
    return digest.hexdigest()


# -- the pieces -----------------------------------------------------------------------


def _min_version(checks: Checks, table: Mapping[str, Any], path: KeyPath) -> str:
    value = table.get("min_version")
    if value is None:
        return "1.2"
    if not isinstance(value, str) or value not in TLS_VERSIONS:
        checks.report(
            (*path, "min_version"),
            one_of_message(value, tuple(TLS_VERSIONS))
            if isinstance(value, str)
            else type_message('"1.2" or "1.3"', value),
        )
        return "1.2"
    return value


def _pair(
    checks: Checks,
    table: Mapping[str, Any],
    path: KeyPath,
    *,
    required: bool,
    digest: Any,
) -> tuple[str | None, str | None]:
    """``certificate`` and ``key``, both read and checked; (None, None) if either is missing."""
    certificate = _file(checks, table, (*path, "certificate"), "certificate", digest)
    key = _file(checks, table, (*path, "key"), "private key", digest)
    for name, other in (("certificate", "key"), ("key", "certificate")):
        if name not in table and (required or other in table):
            what = "the certificate chain, PEM" if name == "certificate" else "its private key"
            checks.report((*path, name), f"missing required key ({what})")
    return certificate, key


def _file(
    checks: Checks, table: Mapping[str, Any], path: KeyPath, what: str, digest: Any
) -> str | None:
    """The path of a PEM file holding ``what``, resolved and read; None (and an issue) if not."""
    name = checks._string(table, path)
    if name is None:
        return None
    if not name.strip():
        checks.report(path, f"must be the path of a PEM file ({what}), got an empty string")
        return None
    resolved = checks.relative_path(name)
    try:
        with open(resolved, "rb") as file:
            data = file.read(_PEM_LIMIT + 1)
    except OSError as exc:
        checks.report(path, f"cannot read {show(resolved)}: {exc.strerror or exc}")
        return None
    if len(data) > _PEM_LIMIT:
        checks.report(path, f"{show(resolved)} is over {_PEM_LIMIT} bytes: not a PEM file")
        return None
    kinds = {match.group(1) for match in _PEM_BLOCK.finditer(data)}
    if what == "private key":
        if b"ENCRYPTED PRIVATE KEY" in kinds or b"Proc-Type: 4,ENCRYPTED" in data:
            checks.report(
                path,
                f"the key in {show(resolved)} is encrypted: a passphrase-protected key is not"
                f" supported (write it decrypted: openssl pkey -in {name} -out PLAIN.pem)",
            )
            return None
        if not any(kind.endswith(b"PRIVATE KEY") for kind in kinds):
            checks.report(path, f"{show(resolved)} holds no PEM private key")
            return None
    elif b"CERTIFICATE" not in kinds:
        checks.report(
            path, f"{show(resolved)} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )
        return None
    digest.update(resolved.encode() + b"\0" + data)
    return resolved


def _sni_certificates(
    checks: Checks, table: Mapping[str, Any], path: KeyPath, digest: Any
) -> tuple[SniCertificate, ...]:
    value = table.get("certificates")
    if value is None:
        return ()
    if not isinstance(value, list):
        checks.report(path, type_message("an array of tables ([[server.tls.certificates]])", value))
        return ()
    entries: list[SniCertificate] = []
    first: dict[str, int] = {}
    for index, item in enumerate(value):
        where = (*path, index)
        if not isinstance(item, dict):
            checks.report(where, type_message("a table", item))
            continue
        checks._check_keys(item, where, SNI_CERTIFICATE_KEYS)
        names = _names(checks, item, (*where, "names"))
        for name in names:
            if name in first:
                checks.report(
                    (*where, "names"),
                    f"{show(name)} is already served by certificates[{first[name]}]",
                )
            first.setdefault(name, index)
        certificate, key = _pair(checks, item, where, required=True, digest=digest)
        if certificate is not None:
            _check_leaf(checks, (*where, "certificate"), certificate, names)
        if names and certificate is not None and key is not None:
            entries.append(SniCertificate(names, certificate, key))
    return tuple(entries)


def _names(checks: Checks, item: Mapping[str, Any], path: KeyPath) -> tuple[str, ...]:
    value = item.get("names")
    if not isinstance(value, list) or not value:
        checks.report(
            path,
            "required: the host names this certificate is for, as a non-empty array"
            ' (["api.example.com", "*.example.org"])',
        )
        return ()
    names: list[str] = []
    for index, name in enumerate(value):
        if not isinstance(name, str):
            checks.report((*path, index), type_message("a host name", name))
            continue
        name = name.lower().rstrip(".")
        bare = name[2:] if name.startswith("*.") else name
        if HOST_NAME.fullmatch(bare) is None:
            checks.report(
                (*path, index),
                f'must be a host name or "*.domain" (one label), got {show(name)}',
            )
            continue
        names.append(name)
    return tuple(dict.fromkeys(names))


def _chooser(contexts: dict[str, ssl.SSLContext]) -> Any:
    """The sni_callback that serves the certificate of the name a client asks for.

    Every context was built with the same settings but the chain: OpenSSL's
    switch of context in the callback changes the certificate and key (and
    the trust store) but not what was negotiated before it, such as the
    version, or the demand for a client certificate.
    """
    exact = {name: context for name, context in contexts.items() if not name.startswith("*.")}
    wildcard = {name[2:]: context for name, context in contexts.items() if name.startswith("*.")}

    def choose(connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        if server_name is None:
            return  # no SNI (an IP address was asked for): the default certificate
        name = server_name.lower().rstrip(".")
        context = exact.get(name)
        if context is None and wildcard:
            context = wildcard.get(name.partition(".")[2])
        if context is not None:
            connection.context = context

    return choose


def _check_leaf(
    checks: Checks, path: KeyPath, certificate: str, names: tuple[str, ...] = ()
) -> None:
    """Warn of a leaf certificate that has expired, is not valid yet, or lacks one of ``names``."""
    try:
        with open(certificate, "rb") as file:
            leaf = read_leaf(file.read(_PEM_LIMIT).decode("ascii", "replace"))
    except (OSError, ValueError):
        return  # loading it says what is wrong
    now = time.time()
    if now > leaf.not_after:
        checks.warn(
            path,
            f"the certificate in {show(certificate)} expired on {_date(leaf.not_after)}:"
            " clients will refuse it",
        )
    elif now < leaf.not_before:
        checks.warn(
            path,
            f"the certificate in {show(certificate)} is not valid before"
            f" {_date(leaf.not_before)}: clients will refuse it until then",
        )
    for index, name in enumerate(names):
        if not covers(leaf.names, name):
            carried = ", ".join(leaf.names) or "none"
            checks.warn(
                (*path[:-1], "names", index),
                f"{show(name)} is not a name the certificate in {show(certificate)} carries"
                f" ({carried}): clients asking for it will refuse it",
            )


def _date(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _is_host(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return HOST_NAME.fullmatch(name) is not None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return str(getattr(exc, "strerror", None) or exc)


def _loads_as_ca(checks: Checks, path: KeyPath, ca: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        checks.report(path, f"cannot load {show(ca)}: {_reason(exc)}")
        return False
    return True


def _load_failed(
    checks: Checks, path: KeyPath, certificate: str, key: str, exc: BaseException
) -> None:
    """Say which file a failed load is about, at that file's key."""
    reason = exc.reason if isinstance(exc, ssl.SSLError) else None
    if reason == "KEY_VALUES_MISMATCH":
        checks.report(
            (*path, "key"),
            f"the key in {show(key)} does not match the certificate in {show(certificate)}",
        )
    elif "encrypted" in str(exc):
        checks.report((*path, "key"), f"the key in {show(key)} is encrypted: {exc}")
    else:
        checks.report(
            (*path, "certificate"),
            f"cannot load {show(certificate)} with the key {show(key)}: {_reason(exc)}",
        )
