"""
The piece protocol's frame format and its incremental decoder.
"""

import contextlib
import itertools
import struct

import pytest
from helpers import DETERMINISTIC, coalesce, frames
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly import wire
from dragonfly.wire import (
    HEADER,
    MAX_CONTROL_LENGTH,
    MAX_ERROR_MESSAGE,
    MAX_ID_LENGTH,
    MAX_PIECE_LENGTH,
    Cancel,
    Decoder,
    Error,
    GetPiece,
    Hello,
    MessageType,
    PayloadChunk,
    PayloadEnd,
    PieceHeader,
    ProtocolViolation,
)

U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)
# At most 63 characters is at most 252 UTF-8 bytes: always fits a HELLO field.
short_text = st.text(max_size=63)
task_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)

hellos = st.builds(Hello, U16, short_text, short_text)
get_pieces = st.builds(GetPiece, U32, task_ids, U32)
piece_headers = st.builds(PieceHeader, U32, U32, st.integers(0, MAX_PIECE_LENGTH))
errors = st.builds(Error, U32, U16, st.text(max_size=256))
cancels = st.builds(Cancel, U32)
control_messages = st.one_of(hellos, get_pieces, errors, cancels)


@st.composite
def pieces_with_payload(draw: st.DrawFn) -> tuple[PieceHeader, bytes]:
    payload = draw(st.binary(max_size=300))
    header = PieceHeader(draw(U32), draw(U32), len(payload))
    return header, payload


def expected_events(item: object) -> list[wire.Event]:
    if isinstance(item, tuple):
        header, payload = item
        chunk = [PayloadChunk(header.request_id, payload)] if payload else []
        return [header, *chunk, PayloadEnd(header.request_id)]
    return [item]  # type: ignore[list-item]


def serialize(item: object) -> bytes:
    if isinstance(item, tuple):
        header, payload = item
        return wire.encode(header) + payload
    return wire.encode(item)  # type: ignore[arg-type]


stream_items = st.lists(
    st.one_of(control_messages, pieces_with_payload()), min_size=1, max_size=8
)


def feed_in_parts(data: bytes, cuts: list[int]) -> list[wire.Event]:
    decoder = Decoder()
    events: list[wire.Event] = []
    bounds = [0, *sorted(cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        events += decoder.feed(data[start:end])
    assert not decoder.in_payload
    return events


def raw_frame(
    kind: int, payload: bytes, request_id: int = 0, flags: int = 0, reserved: int = 0
) -> bytes:
    return HEADER.pack(kind, flags, reserved, request_id, len(payload)) + payload


# Round trips -----------------------------------------------------------------


@DETERMINISTIC
@given(control_messages)
def test_control_messages_round_trip(message: wire.Message) -> None:
    """
    Every control message decodes to an equal message, alone, from its frame.
    """
    assert Decoder().feed(wire.encode(message)) == [message]


@DETERMINISTIC
@given(piece_headers)
def test_piece_header_round_trips_and_announces_payload(header: PieceHeader) -> None:
    """
    A PIECE header decodes to itself; the decoder then expects exactly
    C{length} payload bytes (or reports the empty payload as ended at once).
    """
    decoder = Decoder()
    events = decoder.feed(wire.encode(header))
    if header.length == 0:
        assert events == [header, PayloadEnd(header.request_id)]
        assert not decoder.in_payload
    else:
        assert events == [header]
        assert decoder.in_payload


@DETERMINISTIC
@given(pieces_with_payload())
def test_piece_with_payload_round_trips(item: tuple[PieceHeader, bytes]) -> None:
    """
    A PIECE header followed by its raw bytes decodes to the header, the
    bytes and the end of the payload.
    """
    header, payload = item
    events = Decoder().feed(wire.encode(header) + payload)
    assert events == expected_events(item)


@DETERMINISTIC
@given(stream_items)
def test_stream_fed_one_byte_at_a_time(items: list[object]) -> None:
    """
    A stream of several frames decodes to the same events when it arrives
    one byte per read; payload chunks are never empty.
    """
    data = b"".join(serialize(i) for i in items)
    events = feed_in_parts(data, list(range(1, len(data))))
    assert all(not (isinstance(e, PayloadChunk) and not e.data) for e in events)
    assert coalesce(events) == [e for i in items for e in expected_events(i)]


@DETERMINISTIC
@given(stream_items, st.data())
def test_stream_fed_in_random_splits(items: list[object], data: st.DataObject) -> None:
    """
    However the stream is split into reads, the events are the same (payload
    chunks follow the reads, and concatenate to the payload).
    """
    raw = b"".join(serialize(i) for i in items)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    events = feed_in_parts(raw, cuts)
    assert all(not (isinstance(e, PayloadChunk) and not e.data) for e in events)
    assert coalesce(events) == [e for i in items for e in expected_events(i)]


def test_payload_that_is_the_whole_read_is_passed_on_in_one_chunk() -> None:
    """
    In the middle of a payload, a read that is all payload comes out as one
    chunk, and the decoder counts it against the announced length.
    """
    decoder = Decoder()
    decoder.feed(wire.encode(PieceHeader(7, 1, 10)))
    assert decoder.feed(b"abcd") == [PayloadChunk(7, b"abcd")]
    assert decoder.in_payload
    assert decoder.feed(b"efghij" + wire.encode(Cancel(8))) == [
        PayloadChunk(7, b"efghij"),
        PayloadEnd(7),
        Cancel(8),
    ]
    assert not decoder.in_payload


def test_incomplete_frame_yields_nothing_until_complete() -> None:
    """
    A partial control frame is buffered, not reported or rejected.
    """
    frame = wire.encode(GetPiece(3, "11" * 32, 9))
    decoder = Decoder()
    assert decoder.feed(frame[:5]) == []
    assert decoder.feed(frame[5:-1]) == []
    assert decoder.feed(frame[-1:]) == [GetPiece(3, "11" * 32, 9)]


def test_error_code_is_an_integer_on_the_wire() -> None:
    """
    Error codes travel as numbers that compare equal to L{ErrorCode}s.
    """
    (event,) = Decoder().feed(wire.encode(Error(5, wire.ErrorCode.BUSY, "later")))
    assert event == Error(5, 3, "later")
    assert isinstance(event, Error)
    assert event.code == wire.ErrorCode.BUSY


def test_largest_fields_fit() -> None:
    """
    Fields at their documented maxima encode and decode.
    """
    hello = Hello(2**16 - 1, "p" * MAX_ID_LENGTH, "a" * MAX_ID_LENGTH)
    error = Error(2**32 - 1, 2**16 - 1, "e" * MAX_ERROR_MESSAGE)
    header = PieceHeader(2**32 - 1, 2**32 - 1, MAX_PIECE_LENGTH)
    assert Decoder().feed(frames(hello, error, header)) == [hello, error, header]


# Violations -------------------------------------------------------------------


def assert_violation(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        Decoder().feed(data)
    # ... and also when the bytes come one at a time.
    decoder = Decoder()
    with pytest.raises(ProtocolViolation):
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])


@pytest.mark.parametrize("kind", list(MessageType))
def test_oversize_control_frame_is_rejected_from_its_header(kind: int) -> None:
    """
    A frame announcing more than MAX_CONTROL_LENGTH bytes is refused as soon
    as its header arrives, before any payload is buffered.
    """
    assert_violation(HEADER.pack(kind, 0, 0, 1, MAX_CONTROL_LENGTH + 1))
    assert_violation(HEADER.pack(kind, 0, 0, 1, 2**32 - 1))


def test_control_frame_of_max_length_is_buffered() -> None:
    """
    The limit is inclusive: a MAX_CONTROL_LENGTH frame is awaited, not refused.
    """
    decoder = Decoder()
    assert (
        decoder.feed(HEADER.pack(MessageType.ERROR, 0, 0, 1, MAX_CONTROL_LENGTH)) == []
    )


@DETERMINISTIC
@given(st.integers(0, 255).filter(lambda k: k not in set(MessageType)))
def test_unknown_frame_type_is_rejected(kind: int) -> None:
    """
    Types other than 1..5 end the connection, even with an empty payload.
    """
    assert_violation(raw_frame(kind, b""))


@pytest.mark.parametrize(
    ("flags", "reserved"), [(1, 0), (0x80, 0), (0, 1), (0, 0x8000)]
)
def test_reserved_header_bits_are_rejected(flags: int, reserved: int) -> None:
    """
    Non-zero flags or reserved bits are a violation.
    """
    assert_violation(raw_frame(MessageType.CANCEL, b"", 1, flags, reserved))


def hello_payload(
    magic: bytes = wire.MAGIC, version: int = 1, fields: bytes = b"\x01p\x01a"
) -> bytes:
    return struct.pack(">4sH", magic, version) + fields


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(hello_payload(magic=b"HTTP"), id="bad-magic"),
        pytest.param(hello_payload(magic=b"dfly"), id="bad-magic-case"),
        pytest.param(b"DFLY", id="too-short"),
        pytest.param(hello_payload(fields=b""), id="no-fields"),
        pytest.param(hello_payload(fields=b"\x05pe"), id="peer-id-truncated"),
        pytest.param(hello_payload(fields=b"\x01p"), id="address-missing"),
        pytest.param(hello_payload(fields=b"\x01p\x03ad"), id="address-truncated"),
        pytest.param(hello_payload(fields=b"\x01p\x01a!"), id="trailing-byte"),
        pytest.param(hello_payload(fields=b"\x01\xff\x01a"), id="peer-id-not-utf8"),
        pytest.param(hello_payload(fields=b"\x01p\x02\xc3("), id="address-not-utf8"),
    ],
)
def test_malformed_hello_is_rejected(payload: bytes) -> None:
    """
    A HELLO with the wrong magic, truncated or non-UTF-8 fields, or bytes
    after its fields, is a violation.
    """
    assert_violation(raw_frame(MessageType.HELLO, payload))


def test_valid_hand_built_hello_decodes() -> None:
    """
    The hand-built HELLO used by the violation tests is valid when intact.
    """
    assert Decoder().feed(raw_frame(MessageType.HELLO, hello_payload())) == [
        Hello(1, "p", "a")
    ]


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        pytest.param(MessageType.GET_PIECE, b"\0" * 35, id="get-piece-short"),
        pytest.param(MessageType.GET_PIECE, b"\0" * 37, id="get-piece-long"),
        pytest.param(MessageType.PIECE, b"\0" * 7, id="piece-short"),
        pytest.param(MessageType.PIECE, b"\0" * 9, id="piece-long"),
        pytest.param(MessageType.ERROR, b"\0\1\0", id="error-short"),
        pytest.param(MessageType.ERROR, b"\0\1\0\5abc", id="error-truncated"),
        pytest.param(MessageType.ERROR, b"\0\1\0\1ab", id="error-trailing"),
        pytest.param(
            MessageType.ERROR,
            struct.pack(">HH", 1, MAX_ERROR_MESSAGE + 1)
            + b"x" * (MAX_ERROR_MESSAGE + 1),
            id="error-message-too-long",
        ),
        pytest.param(MessageType.CANCEL, b"\0", id="cancel-with-payload"),
    ],
)
def test_malformed_control_payloads_are_rejected(kind: int, payload: bytes) -> None:
    """
    Control payloads of the wrong size for their type are violations.
    """
    assert_violation(raw_frame(kind, payload, request_id=1))


@pytest.mark.parametrize("length", [MAX_PIECE_LENGTH + 1, 2**32 - 1])
def test_piece_longer_than_max_piece_length_is_rejected(length: int) -> None:
    """
    A PIECE announcing more than MAX_PIECE_LENGTH bytes is refused.
    """
    assert_violation(raw_frame(MessageType.PIECE, struct.pack(">II", 0, length), 1))


def test_violation_after_valid_frames_in_same_read() -> None:
    """
    Valid frames before a bad one in the same read do not hide the violation.
    """
    assert_violation(frames(Cancel(1), Cancel(2)) + raw_frame(9, b""))


def test_http_request_is_a_violation() -> None:
    """
    Someone speaking HTTP to the piece port is rejected at the first header.
    """
    assert_violation(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


@settings(DETERMINISTIC, max_examples=300)
@given(st.binary(max_size=200), st.data())
def test_garbage_decodes_or_raises_protocol_violation(
    data: bytes, draw: st.DataObject
) -> None:
    """
    Arbitrary bytes, however split, either decode or raise ProtocolViolation;
    never any other exception.
    """
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    decoder = Decoder()
    bounds = [0, *cuts, len(data)]
    try:
        for start, end in itertools.pairwise(bounds):
            decoder.feed(data[start:end])
    except ProtocolViolation:
        pass


@settings(DETERMINISTIC, max_examples=300)
@given(
    st.sampled_from(list(MessageType)),
    U32,
    st.binary(max_size=80),
)
def test_garbage_payload_of_valid_header_decodes_or_violates(
    kind: int, request_id: int, payload: bytes
) -> None:
    """
    Well-framed but arbitrary payloads reach the message parsers, which
    either accept them or raise ProtocolViolation.
    """
    with contextlib.suppress(ProtocolViolation):
        Decoder().feed(raw_frame(kind, payload, request_id))


# Encoding limits ---------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(Hello(1, "p" * (MAX_ID_LENGTH + 1), "a"), id="peer-id-too-long"),
        pytest.param(Hello(1, "é" * 128, "a"), id="peer-id-too-long-in-bytes"),
        pytest.param(Hello(1, "p", "a" * (MAX_ID_LENGTH + 1)), id="address-too-long"),
        pytest.param(GetPiece(1, "ab" * 31, 0), id="task-id-too-short"),
        pytest.param(GetPiece(1, "ab" * 33, 0), id="task-id-too-long"),
        pytest.param(GetPiece(1, "zz" * 32, 0), id="task-id-not-hex"),
        pytest.param(PieceHeader(1, 0, MAX_PIECE_LENGTH + 1), id="piece-too-long"),
        pytest.param(PieceHeader(1, 0, -1), id="piece-length-negative"),
        pytest.param(Error(1, 1, "x" * (MAX_ERROR_MESSAGE + 1)), id="message-too-long"),
    ],
)
def test_encode_rejects_fields_that_do_not_fit(message: wire.Message) -> None:
    """
    Text and length fields too large for the wire raise ValueError.
    """
    with pytest.raises(ValueError):
        wire.encode(message)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(Hello(2**16, "p", "a"), id="version"),
        pytest.param(Hello(-1, "p", "a"), id="version-negative"),
        pytest.param(GetPiece(2**32, "ab" * 32, 0), id="request-id"),
        pytest.param(GetPiece(1, "ab" * 32, 2**32), id="piece-number"),
        pytest.param(PieceHeader(1, -1, 0), id="piece-negative"),
        pytest.param(Error(1, 2**16, "x"), id="error-code"),
        pytest.param(Cancel(-1), id="cancel-request-id"),
    ],
)
def test_encode_rejects_out_of_range_integers_with_value_error(
    message: wire.Message,
) -> None:
    """
    Integer fields that do not fit their u16/u32 wire slot raise ValueError
    ("@raise ValueError: if a field does not fit its wire representation").
    """
    with pytest.raises(ValueError):
        wire.encode(message)


def test_encode_rejects_non_messages() -> None:
    """
    Only protocol messages are encoded.
    """
    with pytest.raises(TypeError):
        wire.encode(PayloadEnd(1))  # type: ignore[arg-type]
