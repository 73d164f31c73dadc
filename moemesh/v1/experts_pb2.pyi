from moemesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayerWork(_message.Message):
    __slots__ = ("step", "layer", "sequence", "hidden", "expert_ids", "weights")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    layer: int
    sequence: int
    hidden: _common_pb2.Tensor
    expert_ids: _common_pb2.Tensor
    weights: _common_pb2.Tensor
    def __init__(self, step: _Optional[int] = ..., layer: _Optional[int] = ..., sequence: _Optional[int] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class LayerResult(_message.Message):
    __slots__ = ("step", "layer", "sequence", "partial", "compute_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    layer: int
    sequence: int
    partial: _common_pb2.Tensor
    compute_seconds: float
    def __init__(self, step: _Optional[int] = ..., layer: _Optional[int] = ..., sequence: _Optional[int] = ..., partial: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class DescribeShardRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("model_id", "revision", "rank", "world_size", "placement", "device", "dtype", "loaded_tensors", "loaded_bytes", "resident_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOADED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    rank: int
    world_size: int
    placement: str
    device: str
    dtype: str
    loaded_tensors: _containers.RepeatedScalarFieldContainer[str]
    loaded_bytes: int
    resident_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., placement: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., loaded_tensors: _Optional[_Iterable[str]] = ..., loaded_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ...) -> None: ...
