from moemesh.v1 import models_pb2 as _models_pb2
from moemesh.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capacity(_message.Message):
    __slots__ = ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "block_size")
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_num_seqs: int
    max_num_batched_tokens: int
    num_kv_blocks: int
    block_size: int
    def __init__(self, max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "address", "models", "replica_group", "rank", "world_size", "device", "capacity", "placement", "held_experts")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    HELD_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    models: _containers.RepeatedCompositeFieldContainer[_models_pb2.ModelInfo]
    replica_group: str
    rank: int
    world_size: int
    device: str
    capacity: Capacity
    placement: str
    held_experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_models_pb2.ModelInfo, _Mapping]]] = ..., replica_group: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., device: _Optional[str] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., placement: _Optional[str] = ..., held_experts: _Optional[_Iterable[int]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("lease_id", "heartbeat_interval", "max_missed_heartbeats")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MAX_MISSED_HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    heartbeat_interval: float
    max_missed_heartbeats: int
    def __init__(self, lease_id: _Optional[str] = ..., heartbeat_interval: _Optional[float] = ..., max_missed_heartbeats: _Optional[int] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("running_seqs", "waiting_seqs", "free_kv_blocks", "steps_per_second", "seconds_since_progress", "expert_load", "draining")
    RUNNING_SEQS_FIELD_NUMBER: _ClassVar[int]
    WAITING_SEQS_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    running_seqs: int
    waiting_seqs: int
    free_kv_blocks: int
    steps_per_second: float
    seconds_since_progress: float
    expert_load: _containers.RepeatedScalarFieldContainer[int]
    draining: bool
    def __init__(self, running_seqs: _Optional[int] = ..., waiting_seqs: _Optional[int] = ..., free_kv_blocks: _Optional[int] = ..., steps_per_second: _Optional[float] = ..., seconds_since_progress: _Optional[float] = ..., expert_load: _Optional[_Iterable[int]] = ..., draining: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "lease_id", "load")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    lease_id: str
    load: NodeLoad
    def __init__(self, node_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("command",)
    class Command(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COMMAND_NONE: _ClassVar[HeartbeatReply.Command]
        COMMAND_REREGISTER: _ClassVar[HeartbeatReply.Command]
        COMMAND_DRAIN: _ClassVar[HeartbeatReply.Command]
    COMMAND_NONE: HeartbeatReply.Command
    COMMAND_REREGISTER: HeartbeatReply.Command
    COMMAND_DRAIN: HeartbeatReply.Command
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    command: HeartbeatReply.Command
    def __init__(self, command: _Optional[_Union[HeartbeatReply.Command, str]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("node_id", "lease_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    lease_id: str
    def __init__(self, node_id: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "state", "replica_group", "rank", "world_size", "model_ids", "load", "heartbeat_age", "routed_requests", "in_flight", "device", "placement", "held_experts", "routable")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_GROUP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_FIELD_NUMBER: _ClassVar[int]
    ROUTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    HELD_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ROUTABLE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: str
    replica_group: str
    rank: int
    world_size: int
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    load: NodeLoad
    heartbeat_age: float
    routed_requests: int
    in_flight: int
    device: str
    placement: str
    held_experts: _containers.RepeatedScalarFieldContainer[int]
    routable: bool
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., replica_group: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., model_ids: _Optional[_Iterable[str]] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., heartbeat_age: _Optional[float] = ..., routed_requests: _Optional[int] = ..., in_flight: _Optional[int] = ..., device: _Optional[str] = ..., placement: _Optional[str] = ..., held_experts: _Optional[_Iterable[int]] = ..., routable: _Optional[bool] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...
