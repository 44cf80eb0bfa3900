"""
What an operator installs: the systemd units in C{contrib/systemd} and the
JSON log observer they run twistd with.
"""

import configparser
import json
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from loopback import Processes, child_env, free_port, twistd_cmd, wait_for_ping

from dragonfly.logs import json_observer

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
COMMANDS = {
    "dragonfly-supernode.service": ("supernode", "/etc/dragonfly/supernode.yml"),
    "dragonfly-dfpeer.service": ("dfpeer", "/etc/dragonfly/dfpeer.yml"),
}


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_units_are_complete() -> None:
    """
    Each unit runs twistd in the foreground without a pid file and with the
    JSON logger, as a dedicated user with a state directory, restarts on
    failure, raises the file limit and is hardened.
    """
    for name, (plugin, config) in COMMANDS.items():
        service = _unit(name)["Service"]
        argv = shlex.split(service["ExecStart"])
        assert argv[0] == "/opt/dragonfly/bin/twistd"
        assert argv[1:5] == [
            "--nodaemon",
            "--pidfile=",
            "--logger",
            "dragonfly.logs.json_to_stdout",
        ]
        assert argv[5:] == [plugin, "--config", config]
        assert service["User"] == "dragonfly"
        assert service["StateDirectory"] == name.removesuffix(".service")
        assert service["Restart"] == "on-failure"
        assert int(service["LimitNOFILE"]) >= 65536
        assert service["NoNewPrivileges"] == "yes"
        assert service["ProtectSystem"] == "strict"
        assert service["CapabilityBoundingSet"] == ""
        assert _unit(name)["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    """
    C{systemd-analyze verify} finds nothing to say about either unit (with
    the twistd of this environment standing in for /opt/dragonfly's).
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    twistd = twistd_cmd()[0]
    copies = []
    for name in COMMANDS:
        text = (UNITS / name).read_text()
        copy = tmp_path / name
        copy.write_text(text.replace("/opt/dragonfly/bin/twistd", twistd))
        copies.append(str(copy))
    result = subprocess.run(
        [analyze, "verify", *copies],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def _config(plugin: str, work: Path) -> tuple[Path, int]:
    """
    A configuration file for C{plugin} on free loopback ports.
    """
    port = free_port()
    if plugin == "supernode":
        text = (
            f"port: {port}\ndownload-port: {free_port()}\nlisten-ip: 127.0.0.1\n"
            f"home: {work / 'home'}\n"
        )
    else:
        text = (
            f"port: {port}\npeer-port: {free_port()}\nip: 127.0.0.1\n"
            f"listen-ip: 127.0.0.1\nnode: [127.0.0.1:{free_port()}]\n"
            f"registry: http://127.0.0.1:{free_port()}\nhome: {work / 'home'}\n"
        )
    path = work / f"{plugin}.yml"
    path.write_text(text)
    return path, port


@pytest.mark.loopback
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unit_command_runs_and_logs_json(
    processes: Processes, work: Path, name: str
) -> None:
    """
    The unit's own ExecStart (its config file swapped for one on free
    loopback ports) starts the daemon, which answers C{/_ping}, and every
    line it writes on stdout is a JSON event with Twisted's event fields
    and the formatted text; it stops cleanly on SIGTERM.
    """
    plugin, system_config = COMMANDS[name]
    argv = shlex.split(_unit(name)["Service"]["ExecStart"])
    config, port = _config(plugin, work)
    argv = [*twistd_cmd(), *argv[1:]]
    argv[argv.index(system_config)] = str(config)
    out = work / "stdout"
    with open(out, "wb") as stdout:
        proc = processes.popen(
            argv, cwd=work, stdout=stdout, stderr=subprocess.STDOUT, env=child_env()
        )
    wait_for_ping(f"http://127.0.0.1:{port}/_ping", proc, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) in (0, -signal.SIGTERM)
    lines = out.read_text().splitlines()
    assert len(lines) > 3
    events = [json.loads(line) for line in lines]
    for event in events:
        assert {"log_namespace", "log_level", "log_time", "log_text"} <= set(event)
        assert event["log_level"]["name"] in {"debug", "info", "warn", "error"}
    texts = [e["log_text"] for e in events]
    assert any("starting up" in t for t in texts), texts
    assert any(f"{port}" in t for t in texts), texts
    assert "Main loop terminated." in texts, texts[-5:]
    assert texts[-1] == "Server Shut Down.", texts[-5:]


def test_json_observer_writes_one_parseable_line_per_event() -> None:
    """
    An event with a message and fields becomes one line that
    reads back as the same event.
    """
    import io

    from twisted.logger import LogLevel, eventFromJSON

    stream = io.StringIO()
    observer = json_observer(stream)
    observer(
        {
            "log_format": "piece {piece} from {peer}",
            "piece": 3,
            "peer": "127.0.0.2",
            "log_level": LogLevel.warn,
            "log_namespace": "dragonfly.test",
            "log_time": 1.5,
        }
    )
    (line,) = stream.getvalue().splitlines()
    event = eventFromJSON(line)
    assert event["log_text"] == "piece 3 from 127.0.0.2"
    assert event["piece"] == 3
    assert event["log_level"] is LogLevel.warn
