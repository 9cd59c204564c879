"""Who may call the parameter server: TLS, mutual TLS and a shared-secret token.

One `Auth` describes what a process presents and what it trusts; both ends build their gRPC
credentials from it, so the PS and its workers cannot disagree on how.

- TLS: the PS serves with its certificate and key; a worker checks that certificate against
  the CA it was given (or the system's roots).
- Mutual TLS: the PS also demands a client certificate signed by its CA. A call without one
  never gets past the handshake, so it reaches nothing; the caller sees UNAVAILABLE.
- Token: every call carries `authorization: Bearer <token>` in its metadata. The PS answers
  UNAUTHENTICATED when it is missing and PERMISSION_DENIED when it is wrong, before any
  handler runs, so a refused call changes nothing. The comparison is of SHA-256 digests with
  `hmac.compare_digest`: constant time, and the length of the secret does not leak either.

Secrets (the private key, the token) are read from files and never printed: `Auth`'s repr
leaves them out, and nothing logs them.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from proto.transport import CHANNEL_OPTIONS, KEEPALIVE_S, keepalive_options

AUTH_METADATA = "authorization"
_BEARER = "Bearer "
MIN_TOKEN_CHARS = 16


class AuthError(ValueError):
    """Security settings that do not fit together, or a credential file that cannot be used."""


@dataclass(frozen=True)
class Auth:
    """What one process presents and trusts. All PEM bytes; empty means "not given"."""
    tls: bool = False
    cert: bytes = b""  # the PS's server certificate, or a worker's client certificate (mutual TLS)
    key: bytes = field(default=b"", repr=False)
    ca: bytes = b""  # worker: checks the PS's certificate; PS with client_auth: checks the workers'
    client_auth: bool = False  # PS: mutual TLS, every caller presents a certificate signed by `ca`
    token: bytes = field(default=b"", repr=False)

    @property
    def authenticates(self) -> bool:
        """Does the PS side of this refuse strangers (a token, or client certificates it checks)?
        TLS alone does not: it hides the traffic and proves the PS to the workers, but serves
        any caller."""
        return bool(self.token) or (self.tls and self.client_auth)

    def check_server(self) -> None:
        """Raise AuthError unless a PS can serve with this."""
        if self.tls and not (self.cert and self.key):
            raise AuthError("tls needs tls_cert and tls_key on the PS")
        if self.client_auth and not (self.tls and self.ca):
            raise AuthError("tls_client_auth needs tls and tls_ca: the CA that signed the workers' certificates")

    def server_credentials(self) -> grpc.ServerCredentials | None:
        self.check_server()
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca or None,
                                           require_client_auth=self.client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        if bool(self.cert) != bool(self.key):
            raise AuthError("a client certificate (tls_cert) needs its key (tls_key), and the other way round")
        return grpc.ssl_channel_credentials(root_certificates=self.ca or None, private_key=self.key or None,
                                            certificate_chain=self.cert or None)

    def interceptors(self, on_refused: Callable[[str, grpc.StatusCode], None] = lambda method, code: None) -> list:
        return [TokenCheck(self.token, on_refused)] if self.token else []


def read_auth(*, tls: bool = False, cert: str = "", key: str = "", ca: str = "", client_auth: bool = False,
              token_file: str = "") -> Auth:
    """Read the named files into an Auth; AuthError says which file and what is wrong."""
    return Auth(tls=tls, cert=_read_pem(cert, "tls_cert", "CERTIFICATE"), key=_read_pem(key, "tls_key", "PRIVATE KEY"),
                ca=_read_pem(ca, "tls_ca", "CERTIFICATE"), client_auth=client_auth, token=read_token(token_file))


def _read_pem(path: str, setting: str, kind: str) -> bytes:
    if not path:
        return b""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AuthError(f"{setting}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise AuthError(f"{setting}: {path} holds no PEM {kind}")
    return data


def read_token(path: str) -> bytes:
    """The token in `path` (surrounding whitespace stripped); b"" when no path is given."""
    if not path:
        return b""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as e:
        raise AuthError(f"token_file: cannot read {path}: {e.strerror}") from None
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or any(c <= 32 for c in token):
        raise AuthError(f"token_file: {path} must hold one printable ASCII token of at least {MIN_TOKEN_CHARS} "
                        "characters (`freezeps certs` writes one)")
    return token


def is_loopback(address: str) -> bool:
    """Does a listen address ("host:port", "[v6]:port", "unix:path") only accept local callers?"""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_listen(address: str, auth: Auth, insecure: bool) -> None:
    """Raise AuthError unless a PS may serve on `address` with `auth`: its TLS settings must be
    usable, and a non-loopback address needs callers authenticated (a token, or mutual TLS), or
    an explicit `insecure`."""
    auth.check_server()
    if is_loopback(address) or auth.authenticates or insecure:
        return
    plain = "with TLS but" if auth.tls else "without TLS and"
    raise AuthError(f"refusing to listen on {address} {plain} without authenticating callers: anyone who "
                    "reaches it could push gradients and read the parameters. Give token_file, or "
                    "tls_client_auth (with tls_ca), or --insecure to accept that")


def open_channel(address: str, auth: Auth, keepalive_s: float = KEEPALIVE_S) -> grpc.Channel:
    """A channel to the PS that presents `auth` on every call and pings it after `keepalive_s`
    of silence (proto.transport.keepalive_options)."""
    credentials = auth.channel_credentials()
    options = CHANNEL_OPTIONS + keepalive_options(keepalive_s)
    channel = (grpc.secure_channel(address, credentials, options=options) if credentials
               else grpc.insecure_channel(address, options=options))
    if auth.token:
        channel = grpc.intercept_channel(channel, _TokenMetadata(auth.token))
    return channel


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class TokenCheck(grpc.ServerInterceptor):
    """Let a call through only when its metadata carries the run's token."""

    def __init__(self, token: bytes, on_refused: Callable[[str, grpc.StatusCode], None]):
        self._digest = _digest(token)
        self._on_refused = on_refused

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        presented = next((v for k, v in details.invocation_metadata if k == AUTH_METADATA), None)
        if presented is None:
            code, why = grpc.StatusCode.UNAUTHENTICATED, "this PS needs a token: call metadata 'authorization: Bearer <token>'"
        elif not (isinstance(presented, str) and presented.startswith(_BEARER)
                  and hmac.compare_digest(_digest(presented[len(_BEARER):].encode()), self._digest)):
            code, why = grpc.StatusCode.PERMISSION_DENIED, "wrong token"
        else:
            return handler
        self._on_refused(details.method, code)
        return _refusal(handler, code, why)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, why: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers `code` without reading the request."""
    def refuse(request, context):
        context.abort(code, why)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Add the token to every call's metadata."""

    def __init__(self, token: bytes):
        self._entry = (AUTH_METADATA, _BEARER + token.decode())

    def _with_token(self, details):
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), self._entry),
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple = field(repr=False)  # holds the token
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None
