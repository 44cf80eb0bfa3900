"""
Task identity and piece geometry, shared by the supernode and the peers.

A task is one file as the swarm sees it.  Its id is the sha256 of the
normalized URL (query parameters named by the filter removed, so signed URLs
that differ only in their signature share a task) plus an identifier when
given.  When the expected digest is given it alone names the task, since it
names the content: the same layer is one task whatever registry, repository
or mirror URL it is fetched through.

Pieces carry no wrapper (Dragonfly 1.x added five bytes to each piece, which
every reader then had to strip): piece C{n} is bytes
C{[n * piece_size, min((n + 1) * piece_size, length))} of the file.
"""

import hashlib
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MIB = 1 << 20
DEFAULT_PIECE_SIZE = 4 * MIB
MAX_PIECE_SIZE = 64 * MIB
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TASK_ID = re.compile(r"^[0-9a-f]{64}$")


class InvalidRequest(ValueError):
    """
    A URL, digest or other task attribute given by a user is not acceptable.
    """


def check_url(url: str) -> str:
    """
    Return C{url} if it is an absolute http or https URL with a host.

    @raise InvalidRequest: otherwise, saying why.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidRequest(f"URL must start with http:// or https://: {url!r}")
    if not parts.hostname:
        raise InvalidRequest(f"URL has no host: {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise InvalidRequest(f"URL has a bad port: {url!r}") from e
    return url


def check_digest(digest: str) -> str:
    """
    Return C{digest} if it has the form C{sha256:<64 lowercase hex>}.

    @raise InvalidRequest: otherwise.
    """
    if not _DIGEST.fullmatch(digest):
        raise InvalidRequest(f"digest must be sha256:<64 hex digits>, got {digest!r}")
    return digest


def check_task_id(task_id: str) -> str:
    """
    Return C{task_id} if it is 64 lowercase hex digits (it names files on disk).

    @raise InvalidRequest: otherwise.
    """
    if not _TASK_ID.fullmatch(task_id):
        raise InvalidRequest(f"not a task id: {task_id!r}")
    return task_id


def normalize_url(url: str, filters: Iterable[str] = ()) -> str:
    """
    Drop the query parameters named in C{filters} and any fragment.
    """
    dropped = set(filters)
    parts = urlsplit(url)
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in dropped
    ]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def task_id_for(
    url: str, filters: Iterable[str] = (), digest: str = "", identifier: str = ""
) -> str:
    """
    Compute the task id of a download.

    A digest alone identifies content, so when one is given the URL does not
    take part: two mirrors of one layer make one task.
    """
    if digest:
        material = "digest\0" + digest
    else:
        material = "url\0" + normalize_url(url, filters) + "\0" + identifier
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def piece_size_for(length: int | None) -> int:
    """
    Choose the piece size for a file of C{length} bytes (None: unknown yet).

    As in Dragonfly 1.x: 4 MiB up to 200 MiB, then one more MiB for every
    further 100 MiB, at most 15 MiB, so that large files do not need
    thousands of scheduling decisions.
    """
    if length is None or length <= 200 * MIB:
        return DEFAULT_PIECE_SIZE
    return min(15 * MIB, (length // (100 * MIB) + 2) * MIB)


def piece_count(length: int, piece_size: int) -> int:
    """
    How many pieces a file of C{length} bytes has (an empty file has none).
    """
    return (length + piece_size - 1) // piece_size


def piece_bounds(num: int, piece_size: int, length: int) -> tuple[int, int]:
    """
    The C{(offset, size)} of piece C{num} in a file of C{length} bytes.
    """
    offset = num * piece_size
    if num < 0 or offset >= length:
        raise InvalidRequest(f"piece {num} is outside a file of {length} bytes")
    return offset, min(piece_size, length - offset)
