"""
Task identity and piece geometry.
"""

import pytest
from helpers import DETERMINISTIC
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.tasks import (
    MIB,
    InvalidRequest,
    check_digest,
    check_task_id,
    check_url,
    normalize_url,
    piece_bounds,
    piece_count,
    piece_size_for,
    task_id_for,
)

URL = "https://registry.example/v2/lib/blobs/file.tar?expires=100&sig=abc&keep=1"
DIGEST = "sha256:" + "0123456789abcdef" * 4


# Task ids ---------------------------------------------------------------------


def test_task_id_is_sha256_hex() -> None:
    """
    A task id is 64 lowercase hex digits, valid as a task id.
    """
    task_id = task_id_for("http://example.com/file")
    assert check_task_id(task_id) == task_id
    assert task_id == task_id_for("http://example.com/file")
    assert task_id != task_id_for("http://example.com/other")


def test_filters_drop_query_parameters() -> None:
    """
    URLs differing only in filtered query parameters (signatures, expiry)
    are one task; unfiltered parameters still tell tasks apart.
    """
    other_signature = URL.replace("sig=abc", "sig=xyz").replace(
        "expires=100", "expires=7"
    )
    assert task_id_for(URL, ["sig", "expires"]) == task_id_for(
        other_signature, ["sig", "expires"]
    )
    assert task_id_for(URL) != task_id_for(other_signature)
    assert task_id_for(URL, ["sig", "expires"]) != task_id_for(
        URL.replace("keep=1", "keep=2"), ["sig", "expires"]
    )


def test_filtered_url_equals_url_without_those_parameters() -> None:
    """
    Filtering a parameter is the same as the URL never having had it; the
    fragment never matters.
    """
    assert task_id_for(URL, ["sig", "expires"]) == task_id_for(
        "https://registry.example/v2/lib/blobs/file.tar?keep=1#part"
    )
    assert (
        normalize_url(URL, ["sig", "expires"])
        == "https://registry.example/v2/lib/blobs/file.tar?keep=1"
    )


def test_digest_identified_tasks_ignore_the_url() -> None:
    """
    With a digest, the task id depends on the digest alone: mirrors of one
    layer are one task, and the identifier is irrelevant.
    """
    a = task_id_for("https://mirror-a.example/blob", digest=DIGEST)
    b = task_id_for("https://mirror-b.example/other", digest=DIGEST, identifier="x")
    assert a == b
    assert a != task_id_for("https://mirror-a.example/blob")
    other_digest = "sha256:" + "f" * 64
    assert a != task_id_for("https://mirror-a.example/blob", digest=other_digest)


def test_identifier_changes_the_id() -> None:
    """
    The same URL with different identifiers is different tasks.
    """
    base = task_id_for(URL)
    assert task_id_for(URL, identifier="v1") != base
    assert task_id_for(URL, identifier="v1") != task_id_for(URL, identifier="v2")
    assert task_id_for(URL, identifier="v1") == task_id_for(URL, identifier="v1")


def test_url_and_identifier_cannot_collide_by_concatenation() -> None:
    """
    The URL and identifier are separated, so moving text between them
    changes the id.
    """
    assert task_id_for("http://h/a", identifier="b") != task_id_for(
        "http://h/ab", identifier=""
    )


# Piece geometry -------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "size"),
    [
        (None, 4 * MIB),
        (0, 4 * MIB),
        (1, 4 * MIB),
        (200 * MIB, 4 * MIB),
        (200 * MIB + 1, 4 * MIB),
        (300 * MIB, 5 * MIB),
        (1 << 30, 12 * MIB),
        (int(1.3 * (1 << 30)), 15 * MIB),
        (2 << 30, 15 * MIB),
        (100 << 30, 15 * MIB),
    ],
)
def test_piece_size_for(length: int | None, size: int) -> None:
    """
    4 MiB up to 200 MiB, then one more MiB per further 100 MiB, capped at
    15 MiB; unknown lengths get the default.
    """
    assert piece_size_for(length) == size


@DETERMINISTIC
@given(st.integers(0, 1 << 40))
def test_piece_size_is_monotonic_and_bounded(length: int) -> None:
    """
    Piece sizes stay within [4, 15] MiB and never shrink as files grow.
    """
    size = piece_size_for(length)
    assert 4 * MIB <= size <= 15 * MIB
    assert piece_size_for(length + 100 * MIB) >= size


@pytest.mark.parametrize(
    ("length", "piece_size", "count"),
    [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3)],
)
def test_piece_count(length: int, piece_size: int, count: int) -> None:
    """
    The number of pieces rounds up; an empty file has none.
    """
    assert piece_count(length, piece_size) == count


def test_piece_bounds_including_last_short_piece() -> None:
    """
    Pieces are contiguous slices; the last may be short.
    """
    assert piece_bounds(0, 4, 10) == (0, 4)
    assert piece_bounds(1, 4, 10) == (4, 4)
    assert piece_bounds(2, 4, 10) == (8, 2)
    assert piece_bounds(1, 4, 8) == (4, 4)


@pytest.mark.parametrize(
    ("num", "length"), [(-1, 10), (3, 10), (2, 8), (0, 0), (99, 10)]
)
def test_piece_bounds_out_of_range(num: int, length: int) -> None:
    """
    Pieces before the start or past the end of the file do not exist.
    """
    with pytest.raises(InvalidRequest):
        piece_bounds(num, 4, length)


@DETERMINISTIC
@given(st.integers(1, 10_000), st.integers(1, 700))
def test_pieces_tile_the_file(length: int, piece_size: int) -> None:
    """
    All pieces together cover every byte exactly once, in order.
    """
    covered = 0
    for num in range(piece_count(length, piece_size)):
        offset, size = piece_bounds(num, piece_size, length)
        assert offset == covered
        assert 0 < size <= piece_size
        covered += size
    assert covered == length


# Validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://example.com/f", "https://10.0.0.1:8443/a?b=c", "http://[::1]:80/x"],
)
def test_check_url_accepts_http_urls(url: str) -> None:
    """
    Absolute http(s) URLs with a host pass unchanged.
    """
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/f", "http"),
        ("example.com/f", "http"),
        ("/relative", "http"),
        ("file:///etc/passwd", "http"),
        ("http:///nohost", "no host"),
        ("http://", "no host"),
        ("http://example.com:99999/", "bad port"),
        ("http://example.com:port/", "bad port"),
    ],
)
def test_check_url_rejects(url: str, why: str) -> None:
    """
    Other schemes, missing hosts and bad ports raise InvalidRequest saying so.
    """
    with pytest.raises(InvalidRequest, match=why):
        check_url(url)


def test_check_digest() -> None:
    """
    Only sha256:<64 lowercase hex> is a digest.
    """
    assert check_digest(DIGEST) == DIGEST
    for bad in [
        "",
        "sha256:",
        DIGEST.upper(),
        "sha256:" + "A" * 64,
        "sha512:" + "0" * 64,
        DIGEST + "0",
        DIGEST[:-1],
        "0" * 64,
    ]:
        with pytest.raises(InvalidRequest):
            check_digest(bad)


def test_check_task_id() -> None:
    """
    Only 64 lowercase hex digits are a task id (it names files on disk).
    """
    good = "0" * 63 + "f"
    assert check_task_id(good) == good
    for bad in ["", "F" * 64, "0" * 63, "0" * 65, "../" + "0" * 61, "g" * 64]:
        with pytest.raises(InvalidRequest):
            check_task_id(bad)


@pytest.mark.parametrize(
    ("check", "value"),
    [(check_digest, DIGEST + "\n"), (check_task_id, "0" * 64 + "\n")],
    ids=["digest", "task-id"],
)
def test_checks_reject_trailing_newline(check: object, value: str) -> None:
    """
    A value with a trailing newline is not a digest or task id (task ids
    name files on disk; a digest is compared with computed ones).
    """
    with pytest.raises(InvalidRequest):
        check(value)  # type: ignore[operator]
