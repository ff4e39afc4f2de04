"""TLS, mutual TLS and bearer-token authentication for the services (docs/design.md section 11).

Server side (every service, `pearl serve --tls-cert --tls-key [--tls-ca]`): with a certificate
and key the port speaks TLS; with a CA as well, clients must present a certificate signed by it
(mutual TLS). Client side: the coordinator reaches draft and target with `--backend-tls-ca` (and
`--backend-tls-cert/--backend-tls-key` for mutual TLS); `pearl generate` and `Client` take
`--tls-ca` (and a certificate and key when the coordinator asks for one).

Bearer tokens (`--auth-token` or PEARL_AUTH_TOKEN on the coordinator): every call of the client
API must carry ``authorization: Bearer <token>``, else UNAUTHENTICATED. Health and reflection stay
open so that probes and tools work without it. Send tokens over TLS: on a plain port they travel
in clear text.
"""

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from specdec.limits import refusing_handler

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class ServerTLS:
    """PEM files of a TLS server port; with ``ca`` set, clients need a certificate (mTLS)."""

    cert: str
    key: str
    ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(_read(self.key), _read(self.cert))], root_certificates=_read(self.ca),
            require_client_auth=self.ca is not None)

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, ca: str | None) -> "ServerTLS | None":
        if not cert and not key:
            if ca:
                raise ValueError("--tls-ca needs --tls-cert and --tls-key")
            return None
        if not (cert and key):
            raise ValueError("--tls-cert and --tls-key go together")
        return cls(cert, key, ca)


@dataclass(frozen=True)
class ClientTLS:
    """PEM files of a TLS client: the CA that signed the server, and its own cert/key for mTLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca),
                                            private_key=_read(self.key),
                                            certificate_chain=_read(self.cert))

    @classmethod
    def from_flags(cls, ca: str | None, cert: str | None = None, key: str | None = None
                   ) -> "ClientTLS | None":
        if bool(cert) != bool(key):
            raise ValueError("a client certificate and its key go together")
        if not (ca or cert):
            return None
        return cls(ca, cert, key)


def aio_channel(address: str, options, tls: ClientTLS | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=options)


def sync_channel(address: str, options, tls: ClientTLS | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def bearer_token(header: str | bytes) -> bytes | None:
    """The token of an ``authorization`` value ``Bearer <token>``, else None. The scheme name is
    case-insensitive (RFC 7235 section 2.1: ``bearer``, ``BEARER``); the token is kept exact."""
    if isinstance(header, str):
        header = header.encode()
    scheme, _, token = header.partition(b" ")
    token = token.lstrip(b" ")
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


class TokenAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any call without ``authorization: Bearer <token>`` (health and
    reflection excepted)."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("an empty auth token would let everyone in")
        self.expected = token.encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        token = bearer_token(got)
        if token is not None and hmac.compare_digest(token, self.expected):
            return handler
        why = "missing" if not got else "invalid"
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                f"{why} bearer token (send 'authorization: Bearer <token>')")
