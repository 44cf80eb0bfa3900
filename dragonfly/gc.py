"""
Disk hygiene shared by the supernode's cache and dfpeer's store: which
tasks to delete so that the files stay under a size cap and the filesystem
keeps a minimum of free space.

Design
======
  - Two watermarks, each optional: a cap on the bytes of the task files
    (C{--cache-limit}, C{--store-limit}) and a minimum of free space on the
    filesystem that holds them (C{--min-free-space}, in bytes or as a
    percentage of the filesystem's size).  When either is crossed, the least
    recently used tasks are deleted until both hold again, or nothing more
    may be deleted.
  - Measuring (a C{stat} per file, C{statvfs}) runs on a thread; choosing
    runs on the reactor thread, against the daemon's state at that moment,
    so a task that started being downloaded or served while the disk was
    being measured is never chosen.  A task in use is never deleted, even
    when that leaves the cap exceeded: the watermarks are targets, not
    guarantees.
  - Every deletion is logged with its task, bytes and reason, and counted in
    the daemon's metrics.
"""

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dragonfly.units import parse_size

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class FreeSpace:
    """
    A minimum of free space: C{size} bytes, or C{fraction} of the
    filesystem (0 for neither).
    """

    size: int = 0
    fraction: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.size or self.fraction)

    def __str__(self) -> str:
        """
        The minimum as it is written in a flag (the help's default).
        """
        if self.fraction:
            return f"{self.fraction * 100:g}%"
        return str(self.size)

    def required(self, total: int) -> int:
        """
        The free bytes wanted on a filesystem of C{total} bytes.
        """
        return self.size or int(self.fraction * total)


def parse_free_space(text: str) -> FreeSpace:
    """
    Parse C{"5%"} (of the filesystem's size) or a size such as C{"10G"}.

    @raise ValueError: if C{text} is neither, or a percentage over 100.
    """
    match = _PERCENT.match(text)
    if match is None:
        try:
            return FreeSpace(size=parse_size(text))
        except ValueError:
            raise ValueError(
                f"not a size or a percentage: {text!r} (examples: 5%, 512M, 10G)"
            ) from None
    percent = float(match.group(1))
    if percent > 100:
        raise ValueError(f"{text!r} is over 100%")
    return FreeSpace(fraction=percent / 100)


@dataclass(frozen=True)
class Watermarks:
    """
    When to delete: above C{size_limit} bytes of task files (0: no cap), or
    below C{min_free} free on their filesystem.
    """

    size_limit: int = 0
    min_free: FreeSpace = field(default_factory=FreeSpace)

    def __bool__(self) -> bool:
        return bool(self.size_limit or self.min_free)


@dataclass(frozen=True)
class DiskSpace:
    free: int
    total: int


def disk_space(path: Path) -> DiskSpace:
    """
    The space left to unprivileged users on C{path}'s filesystem, and its
    size.  Runs on a thread.
    """
    stat = os.statvfs(path)
    return DiskSpace(stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize)


@dataclass(frozen=True)
class Entry:
    """
    A task that may be deleted: its bytes on disk and when it was last used.
    """

    task_id: str
    size: int
    last_used: float


def choose(
    entries: Iterable[Entry],
    used: int,
    space: DiskSpace | None,
    marks: Watermarks,
) -> list[tuple[Entry, str]]:
    """
    The tasks to delete, least recently used first, each with its reason
    (C{size_limit} or C{free_space}).

    @param entries: the tasks that may be deleted (none in use).
    @param used: the bytes of all the task files, in use or not.
    @param space: the filesystem's space, when C{marks} has a minimum.
    """
    over = used - marks.size_limit if marks.size_limit else 0
    short = 0
    if marks.min_free and space is not None:
        short = marks.min_free.required(space.total) - space.free
    chosen = []
    for entry in sorted(entries, key=lambda e: (e.last_used, e.task_id)):
        if over <= 0 and short <= 0:
            break
        chosen.append((entry, "size_limit" if over > 0 else "free_space"))
        over -= entry.size
        short -= entry.size
    return chosen
