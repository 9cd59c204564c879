"""The gRPC face of the parameter server: decode, call ParameterServer, map errors to status codes.

Every message in or out passes through the transport's meter, keyed by the worker id the
client sends in the `worker-id` call metadata.
"""
from __future__ import annotations

import logging
from concurrent import futures

import grpc

from proto.security import Auth
from proto.service import WORKER_METADATA, server_handler
from proto.transport import CHANNEL_OPTIONS, KEEPALIVE_S, ByteMeter, keepalive_options, metered
from ps.errors import PSError
from ps.server import ParameterServer

log = logging.getLogger("freezeps.ps")


def _worker_label(context: grpc.ServicerContext) -> str:
    return dict(context.invocation_metadata()).get(WORKER_METADATA, "?")


class ParameterServerServicer:
    def __init__(self, server: ParameterServer, meter: ByteMeter):
        self._ps = server
        self._meter = meter

    def _call(self, method: str, fn, request, context, label: str):
        """Run fn(request), count the reply, and turn a domain error into a gRPC status."""
        try:
            reply = fn(request)
        except PSError as e:
            log.warning("[PS.%s] %s: %s", method, label, e)
            context.abort(e.code, str(e))
        self._meter.count(method, "out", label, reply)
        return reply

    def _unary(self, method: str, fn, request, context, label: str | None = None):
        label = label or _worker_label(context)
        self._meter.count(method, "in", label, request)
        return self._call(method, fn, request, context, label)

    def _client_stream(self, method: str, fn, request_iterator, context):
        label = _worker_label(context)
        return self._call(method, fn, metered(request_iterator, self._meter, method, "in", label), context, label)

    def Join(self, request, context):
        return self._unary("Join", self._ps.join, request, context, label=request.worker_name or "?")

    def Init(self, request_iterator, context):
        return self._client_stream("Init", self._ps.init, request_iterator, context)

    def Push(self, request_iterator, context):
        return self._client_stream("Push", self._ps.push, request_iterator, context)

    def Pull(self, request, context):
        label = _worker_label(context)
        self._meter.count("Pull", "in", label, request)
        try:
            stream = self._ps.pull(request)
        except PSError as e:
            log.warning("[PS.Pull] %s: %s", label, e)
            context.abort(e.code, str(e))
        yield from metered(stream, self._meter, "Pull", "out", label)

    def Status(self, request, context):
        reply = self._ps.status()
        reply.payload_bytes_in = self._meter.payload_total("in")
        reply.payload_bytes_out = self._meter.payload_total("out")
        return reply

    def Leave(self, request, context):
        return self._unary("Leave", self._ps.leave, request, context)

    def Heartbeat(self, request, context):
        return self._unary("Heartbeat", self._ps.heartbeat, request, context)


def _log_refused(method: str, code: grpc.StatusCode) -> None:
    log.warning("[PS.auth] refused a call to %s: %s", method, code.name)


def start_server(server: ParameterServer, meter: ByteMeter, address: str,
                 auth: Auth = Auth(), keepalive_s: float = KEEPALIVE_S) -> tuple[grpc.Server, int]:
    """Start serving on `address` ("host:port", port 0 picks one) with `auth`'s TLS and token
    checks on every method, pinging a silent worker after `keepalive_s` (and ending its calls
    when it does not answer: proto.transport.keepalive_options); returns (server, port)."""
    credentials = auth.server_credentials()
    # gRPC sets SO_REUSEPORT by default: a second PS on a taken port would bind it too, and the
    # kernel would hand each new connection to one or the other (grpc/grpc#10755).
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * server.settings.num_workers + 8),
                              options=CHANNEL_OPTIONS + keepalive_options(keepalive_s) + [("grpc.so_reuseport", 0)],
                              interceptors=auth.interceptors(_log_refused))
    grpc_server.add_generic_rpc_handlers((server_handler(ParameterServerServicer(server, meter)),))
    try:  # grpc raises RuntimeError where it cannot bind (older versions return 0)
        port = (grpc_server.add_secure_port(address, credentials) if credentials
                else grpc_server.add_insecure_port(address))
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}: its port is taken, or the host is not one of this machine's")
    grpc_server.start()
    return grpc_server, port
