"""
Log observers for C{twistd --logger}.

Under systemd (or any collector reading standard output) one JSON object
per line is easier to search and ship than twistd's text log, so::

    twistd --nodaemon --pidfile= --logger dragonfly.logs.json_to_stdout supernode

writes every event as Twisted's own JSON form of it (C{log_namespace},
C{log_level}, C{log_time}, C{log_format} and the event's fields, as
L{twisted.logger.eventAsJSON} renders them; L{twisted.logger.eventsFromJSONLines}
reads them back), plus C{log_text}, the message already formatted, for
people reading with C{jq -r .log_text}.  Lines are separated by newlines
only: the RFC 7464 record separator that C{jsonFileLogObserver} puts in
front of each record by default would show up as noise in the journal.
"""

import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, eventAsJSON, formatEvent


def _json_line(event: dict[str, Any]) -> str:
    return eventAsJSON({**event, "log_text": formatEvent(event)}) + "\n"


def json_observer(stream: IO[str]) -> FileLogObserver:
    """
    An observer writing each event to C{stream} as one line of JSON.
    """
    return FileLogObserver(stream, _json_line)


def json_to_stdout() -> FileLogObserver:
    """
    The C{--logger} factory: JSON lines on the process's real standard
    output.

    twistd calls this before it redirects C{sys.stdout} into the log
    system, and the observer keeps the original stream, so its own writes
    can never loop back into the log.
    """
    return json_observer(sys.__stdout__ or sys.stdout)
