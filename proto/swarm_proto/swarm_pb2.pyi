from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    CANCELLED: _ClassVar[ErrorCode]
    UNKNOWN: _ClassVar[ErrorCode]
    INVALID_ARGUMENT: _ClassVar[ErrorCode]
    DEADLINE_EXCEEDED: _ClassVar[ErrorCode]
    NOT_FOUND: _ClassVar[ErrorCode]
    ALREADY_EXISTS: _ClassVar[ErrorCode]
    PERMISSION_DENIED: _ClassVar[ErrorCode]
    RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    FAILED_PRECONDITION: _ClassVar[ErrorCode]
    ABORTED: _ClassVar[ErrorCode]
    OUT_OF_RANGE: _ClassVar[ErrorCode]
    UNIMPLEMENTED: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    UNAVAILABLE: _ClassVar[ErrorCode]
    DATA_LOSS: _ClassVar[ErrorCode]
    UNAUTHENTICATED: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
CANCELLED: ErrorCode
UNKNOWN: ErrorCode
INVALID_ARGUMENT: ErrorCode
DEADLINE_EXCEEDED: ErrorCode
NOT_FOUND: ErrorCode
ALREADY_EXISTS: ErrorCode
PERMISSION_DENIED: ErrorCode
RESOURCE_EXHAUSTED: ErrorCode
FAILED_PRECONDITION: ErrorCode
ABORTED: ErrorCode
OUT_OF_RANGE: ErrorCode
UNIMPLEMENTED: ErrorCode
INTERNAL: ErrorCode
UNAVAILABLE: ErrorCode
DATA_LOSS: ErrorCode
UNAUTHENTICATED: ErrorCode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "scales", "block_size")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scales: bytes
    block_size: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., block_size: _Optional[int] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("address", "start", "end", "node_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    start: int
    end: int
    node_id: str
    def __init__(self, address: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop_token_ids", "max_new_tokens", "top_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "node_address", "node_id", "step_id", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    node_address: str
    node_id: str
    step_id: int
    retry_after_ms: int
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., node_address: _Optional[str] = ..., node_id: _Optional[str] = ..., step_id: _Optional[int] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "model", "start", "end", "num_layers", "device", "dtype", "max_sessions", "active_sessions", "max_length", "version", "hidden_size", "vocab_size", "address", "stats", "protocol_version", "weight_format", "weight_bytes", "peer_rtt_s")
    class PeerRttSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEER_RTT_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model: str
    start: int
    end: int
    num_layers: int
    device: str
    dtype: str
    max_sessions: int
    active_sessions: int
    max_length: int
    version: str
    hidden_size: int
    vocab_size: int
    address: str
    stats: NodeStats
    protocol_version: int
    weight_format: str
    weight_bytes: int
    peer_rtt_s: _containers.ScalarMap[str, float]
    def __init__(self, node_id: _Optional[str] = ..., model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., num_layers: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., max_sessions: _Optional[int] = ..., active_sessions: _Optional[int] = ..., max_length: _Optional[int] = ..., version: _Optional[str] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., address: _Optional[str] = ..., stats: _Optional[_Union[NodeStats, _Mapping]] = ..., protocol_version: _Optional[int] = ..., weight_format: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., peer_rtt_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("steps", "tokens", "batches", "batched_steps", "max_batch", "queued_steps", "sessions_opened", "sessions_refused")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    QUEUED_STEPS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    steps: int
    tokens: int
    batches: int
    batched_steps: int
    max_batch: int
    queued_steps: int
    sessions_opened: int
    sessions_refused: int
    def __init__(self, steps: _Optional[int] = ..., tokens: _Optional[int] = ..., batches: _Optional[int] = ..., batched_steps: _Optional[int] = ..., max_batch: _Optional[int] = ..., queued_steps: _Optional[int] = ..., sessions_opened: _Optional[int] = ..., sessions_refused: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "max_length", "downstream", "sampling", "wire_dtype", "prompt_length", "start", "end", "resumable", "resume", "protocol_version", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    downstream: _containers.RepeatedCompositeFieldContainer[Hop]
    sampling: SamplingParams
    wire_dtype: str
    prompt_length: int
    start: int
    end: int
    resumable: bool
    resume: bool
    protocol_version: int
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ..., downstream: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., wire_dtype: _Optional[str] = ..., prompt_length: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., resumable: _Optional[bool] = ..., resume: _Optional[bool] = ..., protocol_version: _Optional[int] = ..., capability: _Optional[str] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step_id", "start_pos", "tokens", "hidden", "sample", "return_logits", "replay", "draft", "commits", "sample_all", "next_token")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ALL_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    start_pos: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    sample: bool
    return_logits: bool
    replay: bool
    draft: int
    commits: _containers.RepeatedCompositeFieldContainer[Commitment]
    sample_all: bool
    next_token: int
    def __init__(self, step_id: _Optional[int] = ..., start_pos: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., sample: _Optional[bool] = ..., return_logits: _Optional[bool] = ..., replay: _Optional[bool] = ..., draft: _Optional[int] = ..., commits: _Optional[_Iterable[_Union[Commitment, _Mapping]]] = ..., sample_all: _Optional[bool] = ..., next_token: _Optional[int] = ...) -> None: ...

class Commitment(_message.Message):
    __slots__ = ("node_id", "address", "start", "end", "start_pos", "k", "indices", "values")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    start: int
    end: int
    start_pos: int
    k: int
    indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., start_pos: _Optional[int] = ..., k: _Optional[int] = ..., indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "step", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    close: Close
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "max_length", "kept", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    kept: _containers.RepeatedScalarFieldContainer[int]
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ..., kept: _Optional[_Iterable[int]] = ..., capability: _Optional[str] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("opened", "error")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    error: Error
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("session_id", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., capability: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("session_id", "step_id", "position", "token", "logprob", "top", "finished", "logits", "error", "accepted", "accepted_logprobs", "commits", "sampled", "sampled_logprobs", "given_logprobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GIVEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    position: int
    token: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finished: bool
    logits: Tensor
    error: Error
    accepted: _containers.RepeatedScalarFieldContainer[int]
    accepted_logprobs: _containers.RepeatedScalarFieldContainer[float]
    commits: _containers.RepeatedCompositeFieldContainer[Commitment]
    sampled: _containers.RepeatedScalarFieldContainer[int]
    sampled_logprobs: _containers.RepeatedScalarFieldContainer[float]
    given_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., position: _Optional[int] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., finished: _Optional[bool] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., accepted: _Optional[_Iterable[int]] = ..., accepted_logprobs: _Optional[_Iterable[float]] = ..., commits: _Optional[_Iterable[_Union[Commitment, _Mapping]]] = ..., sampled: _Optional[_Iterable[int]] = ..., sampled_logprobs: _Optional[_Iterable[float]] = ..., given_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("model", "max_length", "exclude_node_ids", "exclude_addresses", "client_rtt_s")
    class ClientRttSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_RTT_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    max_length: int
    exclude_node_ids: _containers.RepeatedScalarFieldContainer[str]
    exclude_addresses: _containers.RepeatedScalarFieldContainer[str]
    client_rtt_s: _containers.ScalarMap[str, float]
    def __init__(self, model: _Optional[str] = ..., max_length: _Optional[int] = ..., exclude_node_ids: _Optional[_Iterable[str]] = ..., exclude_addresses: _Optional[_Iterable[str]] = ..., client_rtt_s: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("hops", "session_id", "num_layers", "expected_step_s")
    HOPS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_S_FIELD_NUMBER: _ClassVar[int]
    hops: _containers.RepeatedCompositeFieldContainer[Hop]
    session_id: str
    num_layers: int
    expected_step_s: float
    def __init__(self, hops: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., session_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., expected_step_s: _Optional[float] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("node_id", "address", "session_id", "code", "message", "recovered", "stall_s", "detect_s", "reroute_s", "replay_s", "replayed_tokens", "history_tokens", "mode", "evidence")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    STALL_S_FIELD_NUMBER: _ClassVar[int]
    DETECT_S_FIELD_NUMBER: _ClassVar[int]
    REROUTE_S_FIELD_NUMBER: _ClassVar[int]
    REPLAY_S_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    session_id: str
    code: ErrorCode
    message: str
    recovered: bool
    stall_s: float
    detect_s: float
    reroute_s: float
    replay_s: float
    replayed_tokens: int
    history_tokens: int
    mode: str
    evidence: Evidence
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., session_id: _Optional[str] = ..., code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., recovered: _Optional[bool] = ..., stall_s: _Optional[float] = ..., detect_s: _Optional[float] = ..., reroute_s: _Optional[float] = ..., replay_s: _Optional[float] = ..., replayed_tokens: _Optional[int] = ..., history_tokens: _Optional[int] = ..., mode: _Optional[str] = ..., evidence: _Optional[_Union[Evidence, _Mapping]] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("position", "start", "end", "detail", "claimed", "recomputed", "witnesses")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    WITNESSES_FIELD_NUMBER: _ClassVar[int]
    position: int
    start: int
    end: int
    detail: str
    claimed: _containers.RepeatedScalarFieldContainer[float]
    recomputed: _containers.RepeatedScalarFieldContainer[float]
    witnesses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, position: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., detail: _Optional[str] = ..., claimed: _Optional[_Iterable[float]] = ..., recomputed: _Optional[_Iterable[float]] = ..., witnesses: _Optional[_Iterable[str]] = ...) -> None: ...

class FailureAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class NodeList(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class SwarmInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SwarmInfo(_message.Message):
    __slots__ = ("swarm_id", "mqtt_url", "model", "num_layers", "version", "coordinator_key")
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    MQTT_URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    swarm_id: str
    mqtt_url: str
    model: str
    num_layers: int
    version: str
    coordinator_key: bytes
    def __init__(self, swarm_id: _Optional[str] = ..., mqtt_url: _Optional[str] = ..., model: _Optional[str] = ..., num_layers: _Optional[int] = ..., version: _Optional[str] = ..., coordinator_key: _Optional[bytes] = ...) -> None: ...
