"""
Child processes and ports for loopback set-ups (the demo, the benchmarks,
the tests): each process is ended by its own PID, never by name.
"""

import contextlib
import os
import signal
import socket
import subprocess
from typing import Any

STOP_TIMEOUT = 10.0


def child_env() -> dict[str, str]:
    """
    The environment for our own child processes: unbuffered output, and no
    C{DFGET_HOME} leaking in from the caller.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DFGET_HOME", None)
    return env


def free_port(ip: str = "127.0.0.1") -> int:
    """
    A TCP port free on C{ip} right now (bound to port 0, then released).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def stop_process(proc: "subprocess.Popen[Any]", timeout: float = STOP_TIMEOUT) -> int:
    """
    End a process we started, by its PID: SIGTERM, then SIGKILL if it is
    still there after C{timeout} seconds.  Returns its exit status.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(STOP_TIMEOUT)
    return proc.returncode
