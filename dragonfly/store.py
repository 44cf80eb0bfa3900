"""
Tasks' bytes on disk, piece by piece.

A L{TaskFile} is one file per task, written at piece offsets as pieces arrive
in any order, with the set of pieces that were verified.  Only verified
pieces are ever served.  Writing and hashing happen on a thread pool
(C{hashlib} and C{os.pwrite} release the GIL), reads for serving are bounded
C{os.pread}s on the reactor thread, which page-cache hits make cheap.

A L{PieceStore} is a directory of task files and is the L{PieceSource} a
piece server serves from.

Descriptors are bounded: a daemon may hold thousands of tasks, but the
process has a descriptor limit (often 1,024) shared with its sockets.  A
task file opens its descriptor when it is used and L{OpenFiles} keeps at
most a fixed number open per store, closing the least recently used idle
ones; a closed one is reopened on its next use.  A descriptor is never
closed while it is in use (a piece reader open, a read, write or hash
running on a thread): each use holds a count under the file's lock, and a
final L{TaskFile.close} during a use only marks the file, leaving the
descriptor to the last user to close.  Closing under a running C{pread}
would be worse than an error: the number could already name another file.
Keeping every descriptor open, or opening one per read, were rejected: the
first runs out of descriptors, the second costs two system calls per 64 KiB
served.
"""

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from dragonfly import wire
from dragonfly.piece_protocol import PieceUnavailable
from dragonfly.tasks import piece_bounds


class PieceDigestMismatch(Exception):
    """
    A piece's bytes do not have the sha256 the supernode recorded for it.
    """


DEFAULT_MAX_OPEN_FILES = 256


class OpenFiles:
    """
    The task files of one store that hold a descriptor, least recently used
    first, and at most C{limit} of them while they are idle.  Used from the
    reactor thread and from the store's threads alike.
    """

    def __init__(self, limit: int = DEFAULT_MAX_OPEN_FILES) -> None:
        if limit < 1:
            raise ValueError(f"at least one open file is needed, not {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._files: OrderedDict[TaskFile, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._files)

    def used(self, task_file: "TaskFile") -> None:
        """
        Record that C{task_file} holds a descriptor and was just used; close
        the least recently used idle ones beyond the limit.  Files in use
        are passed over, so the count may exceed the limit until they are
        done; the next use tries again.
        """
        with self._lock:
            self._files[task_file] = None
            self._files.move_to_end(task_file)
            excess = len(self._files) - self.limit
            if excess <= 0:
                return
            for candidate in list(self._files):
                if excess <= 0:
                    break
                if candidate is not task_file and candidate.close_idle():
                    del self._files[candidate]
                    excess -= 1

    def forget(self, task_file: "TaskFile") -> None:
        with self._lock:
            self._files.pop(task_file, None)


class TaskFile:
    """
    One task's bytes on disk.

    @ivar held: the pieces written and verified, which may be served.
    @ivar length: the file's length, or C{None} while the source has not
        said (a streamed response without Content-Length).
    @ivar readers: the piece readers open on the file (reactor thread only).
    """

    def __init__(
        self,
        task_id: str,
        path: Path,
        piece_size: int,
        length: int | None,
        open_files: OpenFiles | None = None,
    ) -> None:
        """
        Create the file if it does not exist.

        @param open_files: the store's bound on descriptors; without one the
            descriptor, once opened, stays open until L{close}.
        """
        self.task_id = task_id
        self.path = path
        self.piece_size = piece_size
        self.length = length
        self.held: set[int] = set()
        self.readers = 0
        self.last_used = 0.0
        self._open_files = open_files
        self._lock = threading.Lock()
        self._uses = 0
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        # Mode as for any file a user downloads (the umask applies).  The
        # descriptor is kept for the use that almost always follows.
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if open_files is not None:
            open_files.used(self)

    @property
    def is_open(self) -> bool:
        """
        Whether the file holds a descriptor now.
        """
        return self._fd is not None

    @contextmanager
    def _using(self) -> Iterator[int]:
        """
        The descriptor, (re)opened if needed and kept open for the block.
        """
        with self._lock:
            if self._closed:
                raise ValueError(f"task file {self.path} is closed")
            if self._fd is None:
                # No O_CREAT: a file deleted behind our back is an error,
                # not a new empty file.
                self._fd = os.open(self.path, os.O_RDWR)
            self._uses += 1
            fd = self._fd
        if self._open_files is not None:
            self._open_files.used(self)
        try:
            yield fd
        finally:
            with self._lock:
                self._uses -= 1
                if self._closed and not self._uses:
                    self._close_fd()

    def _close_fd(self) -> None:
        # With the lock held.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close_idle(self) -> bool:
        """
        Close the descriptor unless the file is in use (it is reopened on
        its next use); whether the file now holds no descriptor.
        """
        with self._lock:
            if self._uses or self.readers:
                return False
            self._close_fd()
            return True

    def bounds(self, piece: int) -> tuple[int, int]:
        """
        The C{(offset, size)} of a piece; the length must be known.
        """
        if self.length is None:
            raise ValueError("length not known yet")
        return piece_bounds(piece, self.piece_size, self.length)

    def write_verified(
        self,
        piece: int,
        data: bytes | bytearray,
        sha256: str,
        actual: str | None = None,
    ) -> None:
        """
        Check C{data} against C{sha256} and write it at the piece's offset.
        Runs on a thread; the caller marks the piece held afterwards.

        @param actual: the sha256 of C{data} when the caller computed it
            already (as the bytes arrived); otherwise it is computed here.
        @raise PieceDigestMismatch: if the digest differs (nothing written).
        """
        if actual is None:
            actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise PieceDigestMismatch(
                f"piece {piece}: expected sha256 {sha256}, got {actual}"
            )
        self.write_at(piece * self.piece_size, data)

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        with self._using() as fd:
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written

    def read(self, offset: int, size: int) -> bytes:
        with self._using() as fd:
            return os.pread(fd, size, offset)

    def hash_range(self, start: int, end: int, block: int = 1 << 20) -> str:
        """
        sha256 of bytes C{[start, end)}, read in blocks.  Runs on a thread.
        """
        digest = hashlib.sha256()
        offset = start
        with self._using() as fd:
            while offset < end:
                data = os.pread(fd, min(block, end - offset), offset)
                if not data:
                    raise OSError(f"{self.path} is shorter than {end} bytes")
                digest.update(data)
                offset += len(data)
        return digest.hexdigest()

    def truncate(self, length: int) -> None:
        with self._using() as fd:
            os.ftruncate(fd, length)

    def close(self) -> None:
        """
        Close for good: later uses fail.  A use running on a thread keeps
        the descriptor until it is done.
        """
        with self._lock:
            self._closed = True
            if not self._uses:
                self._close_fd()
        if self._open_files is not None:
            self._open_files.forget(self)

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class _HeldPiece:
    """
    A L{PieceReader} over one held piece of a L{TaskFile}.
    """

    def __init__(self, task_file: TaskFile, offset: int, length: int) -> None:
        self._file = task_file
        self._offset = offset
        self.length = length
        task_file.readers += 1

    def read(self, offset: int, size: int) -> bytes:
        try:
            return self._file.read(self._offset + offset, size)
        except (OSError, ValueError):
            # Deleted or closed under the reader: a short read, which ends
            # the stream the way a shrunken file does.
            return b""

    def close(self) -> None:
        self._file.readers -= 1


class PieceStore:
    """
    A directory of task files; serves the pieces they hold.
    """

    def __init__(
        self,
        directory: Path,
        reactor: Any,
        threadpool: Any = None,
        suffix: str = "",
        max_open_files: int = DEFAULT_MAX_OPEN_FILES,
    ) -> None:
        """
        @param suffix: appended to every task file's name; peers use their
            process id, so that processes sharing a home never write (or
            link outputs to) each other's files.
        @param max_open_files: the descriptors the task files may keep open
            while idle.
        """
        self.directory = directory
        self._suffix = suffix
        self._reactor = reactor
        self._threadpool = threadpool or reactor.getThreadPool()
        self.tasks: dict[str, TaskFile] = {}
        self.open_files = OpenFiles(max_open_files)
        directory.mkdir(parents=True, exist_ok=True)

    def in_thread(self, f: Any, *args: Any) -> Deferred[Any]:
        """
        Run blocking disk or hashing work on the store's thread pool.
        """
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)

    @property
    def suffix(self) -> str:
        return self._suffix

    def path_for(self, task_id: str) -> Path:
        return self.directory / task_id[:2] / (task_id + self._suffix)

    def open(
        self, task_id: str, piece_size: int, length: int | None, fresh: bool = False
    ) -> TaskFile:
        """
        The task file for C{task_id}, created if needed.

        @param fresh: when the task is not open yet, replace whatever file an
            earlier process left at its path instead of reusing it: outputs
            that were linked to that file must not change, and a shorter new
            content must not keep its tail.
        """
        task_file = self.tasks.get(task_id)
        if task_file is None:
            path = self.path_for(task_id)
            if fresh:
                path.unlink(missing_ok=True)
            task_file = TaskFile(task_id, path, piece_size, length, self.open_files)
            self.tasks[task_id] = task_file
        task_file.last_used = self._reactor.seconds()
        return task_file

    def open_piece(self, task_id: str, piece: int) -> _HeldPiece:
        task_file = self.tasks.get(task_id)
        if task_file is None:
            raise PieceUnavailable(wire.ErrorCode.UNKNOWN_TASK, "unknown task")
        if piece not in task_file.held:
            raise PieceUnavailable(
                wire.ErrorCode.PIECE_NOT_HELD, f"piece {piece} not held"
            )
        task_file.last_used = self._reactor.seconds()
        if task_file.length is None:
            # Still streaming a body of unknown length: every piece cut so
            # far is whole (the last one is cut once the length is known).
            offset, size = piece * task_file.piece_size, task_file.piece_size
        else:
            offset, size = task_file.bounds(piece)
        return _HeldPiece(task_file, offset, size)

    def remove(self, task_id: str) -> None:
        task_file = self.tasks.pop(task_id, None)
        if task_file is not None:
            task_file.remove()

    def idle_tasks(self, older_than: float) -> Iterable[TaskFile]:
        """
        Task files unused since C{older_than} and not being read.
        """
        return [
            t for t in self.tasks.values() if t.last_used < older_than and not t.readers
        ]

    def close(self, remove: bool = False) -> None:
        """
        Close every task file, and delete them when C{remove} (outputs linked
        to them keep their data).
        """
        for task_file in self.tasks.values():
            if remove:
                task_file.remove()
            else:
                task_file.close()
