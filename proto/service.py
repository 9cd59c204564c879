"""The ParameterServer service bound to gRPC with the zero-copy codec for the streams.

Unary messages use protobuf's generated classes. The three streams (Init, Push, Pull)
carry `Frame`s encoded and decoded by proto.codec; on the wire they are the same
protobuf messages the generated stubs would send, so those stubs still interoperate.
"""
from __future__ import annotations

import grpc

from proto import freezeps_pb2 as pb
from proto.codec import decoder

SERVICE = "freezeps.ParameterServer"
# Call metadata naming the calling worker (its worker id, or its name before it has one);
# the PS labels the bytes it counts with it.
WORKER_METADATA = "worker-id"


def _frame_bytes(frame) -> bytes:
    return frame.raw


def server_handler(servicer) -> grpc.GenericRpcHandler:
    """Route the service's methods to `servicer`'s Join/Init/Pull/Push/Status/Leave/Heartbeat."""
    def unary(fn, req):
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                   response_serializer=lambda m: m.SerializeToString())
    push_in = dict(request_deserializer=decoder(pb.PushHeader, pb.Vote),
                   response_serializer=lambda m: m.SerializeToString())
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Join": unary(servicer.Join, pb.JoinRequest),
        "Init": grpc.stream_unary_rpc_method_handler(servicer.Init, **push_in),
        "Push": grpc.stream_unary_rpc_method_handler(servicer.Push, **push_in),
        "Pull": grpc.unary_stream_rpc_method_handler(servicer.Pull, request_deserializer=pb.PullRequest.FromString,
                                                     response_serializer=_frame_bytes),
        "Status": unary(servicer.Status, pb.StatusRequest),
        "Leave": unary(servicer.Leave, pb.LeaveRequest),
        "Heartbeat": unary(servicer.Heartbeat, pb.HeartbeatRequest),
    })


class ParameterServerClient:
    """Callables for each method: unary ones take messages, streams take/return Frames."""

    def __init__(self, channel: grpc.Channel):
        def unary(name, reply):
            return channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=reply.FromString)
        self.Join = unary("Join", pb.JoinReply)
        self.Status = unary("Status", pb.StatusReply)
        self.Leave = unary("Leave", pb.LeaveReply)
        self.Heartbeat = unary("Heartbeat", pb.HeartbeatReply)
        self.Init = channel.stream_unary(f"/{SERVICE}/Init", request_serializer=_frame_bytes,
                                         response_deserializer=pb.PushReply.FromString)
        self.Push = channel.stream_unary(f"/{SERVICE}/Push", request_serializer=_frame_bytes,
                                         response_deserializer=pb.PushReply.FromString)
        self.Pull = channel.unary_stream(f"/{SERVICE}/Pull", request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=decoder(pb.PullHeader))
