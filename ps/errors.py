"""Domain errors of the parameter server, each with the gRPC status the servicer answers with."""
import grpc


class PSError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(PSError):
    """The message itself is malformed: bad chunk, NaN, wrong size."""
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(PSError):
    """The message is well formed but does not fit the server's state: wrong step, manifest mismatch."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class Busy(PSError):
    """Another call of the same worker is still being served (a push retried before the PS
    noticed that the first try's connection broke): retry when it has ended."""
    code = grpc.StatusCode.ABORTED


class RunFull(PSError):
    """Every worker slot is taken; one frees when a worker leaves or is dropped: retry later."""
    code = grpc.StatusCode.UNAVAILABLE


class TooLarge(PSError):
    """The request would make the PS allocate more than it is allowed to."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnknownWorker(PSError):
    code = grpc.StatusCode.NOT_FOUND


class Timeout(PSError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
