"""
The peer's client log, C{<home>/logs/dfclient.log}.

Dragonfly users check that P2P works by grepping this file for
C{downloading piece} lines (and for pieces not from C{cdnnode}), so each
fetched piece is one line in Dragonfly 1.x's layout::

    2026-12-03 17:00:00.123 INFO sign:4242-1764781200.123 : downloading piece:{json}

The lines are rendered from structured events; the JSON is the event's
C{piece} field.
"""

import json
import os
import time
from pathlib import Path
from typing import IO, Any

from twisted.logger import FileLogObserver, LogLevel, formatEvent

PIECE_NAMESPACE = "dragonfly.pieces"

_LEVELS = {
    LogLevel.debug: "DEBU",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERRO",
    LogLevel.critical: "ERRO",
}


def make_sign() -> str:
    """
    The 1.x session tag: process id and start time.
    """
    return f"{os.getpid()}-{time.time():.3f}"


def _formatter(sign: str) -> Any:
    def format_line(event: dict[str, Any]) -> str:
        stamp = event.get("log_time", time.time())
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
        millis = int((stamp % 1) * 1000)
        level = _LEVELS.get(event.get("log_level", LogLevel.info), "INFO")
        message = formatEvent(event)
        if event.get("log_namespace") == PIECE_NAMESPACE:
            message = "downloading piece:" + json.dumps(
                event["piece"], separators=(",", ":")
            )
        return f"{text}.{millis:03d} {level} sign:{sign} : {message}\n"

    return format_line


def open_client_log(home: Path, sign: str) -> tuple[FileLogObserver, IO[str]]:
    """
    An observer appending to C{<home>/logs/dfclient.log}, and its file.
    """
    directory = home / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    stream = open(directory / "dfclient.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    return FileLogObserver(stream, _formatter(sign)), stream
