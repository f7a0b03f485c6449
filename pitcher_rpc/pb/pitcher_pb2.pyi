from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    PROTOCOL_ERROR: _ClassVar[ErrorCode]
    FRAME_TOO_LARGE: _ClassVar[ErrorCode]
    TOO_MANY_IN_FLIGHT: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    DEADLINE_EXCEEDED: _ClassVar[ErrorCode]
    UNAVAILABLE: _ClassVar[ErrorCode]
    BAD_PAYLOAD: _ClassVar[ErrorCode]
    FLOW_CONTROL: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
PROTOCOL_ERROR: ErrorCode
FRAME_TOO_LARGE: ErrorCode
TOO_MANY_IN_FLIGHT: ErrorCode
INTERNAL: ErrorCode
DEADLINE_EXCEEDED: ErrorCode
UNAVAILABLE: ErrorCode
BAD_PAYLOAD: ErrorCode
FLOW_CONTROL: ErrorCode

class Request(_message.Message):
    __slots__ = ("method", "path", "query", "header_names", "header_values", "body", "route", "client", "body_size")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    HEADER_NAMES_FIELD_NUMBER: _ClassVar[int]
    HEADER_VALUES_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    BODY_SIZE_FIELD_NUMBER: _ClassVar[int]
    method: bytes
    path: bytes
    query: bytes
    header_names: _containers.RepeatedScalarFieldContainer[bytes]
    header_values: _containers.RepeatedScalarFieldContainer[bytes]
    body: bytes
    route: str
    client: str
    body_size: int
    def __init__(self, method: _Optional[bytes] = ..., path: _Optional[bytes] = ..., query: _Optional[bytes] = ..., header_names: _Optional[_Iterable[bytes]] = ..., header_values: _Optional[_Iterable[bytes]] = ..., body: _Optional[bytes] = ..., route: _Optional[str] = ..., client: _Optional[str] = ..., body_size: _Optional[int] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("status", "header_names", "header_values", "body", "body_size")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADER_NAMES_FIELD_NUMBER: _ClassVar[int]
    HEADER_VALUES_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    BODY_SIZE_FIELD_NUMBER: _ClassVar[int]
    status: int
    header_names: _containers.RepeatedScalarFieldContainer[bytes]
    header_values: _containers.RepeatedScalarFieldContainer[bytes]
    body: bytes
    body_size: int
    def __init__(self, status: _Optional[int] = ..., header_names: _Optional[_Iterable[bytes]] = ..., header_values: _Optional[_Iterable[bytes]] = ..., body: _Optional[bytes] = ..., body_size: _Optional[int] = ...) -> None: ...

class Settings(_message.Message):
    __slots__ = ("max_frame_size", "max_in_flight", "initial_window")
    MAX_FRAME_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_WINDOW_FIELD_NUMBER: _ClassVar[int]
    max_frame_size: int
    max_in_flight: int
    initial_window: int
    def __init__(self, max_frame_size: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., initial_window: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class GoAway(_message.Message):
    __slots__ = ("last_request_id", "reason")
    LAST_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    last_request_id: int
    reason: str
    def __init__(self, last_request_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
