"""
Shared fixtures.

The real-process loopback fixtures (source server, daemons, dfget runs) are
built on L{loopback}; every process they start is ended by PID when the test
ends, whether it passed or not.
"""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from certs import PKI, make_pki  # noqa: E402
from loopback import (  # noqa: E402
    MIB,
    Dfget,
    Processes,
    SourceServer,
    start_source,
)


@pytest.fixture
def processes(work: Path) -> Iterator[Processes]:
    """
    Tracks the processes a test starts and ends them (by PID) afterwards,
    before C{work} is cleaned.
    """
    tracker = Processes()
    try:
        yield tracker
    finally:
        tracker.stop_all()


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """
    The test's directory; data files over 1 MiB are deleted afterwards (logs
    stay for post-mortems).
    """
    yield tmp_path
    for path in tmp_path.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size > MIB:
                path.unlink()
        except OSError:
            pass


@pytest.fixture
def source(processes: Processes, work: Path) -> SourceServer:
    """
    A counting HTTP source on 127.0.0.1 serving C{work/source}.
    """
    return start_source(processes, work)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """
    A trusted CA, leaves for 127.0.0.1..4, and an untrusted CA with leaves.
    """
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def dfget(processes: Processes, work: Path) -> Dfget:
    """
    Starts dfget processes, each in its own directory under C{work/dfget}.
    """
    return Dfget(processes, work / "dfget")


@pytest.fixture(autouse=True)
def no_host_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Options parsed inside the test process never read the machine's
    C{/etc/dragonfly/*.yml} (processes tests start are kept from them by
    L{loopback.child_env} and C{--config=}); a test that wants a system
    file patches these again.
    """
    from dragonfly import config
    from dragonfly.peer import tap as peer_tap
    from dragonfly.supernode import tap as supernode_tap

    monkeypatch.setattr(
        config, "DFGET_SYSTEM_CONFIG", Path("/nonexistent/dragonfly/dfget.yml")
    )
    monkeypatch.setattr(supernode_tap.Options, "config_default", "")
    monkeypatch.setattr(peer_tap.Options, "config_default", "")
