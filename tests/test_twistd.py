"""
The command lines as users meet them: the twistd plugins, their option
errors, dfget's argument errors (exit 2), and the daemons' start and clean
stop under C{twistd -n}.
"""

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from certs import PKI
from loopback import (
    Daemon,
    Processes,
    child_env,
    free_port,
    run_dfget_args,
    start_dfpeer,
    start_supernode,
    twistd_cmd,
)
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins


def _twistd(
    args: list[str], cwd: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*twistd_cmd(), *args],
        cwd=cwd,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_twistd_help_lists_the_plugins(tmp_path: Path) -> None:
    """
    C{twistd --help} lists the C{supernode} and C{dfpeer} commands.
    """
    result = _twistd(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    commands = {
        line.split()[0]
        for line in result.stdout.splitlines()
        if line.startswith("    ")
    }
    assert {"supernode", "dfpeer"} <= commands, result.stdout


def test_plugins_are_service_makers() -> None:
    """
    Twisted's plugin system finds both as C{IServiceMaker}s, with the
    dragonfly option classes and a description.
    """
    import twisted.plugins

    makers = {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}
    assert {"supernode", "dfpeer"} <= set(makers)
    from dragonfly.peer import tap as peer_tap
    from dragonfly.supernode import tap as supernode_tap

    assert makers["supernode"].options is supernode_tap.Options
    assert makers["dfpeer"].options is peer_tap.Options
    assert all(makers[n].description for n in ("supernode", "dfpeer"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["supernode", "--bogus"], "--bogus not recognized"),
        (["supernode", "--port", "http"], "--port"),
        (["supernode", "--piece-size", "1K"], "--piece-size must be between"),
        (["supernode", "--listen-ip", "localhost"], "not an IPv4 address"),
        (["supernode", "--tls-cert", "c.pem"], "--tls-cert and --tls-key"),
        (
            ["dfpeer", "--node", "nonsense:port"],
            "bad supernode address 'nonsense:port'",
        ),
        (["dfpeer", "--registry", "ftp://x"], "http:// or https://"),
    ],
)
def test_twistd_option_errors(tmp_path: Path, args: list[str], expected: str) -> None:
    """
    A bad option makes twistd exit non-zero with a message naming it (and
    no daemon is left running: the command returns).
    """
    command, *flags = args
    result = _twistd(["-n", "--pidfile=", command, "--config=", *flags], tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert expected in output, output[-2000:]
    assert "Traceback" not in output, output[-2000:]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-u", "ftp://x"], "URL must start with http:// or https://: 'ftp://x'"),
        (["-u", "not a url"], "URL must start with http:// or https://: 'not a url'"),
        (["-u", "http://127.0.0.1:99999/f"], "URL has a bad port"),
        (
            ["-u", "http://127.0.0.1:9/f", "--digest", "sha256:xyz"],
            "argument --digest: digest must be sha256:<64 hex digits>",
        ),
        (
            ["-u", "http://127.0.0.1:9/f", "--digest", "md5:" + "0" * 32],
            "argument --digest",
        ),
        (
            ["-u", "http://127.0.0.1:9/f", "--locallimit", "fast"],
            "argument -s/--locallimit: not a size: 'fast'",
        ),
        (["-u", "http://127.0.0.1:9/f", "--timeout", "soon"], "argument -e/--timeout"),
        (
            ["-u", "http://127.0.0.1:9/f", "--node", "a:b"],
            "bad supernode address 'a:b'",
        ),
        (
            ["-u", "http://127.0.0.1:9/f", "--ip", "999.0.0.1"],
            "'999.0.0.1' is not an IPv4",
        ),
        (["-u", "http://127.0.0.1:9/f", "--header", "nocolon"], "argument --header"),
        (
            ["-u", "http://127.0.0.1:9/f", "--tls-cert", "missing.pem"],
            "--tls-cert and --tls-key go together",
        ),
        (
            [
                "-u",
                "http://127.0.0.1:9/f",
                "--tls-cert",
                "missing.pem",
                "--tls-key",
                "k",
            ],
            "cannot read certificate 'missing.pem'",
        ),
        (["-u", "http://127.0.0.1:9/"], "give --output"),
        (["--output", "x"], "-u/--url"),
    ],
)
def test_dfget_usage_errors_exit_2(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    """
    dfget rejects a bad URL, digest, size, duration, node, IP, header or TLS
    option before doing anything: exit 2, a message naming the problem on
    stderr, no output file and no home directory created.
    """
    home = tmp_path / "home"
    if "--output" not in args and expected != "give --output":
        args = [*args, "-o", str(tmp_path / "out")]
    result = run_dfget_args([*args, "--home", str(home)], tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert expected in result.stderr, result.stderr
    assert result.stderr.startswith("usage: dfget"), result.stderr
    assert not (tmp_path / "out").exists()
    assert not home.exists()


def test_tests_read_no_host_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Processes the tests start get C{DFGET_CONFIG} empty whatever the
    caller's, so dfget reads no file of the machine; options parsed in the
    test process have no system default file.
    """
    from dragonfly.config import dfget_config_path
    from dragonfly.peer import tap as peer_tap
    from dragonfly.supernode import tap as supernode_tap

    monkeypatch.setenv("DFGET_CONFIG", "/etc/dragonfly/dfget.yml")
    env = child_env()
    assert env["DFGET_CONFIG"] == ""
    monkeypatch.setenv("DFGET_CONFIG", env["DFGET_CONFIG"])
    assert dfget_config_path(Path("/nonexistent"), None) is None
    monkeypatch.delenv("DFGET_CONFIG")
    assert dfget_config_path(Path("/nonexistent"), None) is None
    assert supernode_tap.Options()._config_path() is None
    assert peer_tap.Options()._config_path() is None


@pytest.mark.loopback
def test_supernode_starts_and_stops_cleanly(processes: Processes, work: Path) -> None:
    """
    C{twistd -n supernode} answers C{/_ping} and its task list, and on
    SIGTERM shuts down cleanly (services stopped, no traceback, killed by
    nothing but its own re-raised SIGTERM) within 10 seconds, freeing both
    ports.
    """
    supernode = start_supernode(processes, work)
    assert supernode.proc.args[supernode.proc.args.index("supernode") + 1] == (
        "--config="
    )
    assert supernode.get_json("/api/v1/tasks") == {"tasks": []}
    started = time.monotonic()
    _terminate_cleanly(supernode)
    assert time.monotonic() - started < 10
    _assert_free("127.0.0.1", supernode.port)
    _assert_free("127.0.0.1", supernode.extra["piece_port"])


@pytest.mark.loopback
def test_tls_supernode_starts_and_stops_cleanly(
    processes: Processes, work: Path, pki: PKI
) -> None:
    """
    With mutual TLS the supernode answers C{/_ping} over HTTPS to a client
    with a trusted certificate and stops cleanly on SIGTERM.
    """
    supernode = start_supernode(processes, work, pki=pki)
    assert supernode.scheme == "https"
    _terminate_cleanly(supernode)


@pytest.mark.loopback
def test_dfpeer_starts_and_stops_cleanly(processes: Processes, work: Path) -> None:
    """
    C{twistd -n dfpeer} (its supernode not even running) serves C{/_ping}
    and an empty task list on its HTTP port, listens on its piece port, and
    on SIGTERM shuts down cleanly within 10 seconds.
    """
    node = f"127.0.0.1:{free_port()}"
    peer = start_dfpeer(processes, work, node, ip="127.0.0.2")
    assert peer.proc.args[peer.proc.args.index("dfpeer") + 1] == "--config="
    state = peer.get_json("/api/v1/tasks")
    assert state["tasks"] == []
    assert state["address"] == f"127.0.0.2:{peer.extra['peer_port']}"
    assert state["peer_id"].startswith("127.0.0.2-")
    _assert_listening("127.0.0.2", peer.extra["peer_port"])
    _terminate_cleanly(peer)


def _terminate_cleanly(daemon: Daemon) -> None:
    """
    SIGTERM the daemon and check it shut down cleanly within 10 seconds.

    twistd stops the reactor and the services, then re-raises the signal
    that stopped it (Twisted >= 21.7, C{reactor._exitSignal}), so a clean
    stop on SIGTERM ends with status -SIGTERM, not 0; anything else (a
    crash, a hang, exit 1) is a failure.  The log must show the services
    stopped and no traceback.
    """
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) in (0, -signal.SIGTERM)
    log = daemon.log_text()
    assert "Main loop terminated." in log, log[-2000:]
    assert "Server Shut Down." in log, log[-2000:]
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]


def _assert_listening(ip: str, port: int) -> None:
    import socket

    with socket.create_connection((ip, port), timeout=5):
        pass


def _assert_free(ip: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))


@pytest.mark.loopback
@pytest.mark.parametrize(
    ("daemon", "taken"),
    [
        ("supernode", "--port"),
        ("supernode", "--download-port"),
        ("dfpeer", "--port"),
        ("dfpeer", "--peer-port"),
    ],
)
def test_a_port_in_use_fails_the_start(tmp_path: Path, daemon: str, taken: str) -> None:
    """
    A daemon that cannot listen on one of its ports exits at once with
    status 1 and the error, instead of running on without that port (which
    a service manager would report as healthy).
    """
    ip = "127.0.0.1"
    ports = {
        "supernode": ["--port", "--download-port"],
        "dfpeer": ["--port", "--peer-port"],
    }[daemon]
    args = [daemon, "--config="]
    if daemon == "supernode":
        args += ["--advertise-ip", ip, "--listen-ip", ip]
    else:
        args += ["--ip", ip, "--listen-ip", ip, "--node", f"{ip}:{free_port()}"]
    args += ["--home", str(tmp_path / "home")]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind((ip, 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        for flag in ports:
            args += [flag, str(busy_port if flag == taken else free_port())]
        started = time.monotonic()
        result = _twistd(["-n", "--pidfile=", *args], tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert time.monotonic() - started < 20
    output = result.stdout + result.stderr
    assert f"Couldn't listen on {ip}:{busy_port}" in output
    assert "Address already in use" in output
