"""``pitcher backend`` for an SDK Service or an ASGI app, and what every service command takes.

Kept here, beside what they run, so that the command line only names them;
``python -m pitcher_rpc.sdk.asgi`` runs the same command on its own (and
:mod:`pitcher_rpc.sdk.bridge` has ``pitcher bridge``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .registration import Registration, RegistrationError

F = TypeVar("F", bound=Callable[..., Any])


def registration_options(command: F) -> F:
    """The options every split service takes to join a proxy's cluster."""
    options = [
        click.option(
            "--register",
            metavar="URL",
            help="A proxy's admin API (e.g. http://127.0.0.1:9180): join --cluster there at"
            " start, be drained and leave at SIGTERM. Or etcd://HOST:PORT/CLUSTER: join every"
            " proxy watching that etcd, with a lease of --ttl seconds.",
        ),
        click.option("--cluster", help="The cluster to join (with --register http://...)."),
        click.option(
            "--register-token-file",
            metavar="FILE",
            type=click.Path(dir_okay=False),
            help="The admin API's bearer token (the proxy's [admin] token_file), for"
            " --register http://...",
        ),
        click.option(
            "--advertise", metavar="URI", help="The URI the proxy should use (default: --listen)."
        ),
        click.option("--weight", type=click.IntRange(1, 1000), default=1, show_default=True),
        click.option(
            "--ttl",
            type=click.IntRange(1, 3600),
            default=5,
            show_default=True,
            help="With etcd: seconds proxies keep sending to this service if it dies.",
        ),
        click.option(
            "--metadata",
            multiple=True,
            metavar="KEY=VALUE",
            help="With etcd: metadata stored with the node (repeatable).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def make_registration(
    register: str | None,
    cluster: str | None,
    advertise: str | None,
    weight: int,
    ttl: int,
    metadata: tuple[str, ...],
    token_file: str | None = None,
) -> Registration | None:
    """The Registration the options ask for (None without --register); BadParameter if wrong."""
    in_etcd = register is not None and register.startswith("etcd://")
    if not in_etcd and (register is None) != (cluster is None):
        raise click.BadParameter("--register and --cluster go together", param_hint="--cluster")
    if in_etcd:
        from ..config.discovery import FLEET_EXTRA, fleet_installed

        if not fleet_installed():
            raise click.UsageError(f"--register etcd:// needs the fleet extra: {FLEET_EXTRA}")
    labels: dict[str, str] = {}
    for item in metadata:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--metadata")
        labels[key] = value
    if register is None:
        if token_file is not None:
            raise click.BadParameter("goes with --register", param_hint="--register-token-file")
        return None
    token = ""
    if token_file is not None:
        if in_etcd:
            raise click.BadParameter(
                "is for a proxy's admin API, not etcd", param_hint="--register-token-file"
            )
        token = read_token(token_file)
    try:
        return Registration(
            register,
            cluster or "",
            advertise=advertise,
            weight=weight,
            ttl=ttl,
            metadata=labels or None,
            token=token,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--register") from None


def read_token(path: str) -> str:
    """The token in ``path``, checked as the proxy checks its own; BadParameter if there is none."""
    from ..config.validate import read_token as token_in

    try:
        return token_in(path)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--register-token-file") from None


def check_listen(listen: str) -> None:
    from transports.registry import AddressError, transport_for

    try:
        transport_for(listen)
    except AddressError as exc:
        message = str(exc) if listen in str(exc) else f"{listen}: {exc}"
        raise click.BadParameter(message, param_hint="--listen") from None


def tls_options(command: F) -> F:
    """``--tls-certificate``, ``--tls-key`` and ``--tls-client-ca``: serving a tls:// address."""
    path = click.Path(dir_okay=False)
    options = [
        click.option(
            "--tls-certificate",
            metavar="FILE",
            type=path,
            help="With --listen tls://...: the certificate chain (PEM) the service presents.",
        ),
        click.option("--tls-key", metavar="FILE", type=path, help="Its private key (PEM)."),
        click.option(
            "--tls-client-ca",
            metavar="FILE",
            type=path,
            help="Require a client certificate signed by this CA (PEM): the proxy's cluster"
            " then sets [clusters.NAME.tls] certificate and key.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def configure_tls(
    listen: str, certificate: str | None, key: str | None, client_ca: str | None
) -> None:
    """Make the TLS context a tls:// --listen serves with; BadParameter if it cannot be."""
    import ssl

    from transports.tls import set_default_server_context

    from ..config.tls import server_context

    wanted = listen.lower().startswith("tls://")
    given = [
        name
        for name, value in (
            ("--tls-certificate", certificate),
            ("--tls-key", key),
            ("--tls-client-ca", client_ca),
        )
        if value is not None
    ]
    if not wanted:
        if given:
            message = f"{given[0]} needs --listen tls://HOST:PORT"
            raise click.BadParameter(message, param_hint="--listen")
        return
    if certificate is None or key is None:
        message = "a tls:// address needs --tls-certificate FILE and --tls-key FILE"
        raise click.BadParameter(message, param_hint="--listen")
    try:
        context = server_context(certificate, key, client_ca=client_ca)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            reason = f"the key in {key} does not match the certificate in {certificate}"
        raise click.BadParameter(
            f"cannot load {certificate} / {key}"
            + (f" / {client_ca}" if client_ca else "")
            + f": {reason}",
            param_hint="--tls-certificate",
        ) from None
    set_default_server_context(context)


def run_backend(
    app: str,
    listen: str,
    interface: str,
    root_path: str,
    lifespan: str,
    registration: Registration | None,
) -> None:
    """Load APP, serve it as an SDK Service or an ASGI app; exit 1 on a failed start."""
    from .asgi import AsgiService, LifespanError, as_service, load_app

    check_listen(listen)
    try:
        target = load_app(app)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="APP") from None
    try:
        service = as_service(target, interface, name=app)
    except ValueError as exc:
        raise click.BadParameter(f"{app} {exc}", param_hint="APP") from None
    if isinstance(service, AsgiService):
        service.root_path = root_path
        service.lifespan = lifespan
    try:
        service.run(listen, register=registration)
    except RegistrationError as exc:
        click.echo(f"pitcher: {exc}", err=True)
        sys.exit(1)
    except LifespanError as exc:
        click.echo(f"pitcher: {app}: lifespan startup failed: {exc}", err=True)
        sys.exit(1)


def backend_options(command: F) -> F:
    """``--interface``, ``--root-path`` and ``--lifespan``: what an ASGI app adds to backend."""
    options = [
        click.option(
            "--interface",
            type=click.Choice(["auto", "sdk", "asgi"]),
            default="auto",
            show_default=True,
            help="What APP is: auto tells a pitcher_rpc.sdk.Service from an ASGI 3 app.",
        ),
        click.option(
            "--root-path",
            default="",
            help="ASGI: the scope's root_path (the prefix a strip_prefix route removed).",
        ),
        click.option(
            "--lifespan",
            type=click.Choice(["auto", "on", "off"]),
            default="auto",
            show_default=True,
            help="ASGI: run the lifespan protocol (auto: if the app supports it).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("backend")
@click.argument("app")
@click.option("--listen", required=True, metavar="URI", help="e.g. unix:///run/app.sock")
@backend_options
@tls_options
@registration_options
def backend_command(
    app: str,
    listen: str,
    interface: str,
    root_path: str,
    lifespan: str,
    tls_certificate: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    register: str | None,
    cluster: str | None,
    advertise: str | None,
    weight: int,
    ttl: int,
    metadata: tuple[str, ...],
    register_token_file: str | None,
) -> None:
    """Run a split service: APP is MODULE:ATTRIBUTE naming a Service or an ASGI 3 app."""
    registration = make_registration(
        register, cluster, advertise, weight, ttl, metadata, register_token_file
    )
    configure_tls(listen, tls_certificate, tls_key, tls_client_ca)
    run_backend(app, listen, interface, root_path, lifespan, registration)
