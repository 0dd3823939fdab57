from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BATCH: Priority

class QuotaLimits(_message.Message):
    __slots__ = ("max_concurrent", "max_queued", "tokens_per_minute", "burst_tokens", "weight", "priority")
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    BURST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    max_concurrent: int
    max_queued: int
    tokens_per_minute: int
    burst_tokens: int
    weight: float
    priority: Priority
    def __init__(self, max_concurrent: _Optional[int] = ..., max_queued: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., burst_tokens: _Optional[int] = ..., weight: _Optional[float] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class QuotaStatus(_message.Message):
    __slots__ = ("name", "limits", "in_flight", "queued", "served_tokens", "bucket_tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    SERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    limits: QuotaLimits
    in_flight: int
    queued: int
    served_tokens: int
    bucket_tokens: float
    def __init__(self, name: _Optional[str] = ..., limits: _Optional[_Union[QuotaLimits, _Mapping]] = ..., in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., served_tokens: _Optional[int] = ..., bucket_tokens: _Optional[float] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadQuotasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "adapters")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[QuotaStatus]
    adapters: _containers.RepeatedCompositeFieldContainer[QuotaStatus]
    def __init__(self, tenants: _Optional[_Iterable[_Union[QuotaStatus, _Mapping]]] = ..., adapters: _Optional[_Iterable[_Union[QuotaStatus, _Mapping]]] = ...) -> None: ...
