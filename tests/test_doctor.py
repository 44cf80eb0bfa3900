"""
C{dfget doctor}: a working host gets OK everywhere; each way of being broken
gets its FAIL line in plain words and exit status 1.
"""

import json
from pathlib import Path

import pytest
from loopback import (
    Dfget,
    Processes,
    free_port,
    http_get,
    run_dfget_args,
    start_dfpeer,
    start_source,
    start_supernode,
)
from twisted.logger import LogLevel

from dragonfly import dfget, doctor
from dragonfly.clientlog import PIECE_NAMESPACE, open_client_log
from dragonfly.devtools import registry as _registry

MIB = 1 << 20


def _engine_configs(directory: Path, mirror: str) -> list[str]:
    """
    docker, containerd and podman configured to pull through C{mirror}, as
    docs/registry-mirror.md says; the doctor flags that point at them.
    """
    docker = directory / "docker" / "daemon.json"
    docker.parent.mkdir(parents=True)
    docker.write_text(json.dumps({"registry-mirrors": [mirror + "/"]}))
    hosts = directory / "certs.d" / "docker.io" / "hosts.toml"
    hosts.parent.mkdir(parents=True)
    hosts.write_text(
        'server = "https://registry-1.docker.io"\n\n'
        f'[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    conf_d = directory / "registries.conf.d"
    conf_d.mkdir()
    (conf_d / "50-dragonfly.conf").write_text(
        '[[registry]]\nlocation = "docker.io"\n\n'
        f'[[registry.mirror]]\nlocation = "{mirror.removeprefix("http://")}"\n'
        "insecure = true\n"
    )
    return [
        "--docker-config",
        str(docker),
        "--containerd-certs",
        str(hosts.parent.parent),
        "--registries-conf",
        str(directory / "registries.conf"),
        "--registries-conf-d",
        str(conf_d),
    ]


@pytest.mark.loopback
def test_a_working_host_is_all_ok(
    processes: Processes, work: Path, dfget: Dfget
) -> None:
    """
    With a supernode, a dfpeer whose mirror reaches a real upstream
    registry, the three engines configured for it, a canary URL and a
    dfget that took its file from a peer, every finding is OK and
    C{dfget doctor --json} exits 0.
    """
    try:
        upstream = _registry.start_registry(work / "registry", popen=processes.popen)
    except _registry.ToolMissing as e:
        pytest.skip(str(e))
    source = start_source(processes, work)
    source.add_file("canary.bin", MIB)
    url = source.url("canary.bin")
    supernode = start_supernode(processes, work / "supernode")
    peer = start_dfpeer(
        processes,
        work / "dfpeer",
        supernode.node,
        ip="127.0.0.2",
        extra=["--registry", upstream.url],
    )
    # dfpeer holds the file, so a later dfget takes it from that peer.
    status, _, _ = http_get(peer.url(f"/api/v1/files?url={url}"), timeout=60)
    assert status == 200
    result = dfget.run(
        url, node=supernode.node, ip="127.0.0.3", extra=["--keep-serving", "0"]
    )
    assert result.code == 0, result.stderr

    config = work / "dfget.yml"
    config.write_text(f"node: [{supernode.node}]\nhome: {result.home}\n")
    mirror = f"http://{peer.ip}:{peer.port}"
    run = run_dfget_args(
        [
            "doctor",
            "--config",
            str(config),
            "--dfpeer",
            mirror,
            "--canary",
            url,
            "--json",
            *_engine_configs(work / "etc", mirror),
        ],
        work,
        timeout=120,
    )
    report = json.loads(run.stdout)
    findings = report["findings"]
    assert [f for f in findings if f["status"] != "OK"] == [], run.stdout
    assert run.returncode == 0, run.stderr
    assert report["ok"] is True
    checks = {f["check"] for f in findings}
    assert checks == {
        "dfget config",
        "supernode",
        "dfpeer",
        "registry mirror",
        "docker",
        "containerd",
        "podman",
        "canary",
        "recent downloads",
    }
    recent = next(f for f in findings if f["check"] == "recent downloads")
    assert "1.0 MiB (100%) from peers" in recent["message"]
    canary = next(f for f in findings if f["check"] == "canary")
    assert "1.0 MiB verified" in canary["message"]


def _run(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> tuple[int, dict[str, str]]:
    code = doctor.main(args)
    lines = capsys.readouterr().out.splitlines()
    by_check: dict[str, str] = {}
    for line in lines:
        status, _, rest = line.partition(" ")
        check, _, message = rest.strip().partition(": ")
        by_check.setdefault(check, f"{status} {message}")
    return code, by_check


def test_a_broken_host_fails_in_plain_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    Nothing listening, a daemon.json without the mirror, a broken
    hosts.toml and a registries.conf without the mirror: each is a FAIL
    that says what is wrong and what to do, and the exit status is 1.
    """
    mirror = f"http://127.0.0.1:{free_port()}"
    node = f"127.0.0.1:{free_port()}"
    flags = _engine_configs(tmp_path, mirror)
    (tmp_path / "docker" / "daemon.json").write_text(
        '{"registry-mirrors": ["https://mirror.example"]}'
    )
    (tmp_path / "certs.d" / "docker.io" / "hosts.toml").write_text("[host\n")
    (tmp_path / "registries.conf.d" / "50-dragonfly.conf").write_text(
        '[[registry]]\nlocation = "docker.io"\n'
    )
    code, found = _run(
        capsys,
        [
            "--node",
            node,
            "--dfpeer",
            mirror,
            "--home",
            str(tmp_path / "home"),
            "--config",
            "",
            "--timeout",
            "2s",
            *flags,
        ],
    )
    assert code == 1
    assert found["supernode"].startswith(f"FAIL {node} is not reachable")
    assert "connection refused" in found["supernode"]
    assert "systemctl start dragonfly-supernode" in found["supernode"]
    assert found["dfpeer"].startswith(f"FAIL {mirror} is not reachable")
    assert "systemctl start dragonfly-dfpeer" in found["dfpeer"]
    assert found["docker"].startswith("FAIL ")
    assert f"does not list {mirror} in registry-mirrors" in found["docker"]
    assert "restart docker" in found["docker"]
    assert found["containerd"].startswith("FAIL ")
    assert "hosts.toml is not valid TOML" in found["containerd"]
    assert found["podman"].startswith("FAIL no [[registry.mirror]] at 127.0.0.1:")
    assert found["canary"].startswith("WARN no test download made: give --canary")
    assert found["recent downloads"].startswith("WARN no ")


def test_malformed_daemon_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A daemon.json that is not JSON is a FAIL saying dockerd will not start;
    the JSON output says the same and the run is not ok.
    """
    mirror = f"http://127.0.0.1:{free_port()}"
    flags = _engine_configs(tmp_path, mirror)
    (tmp_path / "docker" / "daemon.json").write_text('{"registry-mirrors": [')
    code = doctor.main(["--dfpeer", mirror, "--json", "--timeout", "2s", *flags])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["ok"] is False
    docker = [f for f in report["findings"] if f["check"] == "docker"]
    assert docker[0]["status"] == "FAIL"
    assert "is not valid JSON" in docker[0]["message"]
    assert "dockerd will refuse to start" in docker[0]["message"]
    # The engines' other files are fine.
    containerd = [f for f in report["findings"] if f["check"] == "containerd"]
    assert containerd[0]["status"] == "OK"


def test_downloads_only_from_the_supernode_warn(tmp_path: Path) -> None:
    """
    A client log whose recent pieces all came from the supernode (C{cdnnode})
    is a warning that explains when that is expected and when it is not.
    """
    observer, stream = open_client_log(tmp_path, "1-1.0")
    with stream:
        for number in range(3):
            observer(
                {
                    "log_namespace": PIECE_NAMESPACE,
                    "log_level": LogLevel.info,
                    "log_format": "downloading piece: {piece}",
                    "log_time": 1.0,
                    "piece": {
                        "taskID": "ab" * 32,
                        "superNode": "127.0.0.1:8002",
                        "dstCid": "cdnnode:127.0.0.1~" + "ab" * 32,
                        "dstAddr": "127.0.0.1:8001",
                        "range": "0-1023",
                        "result": 503,
                        "status": 701,
                        "pieceSize": 1024,
                        "pieceNum": number,
                        "cost": 0.001,
                    },
                }
            )
    assert doctor.recent_tasks(tmp_path / "logs" / "dfclient.log", 5) == [
        {"peers": 0, "supernode": 3072, "source": 0}
    ]
    (finding,) = doctor.check_recent(tmp_path, 5)
    assert finding.status == "WARN"
    assert "3.0 KiB (100%) from the supernode" in finding.message
    assert "nothing came from other peers" in finding.message


def test_dfget_help_names_the_doctor_and_preheat_commands() -> None:
    """
    The two sub-commands are found from plain C{dfget --help}.
    """
    text = " ".join(dfget.parser().format_help().split())
    assert "'dfget doctor' checks this host's set-up" in text
    assert "'dfget preheat' fills the supernode's cache" in text
