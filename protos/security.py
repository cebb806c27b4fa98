"""TLS, mutual TLS and a bearer token for the links between tiers (device -> edge -> cloud).

grpc and the standard library only (no numpy, no torch), so the device, both servers and tests share it.

- :class:`ServerSecurity`: what a tier server asks of its clients: TLS (``cert_file`` + ``key_file``),
  mutual TLS (``client_ca_file``: client certificates required and checked against that CA) and/or a
  bearer token (``token_file``), checked by :class:`BearerTokenInterceptor` on every RPC except health checks.
- :class:`ClientSecurity`: what a client (the device, or the edge forwarding to the cloud) shows a server:
  the CA it trusts (``ca_file``), its own certificate for mutual TLS, the token it sends.

Secrets are read from files, never taken as literals (a command line shows in ``ps``), and never written
anywhere: errors name the file, never its contents; the reprs show paths and the mode only.

A token without TLS would travel in plaintext, readable and replayable by anyone on the path, so:
a server refuses it unless it listens on loopback only (then it logs a warning); a client refuses to send
it unless told ``loopback_plaintext=True``, and then grpc's local credentials only let it reach a loopback
address.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from cartosplit.protos.addresses import is_loopback

LOG = logging.getLogger("cartosplit.security")
UNAUTHENTICATED_DETAILS = "missing or invalid bearer token"
HEALTH_PREFIX = "/grpc.health.v1.Health/"  # load balancers probe health without credentials

PathLike = str | Path


# ------------------------------------------------------------------------------------------------ file reading


def _read(path: PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:  # the reason and the path, nothing the file holds
        raise ValueError(f"cannot read the {what} {str(path)!r}: {exc.strerror or type(exc).__name__}") from None


def _read_pem(path: PathLike, what: str, marker: bytes) -> bytes:
    """A PEM file, checked enough that a wrong file fails here rather than in a later TLS handshake."""
    data = _read(path, what)
    if b"-----BEGIN " not in data or marker not in data:
        raise ValueError(f"the {what} {str(path)!r} is not PEM (expected a '-----BEGIN ...{marker.decode()}' block)")
    return data


def _read_cert(path: PathLike, what: str) -> bytes:
    return _read_pem(path, what, b"CERTIFICATE-----")


def _read_key(path: PathLike, what: str) -> bytes:
    return _read_pem(path, what, b"PRIVATE KEY-----")


def read_token(path: PathLike) -> str:
    """The token a file holds, surrounding whitespace stripped; refuses an empty or unusable file."""
    raw = _read(path, "token file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"the token file {str(path)!r} must hold printable ASCII") from None
    if not token:
        raise ValueError(f"the token file {str(path)!r} is empty")
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):  # it travels as an HTTP/2 header value
        raise ValueError(f"the token file {str(path)!r} must hold one token: printable ASCII, no spaces or newlines")
    return token


def _describe(kind: str, mode: str, **paths: PathLike | None) -> str:
    shown = ", ".join(f"{k}={str(v)!r}" for k, v in paths.items() if v is not None)
    return f"{kind}(mode={mode!r}{', ' if shown else ''}{shown})"


# ------------------------------------------------------------------------------------------------------ server


@dataclass(frozen=True, repr=False)
class ServerSecurity:
    """What a tier server requires. All fields are file paths; none set = plaintext, no auth.

    ``cert_file``/``key_file``: the server's certificate chain and private key (PEM) -> TLS.
    ``client_ca_file``: with TLS, require a client certificate signed by this CA (mutual TLS). Any
    certificate that CA signed gets in: use a CA of its own for one deployment.
    ``token_file``: require ``authorization: Bearer <token>`` on every RPC but health checks.
    """

    cert_file: PathLike | None = None
    key_file: PathLike | None = None
    client_ca_file: PathLike | None = None
    token_file: PathLike | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS needs both a certificate file and a key file (--tls-cert and --tls-key)")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("mutual TLS (--tls-client-ca) needs TLS as well: give --tls-cert and --tls-key")

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    @property
    def mode(self) -> str:
        """``none``, ``tls``, ``mtls``, ``token``, ``tls+token`` or ``mtls+token``: for logs."""
        parts = ["mtls" if self.client_ca_file else "tls"] if self.tls else []
        parts += ["token"] if self.token_file is not None else []
        return "+".join(parts) or "none"

    def check_host(self, host: str) -> None:
        """Refuse a token without TLS unless the server listens on loopback only."""
        if self.token_file is not None and not self.tls and not is_loopback(host):
            raise ValueError(
                f"a bearer token without TLS would travel in plaintext: serving on {host!r} (not loopback) "
                "needs --tls-cert and --tls-key as well"
            )

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for ``add_secure_port``, or None when TLS is off. ValueError names a bad file."""
        if not self.tls:
            return None
        key = _read_key(self.key_file, "TLS key file")
        cert = _read_cert(self.cert_file, "TLS certificate file")
        client_ca = _read_cert(self.client_ca_file, "client CA file") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def token(self) -> str | None:
        """The token to require, read now from ``token_file``; None when there is none."""
        return None if self.token_file is None else read_token(self.token_file)

    def interceptors(self, on_refusal: Callable[[str], None] | None = None) -> list[grpc.ServerInterceptor]:
        """What ``grpc.server(interceptors=...)`` needs: the token check when a token is set.

        ``on_refusal(method)`` is called for each call refused for its token (the server counts them)."""
        token = self.token()
        return [BearerTokenInterceptor(token, on_refusal=on_refusal)] if token else []

    def __repr__(self) -> str:
        return _describe(
            "ServerSecurity",
            self.mode,
            cert_file=self.cert_file,
            key_file=self.key_file,
            client_ca_file=self.client_ca_file,
            token_file=self.token_file,
        )


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse, with UNAUTHENTICATED, any RPC without ``authorization: Bearer <token>``.

    Methods whose full name starts with one of ``exempt`` pass without it (health checks, by default:
    load balancers probe them; reflection is not exempt). Unary and streaming methods alike: a refused
    call never reaches its handler, and its request messages are not even parsed. The token is compared
    in constant time and never logged. ``on_refusal(method)``, when given, is called for each refused call.
    """

    def __init__(
        self,
        token: str,
        exempt: Sequence[str] = (HEALTH_PREFIX,),
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = token.encode("ascii")
        self.exempt = tuple(exempt)
        self.on_refusal = on_refusal

    def __repr__(self) -> str:
        return f"BearerTokenInterceptor(exempt={self.exempt!r})"

    def authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        values = [value for key, value in metadata or () if key == "authorization"]
        if len(values) != 1:
            return False
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, credential = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credential.strip().encode("utf-8", "replace"), self._expected)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(self.exempt) or self.authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return None if handler is None else _refusal(handler, method, self.on_refusal)


def _refusal(
    handler: grpc.RpcMethodHandler, method: str, on_refusal: Callable[[str], None] | None = None
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that logs and aborts with UNAUTHENTICATED."""

    def refuse(_request: object, context: grpc.ServicerContext) -> None:
        LOG.warning("unauthenticated", extra={"fields": {"method": method, "peer": context.peer()}})
        if on_refusal is not None:
            on_refusal(method)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


# ------------------------------------------------------------------------------------------------------ client


@dataclass(frozen=True, repr=False)
class ClientSecurity:
    """What a client shows a tier server. All files PEM; none set = a plaintext channel.

    ``ca_file``: TLS, the server's certificate checked against this CA (a system bundle such as
    /etc/ssl/certs/ca-certificates.crt for a publicly signed server). ``cert_file``/``key_file``: this
    client's certificate for mutual TLS. ``token_file``: sent as ``authorization: Bearer <token>`` on
    every call. ``server_name``: the name the server's certificate must carry when it differs from the
    host dialled (e.g. dialling an IP).

    A token needs TLS; without ``ca_file`` :meth:`channel` refuses it, unless ``loopback_plaintext`` is
    set, and then only a loopback address can be reached (grpc's local credentials check the peer).
    """

    ca_file: PathLike | None = None
    cert_file: PathLike | None = None
    key_file: PathLike | None = None
    token_file: PathLike | None = None
    server_name: str | None = None
    loopback_plaintext: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both its certificate file and its key file")
        if self.ca_file is None and (self.cert_file is not None or self.server_name is not None):
            raise ValueError("a client certificate or a server name needs TLS: give the CA file to trust as well")

    @classmethod
    def from_options(
        cls,
        ca_file: PathLike | None = None,
        cert_file: PathLike | None = None,
        key_file: PathLike | None = None,
        token_file: PathLike | None = None,
        server_name: str | None = None,
    ) -> ClientSecurity | None:
        """The settings a command line or a config file gave; None when it gave none (a plaintext channel).

        The one builder behind ``cartosplit run``, the device service and the edge's link to the cloud."""
        settings = {
            "ca_file": ca_file,
            "cert_file": cert_file,
            "key_file": key_file,
            "token_file": token_file,
            "server_name": server_name,
        }
        return None if all(v is None for v in settings.values()) else cls(**settings)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    @property
    def mode(self) -> str:
        """``none``, ``tls``, ``mtls``, ``token``, ``tls+token`` or ``mtls+token``: for logs."""
        parts = ["mtls" if self.cert_file else "tls"] if self.tls else []
        parts += ["token"] if self.token_file is not None else []
        return "+".join(parts) or "none"

    def channel(self, address: str, options: Sequence[tuple[str, object]] | None = None) -> grpc.Channel:
        """A channel to ``address`` with these settings. ValueError for an unreadable file or a token that
        would go out in plaintext."""
        options = list(options or [])
        token = None if self.token_file is None else read_token(self.token_file)
        if self.tls:
            key = _read_key(self.key_file, "client key file") if self.key_file else None
            cert = _read_cert(self.cert_file, "client certificate file") if self.cert_file else None
            credentials = grpc.ssl_channel_credentials(_read_cert(self.ca_file, "CA file"), key, cert)
            if self.server_name:
                options.append(("grpc.ssl_target_name_override", self.server_name))
        elif token is None:
            return grpc.insecure_channel(address, options=options)
        elif self.loopback_plaintext:
            credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        else:
            raise ValueError(
                f"refusing to send a bearer token to {address} without TLS: anyone on the path could read and "
                "replay it; give the CA file that signed the server's certificate"
            )
        if token is not None:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(address, credentials, options=options)

    def __repr__(self) -> str:
        return _describe(
            "ClientSecurity",
            self.mode,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            token_file=self.token_file,
            server_name=self.server_name,
        )


__all__ = ["BearerTokenInterceptor", "ClientSecurity", "ServerSecurity", "is_loopback", "read_token"]
