from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_KIND_UNSPECIFIED: _ClassVar[TensorKind]
    PARAMETER: _ClassVar[TensorKind]
    BUFFER: _ClassVar[TensorKind]
TENSOR_KIND_UNSPECIFIED: TensorKind
PARAMETER: TensorKind
BUFFER: TensorKind

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "kind", "row_sparse")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROW_SPARSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    kind: TensorKind
    row_sparse: bool
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., kind: _Optional[_Union[TensorKind, str]] = ..., row_sparse: _Optional[bool] = ...) -> None: ...

class BlockSpec(_message.Message):
    __slots__ = ("name", "tensors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, name: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("model", "blocks")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    model: str
    blocks: _containers.RepeatedCompositeFieldContainer[BlockSpec]
    def __init__(self, model: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[BlockSpec, _Mapping]]] = ...) -> None: ...

class FreezeState(_message.Message):
    __slots__ = ("frozen_blocks", "version", "since_step")
    FROZEN_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    frozen_blocks: int
    version: int
    since_step: int
    def __init__(self, frozen_blocks: _Optional[int] = ..., version: _Optional[int] = ..., since_step: _Optional[int] = ...) -> None: ...

class BlockRange(_message.Message):
    __slots__ = ("first", "end")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    first: int
    end: int
    def __init__(self, first: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class EngineConfig(_message.Message):
    __slots__ = ("name", "spec_json", "votes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec_json: str
    votes: bool
    def __init__(self, name: _Optional[str] = ..., spec_json: _Optional[str] = ..., votes: _Optional[bool] = ...) -> None: ...

class Vote(_message.Message):
    __slots__ = ("frozen_blocks", "eta", "shard_size", "label_balance", "abstain")
    FROZEN_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LABEL_BALANCE_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_FIELD_NUMBER: _ClassVar[int]
    frozen_blocks: int
    eta: _containers.RepeatedScalarFieldContainer[float]
    shard_size: int
    label_balance: float
    abstain: bool
    def __init__(self, frozen_blocks: _Optional[int] = ..., eta: _Optional[_Iterable[float]] = ..., shard_size: _Optional[int] = ..., label_balance: _Optional[float] = ..., abstain: _Optional[bool] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("worker_name", "manifest", "rank", "plan")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    manifest: Manifest
    rank: int
    plan: DataPlan
    def __init__(self, worker_name: _Optional[str] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., rank: _Optional[int] = ..., plan: _Optional[_Union[DataPlan, _Mapping]] = ...) -> None: ...

class DataPlan(_message.Message):
    __slots__ = ("train_set", "sharding", "dirichlet_alpha", "seed", "batch_size", "steps", "epochs")
    TRAIN_SET_FIELD_NUMBER: _ClassVar[int]
    SHARDING_FIELD_NUMBER: _ClassVar[int]
    DIRICHLET_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    train_set: str
    sharding: str
    dirichlet_alpha: float
    seed: int
    batch_size: int
    steps: int
    epochs: int
    def __init__(self, train_set: _Optional[str] = ..., sharding: _Optional[str] = ..., dirichlet_alpha: _Optional[float] = ..., seed: _Optional[int] = ..., batch_size: _Optional[int] = ..., steps: _Optional[int] = ..., epochs: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("worker_id", "rank", "num_workers", "needs_init", "step", "freeze", "owned", "chunk_bytes", "total_steps", "engine", "worker_timeout_s", "push_dtype", "pull_dtype")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    NEEDS_INIT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    OWNED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    WORKER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PUSH_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PULL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    rank: int
    num_workers: int
    needs_init: bool
    step: int
    freeze: FreezeState
    owned: BlockRange
    chunk_bytes: int
    total_steps: int
    engine: EngineConfig
    worker_timeout_s: float
    push_dtype: str
    pull_dtype: str
    def __init__(self, worker_id: _Optional[str] = ..., rank: _Optional[int] = ..., num_workers: _Optional[int] = ..., needs_init: _Optional[bool] = ..., step: _Optional[int] = ..., freeze: _Optional[_Union[FreezeState, _Mapping]] = ..., owned: _Optional[_Union[BlockRange, _Mapping]] = ..., chunk_bytes: _Optional[int] = ..., total_steps: _Optional[int] = ..., engine: _Optional[_Union[EngineConfig, _Mapping]] = ..., worker_timeout_s: _Optional[float] = ..., push_dtype: _Optional[str] = ..., pull_dtype: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("block", "tensor", "offset", "data", "rows")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    block: int
    tensor: int
    offset: int
    data: bytes
    rows: bytes
    def __init__(self, block: _Optional[int] = ..., tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., rows: _Optional[bytes] = ...) -> None: ...

class PhaseTimes(_message.Message):
    __slots__ = ("forward_s", "backward_s", "pull_s", "wait_s", "push_s")
    FORWARD_S_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_S_FIELD_NUMBER: _ClassVar[int]
    PULL_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    PUSH_S_FIELD_NUMBER: _ClassVar[int]
    forward_s: float
    backward_s: float
    pull_s: float
    wait_s: float
    push_s: float
    def __init__(self, forward_s: _Optional[float] = ..., backward_s: _Optional[float] = ..., pull_s: _Optional[float] = ..., wait_s: _Optional[float] = ..., push_s: _Optional[float] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("worker_id", "step", "batch_size", "loss", "phases", "total_steps", "steps_per_epoch")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    step: int
    batch_size: int
    loss: float
    phases: PhaseTimes
    total_steps: int
    steps_per_epoch: int
    def __init__(self, worker_id: _Optional[str] = ..., step: _Optional[int] = ..., batch_size: _Optional[int] = ..., loss: _Optional[float] = ..., phases: _Optional[_Union[PhaseTimes, _Mapping]] = ..., total_steps: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ...) -> None: ...

class PushMessage(_message.Message):
    __slots__ = ("header", "chunk", "vote")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: Chunk
    vote: Vote
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., vote: _Optional[_Union[Vote, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("step", "freeze", "duplicate", "late")
    STEP_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    step: int
    freeze: FreezeState
    duplicate: bool
    late: bool
    def __init__(self, step: _Optional[int] = ..., freeze: _Optional[_Union[FreezeState, _Mapping]] = ..., duplicate: _Optional[bool] = ..., late: _Optional[bool] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker_id", "step", "frozen_blocks", "base_step", "rows")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FROZEN_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BASE_STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    step: int
    frozen_blocks: int
    base_step: int
    rows: _containers.RepeatedCompositeFieldContainer[TensorRows]
    def __init__(self, worker_id: _Optional[str] = ..., step: _Optional[int] = ..., frozen_blocks: _Optional[int] = ..., base_step: _Optional[int] = ..., rows: _Optional[_Iterable[_Union[TensorRows, _Mapping]]] = ...) -> None: ...

class TensorRows(_message.Message):
    __slots__ = ("block", "tensor", "rows")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    block: int
    tensor: int
    rows: bytes
    def __init__(self, block: _Optional[int] = ..., tensor: _Optional[int] = ..., rows: _Optional[bytes] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("step", "freeze", "blocks", "delta")
    STEP_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    step: int
    freeze: FreezeState
    blocks: _containers.RepeatedScalarFieldContainer[int]
    delta: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, step: _Optional[int] = ..., freeze: _Optional[_Union[FreezeState, _Mapping]] = ..., blocks: _Optional[_Iterable[int]] = ..., delta: _Optional[_Iterable[bool]] = ...) -> None: ...

class PullMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("step", "total_steps", "live_workers", "num_workers", "initialized", "done", "freeze", "blocks", "payload_bytes_in", "payload_bytes_out")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    live_workers: int
    num_workers: int
    initialized: bool
    done: bool
    freeze: FreezeState
    blocks: _containers.RepeatedScalarFieldContainer[str]
    payload_bytes_in: int
    payload_bytes_out: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., live_workers: _Optional[int] = ..., num_workers: _Optional[int] = ..., initialized: _Optional[bool] = ..., done: _Optional[bool] = ..., freeze: _Optional[_Union[FreezeState, _Mapping]] = ..., blocks: _Optional[_Iterable[str]] = ..., payload_bytes_in: _Optional[int] = ..., payload_bytes_out: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("freeze",)
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    freeze: FreezeState
    def __init__(self, freeze: _Optional[_Union[FreezeState, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...
