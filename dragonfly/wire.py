"""
The piece protocol's wire format: frames, messages and an incremental decoder.

Everything here is pure (no I/O) so that it can be fed one byte at a time in
tests.  L{dragonfly.piece_protocol} puts it on a transport.

Design
======
  - Every frame starts with a fixed 12-byte header: type (u8), flags (u8, 0),
    reserved (u16, 0), request id (u32) and payload length (u32), big-endian.
  - Control payloads are small and bounded by L{MAX_CONTROL_LENGTH}; a longer
    length, an unknown type or non-zero reserved bits end the connection.
  - A piece is never one big frame.  A C{PIECE} frame announces C{length}
    bytes which follow it raw on the stream, so the receiver can stream them
    to disk and the sender can produce them in chunks under backpressure.
    C{length} is bounded by L{MAX_PIECE_LENGTH}.
  - The first frame in each direction is C{HELLO}, carrying a magic number,
    the protocol version, the sender's peer id and its advertised address.
  - Requests may be pipelined; responses come back in request order, each
    naming the request id it answers.

The full specification, precise enough for another implementation, is
C{docs/protocol.md}.
"""

import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"DFLY"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">BBHII")
MAX_CONTROL_LENGTH = 4096
MAX_PIECE_LENGTH = 64 << 20
MAX_ID_LENGTH = 255
MAX_ERROR_MESSAGE = 1024

_HELLO = struct.Struct(">4sH")
_GET_PIECE = struct.Struct(">32sI")
_PIECE = struct.Struct(">II")
_ERROR = struct.Struct(">HH")


class MessageType(IntEnum):
    HELLO = 1
    GET_PIECE = 2
    PIECE = 3
    ERROR = 4
    CANCEL = 5


class ErrorCode(IntEnum):
    """
    Why a request was refused.  Codes are stable: they are on the wire.
    """

    UNKNOWN_TASK = 1
    PIECE_NOT_HELD = 2
    BUSY = 3
    BAD_REQUEST = 4
    UNSUPPORTED_VERSION = 5
    INTERNAL = 6
    SHUTTING_DOWN = 7
    CANCELLED = 8


class ProtocolViolation(Exception):
    """
    The peer sent bytes that are not a valid frame; the connection must end.
    """


@dataclass(frozen=True)
class Hello:
    version: int
    peer_id: str
    address: str


@dataclass(frozen=True)
class GetPiece:
    request_id: int
    task_id: str
    piece: int


@dataclass(frozen=True)
class PieceHeader:
    """
    Announces C{length} raw payload bytes that follow on the stream.
    """

    request_id: int
    piece: int
    length: int


@dataclass(frozen=True)
class Error:
    request_id: int
    code: int
    message: str


@dataclass(frozen=True)
class Cancel:
    request_id: int


@dataclass(frozen=True)
class PayloadChunk:
    """
    Some of the payload bytes announced by the last L{PieceHeader}.
    """

    request_id: int
    data: bytes


@dataclass(frozen=True)
class PayloadEnd:
    request_id: int


Message = Hello | GetPiece | PieceHeader | Error | Cancel
Event = Message | PayloadChunk | PayloadEnd


def _short_text(text: str, limit: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"{what} is longer than {limit} bytes")
    return raw


def _frame(kind: MessageType, request_id: int, payload: bytes) -> bytes:
    return HEADER.pack(kind, 0, 0, request_id, len(payload)) + payload


def encode(message: Message) -> bytes:
    """
    Serialize one message into a frame.

    @raise ValueError: if a field does not fit its wire representation.
    """
    try:
        return _encode(message)
    except struct.error as e:
        raise ValueError(f"{message!r} does not fit the wire format: {e}") from e


def _encode(message: Message) -> bytes:
    match message:
        case Hello(version, peer_id, address):
            pid = _short_text(peer_id, MAX_ID_LENGTH, "peer id")
            addr = _short_text(address, MAX_ID_LENGTH, "address")
            payload = (
                _HELLO.pack(MAGIC, version)
                + bytes([len(pid)])
                + pid
                + bytes([len(addr)])
                + addr
            )
            return _frame(MessageType.HELLO, 0, payload)
        case GetPiece(request_id, task_id, piece):
            raw_id = bytes.fromhex(task_id)
            if len(raw_id) != 32:
                raise ValueError("task id must be 32 bytes")
            return _frame(
                MessageType.GET_PIECE, request_id, _GET_PIECE.pack(raw_id, piece)
            )
        case PieceHeader(request_id, piece, length):
            if not 0 <= length <= MAX_PIECE_LENGTH:
                raise ValueError(f"piece length {length} out of range")
            return _frame(MessageType.PIECE, request_id, _PIECE.pack(piece, length))
        case Error(request_id, code, text):
            raw = _short_text(text, MAX_ERROR_MESSAGE, "error message")
            return _frame(
                MessageType.ERROR, request_id, _ERROR.pack(code, len(raw)) + raw
            )
        case Cancel(request_id):
            return _frame(MessageType.CANCEL, request_id, b"")
    raise TypeError(f"not a message: {message!r}")


def _decode_hello(payload: bytes) -> Hello:
    if len(payload) < _HELLO.size + 2:
        raise ProtocolViolation("HELLO too short")
    magic, version = _HELLO.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolViolation("not a Dragonfly piece connection (bad magic)")
    pos = _HELLO.size
    fields = []
    for _ in range(2):
        if pos >= len(payload):
            raise ProtocolViolation("HELLO truncated")
        size = payload[pos]
        raw = payload[pos + 1 : pos + 1 + size]
        if len(raw) != size:
            raise ProtocolViolation("HELLO truncated")
        try:
            fields.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ProtocolViolation("HELLO field is not UTF-8") from e
        pos += 1 + size
    if pos != len(payload):
        raise ProtocolViolation("HELLO has trailing bytes")
    return Hello(version, fields[0], fields[1])


def _decode_error(request_id: int, payload: bytes) -> Error:
    if len(payload) < _ERROR.size:
        raise ProtocolViolation("ERROR too short")
    code, size = _ERROR.unpack_from(payload)
    raw = payload[_ERROR.size :]
    if len(raw) != size or size > MAX_ERROR_MESSAGE:
        raise ProtocolViolation("ERROR message length mismatch")
    return Error(request_id, code, raw.decode("utf-8", errors="replace"))


def decode_control(kind: int, request_id: int, payload: bytes) -> Message:
    """
    Decode the payload of one control frame.

    @raise ProtocolViolation: if it is not a valid message.
    """
    if kind == MessageType.HELLO:
        return _decode_hello(payload)
    if kind == MessageType.GET_PIECE:
        if len(payload) != _GET_PIECE.size:
            raise ProtocolViolation("GET_PIECE has the wrong length")
        raw_id, piece = _GET_PIECE.unpack(payload)
        return GetPiece(request_id, raw_id.hex(), piece)
    if kind == MessageType.PIECE:
        if len(payload) != _PIECE.size:
            raise ProtocolViolation("PIECE has the wrong length")
        piece, length = _PIECE.unpack(payload)
        if length > MAX_PIECE_LENGTH:
            raise ProtocolViolation(f"piece payload of {length} bytes is too large")
        return PieceHeader(request_id, piece, length)
    if kind == MessageType.ERROR:
        return _decode_error(request_id, payload)
    if kind == MessageType.CANCEL:
        if payload:
            raise ProtocolViolation("CANCEL carries no payload")
        return Cancel(request_id)
    raise ProtocolViolation(f"unknown frame type {kind}")


class Decoder:
    """
    Turns a byte stream into L{Event}s, in order, however it is split.

    Control frames are buffered (they are at most L{MAX_CONTROL_LENGTH}
    bytes); piece payloads are passed on in the chunks they arrive in.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._payload_left = 0
        self._payload_request = 0

    @property
    def in_payload(self) -> bool:
        """
        Whether the decoder is in the middle of a piece payload.
        """
        return self._payload_left > 0

    def feed(self, data: bytes) -> list[Event]:
        """
        Consume C{data} and return the events it completes.

        @raise ProtocolViolation: on the first invalid frame; the decoder
            must not be used after that.
        """
        events: list[Event] = []
        if 0 < len(data) < self._payload_left:
            # The common case at full speed: the whole read is payload, and
            # passing it on as it is saves a copy.
            self._payload_left -= len(data)
            return [PayloadChunk(self._payload_request, data)]
        view = memoryview(data)
        while view:
            if self._payload_left:
                take = min(self._payload_left, len(view))
                events.append(PayloadChunk(self._payload_request, bytes(view[:take])))
                view = view[take:]
                self._payload_left -= take
                if not self._payload_left:
                    events.append(PayloadEnd(self._payload_request))
                continue
            self._buffer += view
            view = memoryview(b"")
            view = self._drain_frames(events)
        return events

    def _drain_frames(self, events: list[Event]) -> memoryview:
        """
        Decode the complete control frames in the buffer; return the bytes
        that follow a C{PIECE} header, which are payload.
        """
        while len(self._buffer) >= HEADER.size:
            kind, flags, reserved, request_id, length = HEADER.unpack_from(self._buffer)
            if kind not in MessageType.__members__.values():
                raise ProtocolViolation(f"unknown frame type {kind}")
            if flags or reserved:
                raise ProtocolViolation("reserved header bits are set")
            if length > MAX_CONTROL_LENGTH:
                raise ProtocolViolation(
                    f"frame of {length} bytes exceeds {MAX_CONTROL_LENGTH}"
                )
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            message = decode_control(kind, request_id, payload)
            events.append(message)
            if isinstance(message, PieceHeader):
                if message.length == 0:
                    events.append(PayloadEnd(request_id))
                    continue
                self._payload_left = message.length
                self._payload_request = request_id
                rest = memoryview(bytes(self._buffer))
                self._buffer.clear()
                return rest
        return memoryview(b"")
