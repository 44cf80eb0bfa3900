"""
Configuration files: C{--config} for the twistd plugins and C{dfget.yml}
for dfget; what a file may say, how its mistakes are reported, and that
flags win over the file, which wins over the defaults.
"""

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from loopback import Processes, child_env, free_port, twistd_cmd, wait_for_ping
from twisted.python import usage

from dragonfly import dfget as dfget_cli
from dragonfly.config import ConfigOptions
from dragonfly.peer import tap as peer_tap
from dragonfly.peer.supernode_client import Node
from dragonfly.supernode import tap as supernode_tap


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _supernode(*args: str) -> supernode_tap.Options:
    options = supernode_tap.Options()
    options.parseOptions(list(args))
    return options


def _dfpeer(*args: str) -> peer_tap.Options:
    options = peer_tap.Options()
    options.parseOptions(list(args))
    return options


def test_a_good_file_sets_every_kind_of_option(tmp_path: Path) -> None:
    """
    Numbers, ports, sizes, durations, addresses and strings from the file
    go through the flags' own conversions; dashes and underscores in keys
    are the same.
    """
    config = _write(
        tmp_path / "supernode.yml",
        "port: 18002\n"
        "download_port: 18001\n"
        "listen-ip: 127.0.0.1\n"
        "cache-limit: 2G\n"
        "task-expire: 10m\n"
        "peer-expire: 90\n"
        "piece-size: 1M\n"
        f"home: {tmp_path / 'home'}\n",
    )
    options = _supernode("--config", str(config))
    assert options["port"] == 18002
    assert options["download-port"] == 18001
    assert options["listen-ip"] == "127.0.0.1"
    assert options["advertise-ip"] == "127.0.0.1"
    assert options["cache-limit"] == 2 << 30
    assert options["task-expire"] == 600.0
    assert options["peer-expire"] == 90.0
    assert options["piece-size"] == 1 << 20
    assert options["home"] == str(tmp_path / "home")


def test_flags_win_over_the_file_which_wins_over_defaults(tmp_path: Path) -> None:
    """
    An option on the command line keeps its value whatever the file says;
    one only in the file takes the file's value; one in neither keeps its
    default.
    """
    config = _write(tmp_path / "s.yml", "port: 18002\ndownload-port: 18001\n")
    options = _supernode("--config", str(config), "--port", "9000")
    assert options["port"] == 9000
    assert options["download-port"] == 18001
    assert options["peer-up-limit"] == 5
    # The order on the command line does not matter.
    options = _supernode("-p", "9001", f"--config={config}")
    assert options["port"] == 9001


def test_unknown_key_is_named_with_close_matches(tmp_path: Path) -> None:
    """
    A misspelt key is a usage error naming the file and the key, with the
    known keys it resembles.
    """
    config = _write(tmp_path / "dfpeer.yml", "regsitry: http://127.0.0.1:5000\n")
    with pytest.raises(usage.UsageError) as caught:
        _dfpeer("--config", str(config))
    message = str(caught.value)
    assert "dfpeer.yml: unknown key 'regsitry'" in message
    assert "did you mean 'registry'" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("port: abc\n", "s.yml: port: expected an integer, got 'abc'"),
        ("port: 70000\n", "s.yml: port: 70000 is not a port number"),
        ("port: [1, 2]\n", "s.yml: port: expected a string or a number, got a list"),
        ("port: true\n", "s.yml: port: expected a string or a number, got a boolean"),
        ("port:\n", "s.yml: port: expected a string or a number, got nothing"),
        ("listen-ip: localhost\n", "s.yml: listen-ip: 'localhost' is not an IPv4"),
        ("cache-limit: lots\n", "s.yml: cache-limit: not a size: 'lots'"),
        ("task-expire: {a: 1}\n", "s.yml: task-expire: expected a string or a"),
        ("port: 1\nport: 3\n", "s.yml: not valid YAML: 'port' is given twice"),
        ("- port\n", "s.yml: expected a mapping of option names to values"),
        ("port: 1\nhelp: true\n", "s.yml: unknown key 'help'"),
        ("download-port: 1\ndownload_port: 2\n", "s.yml: download-port is given"),
        ("port: [\n", "s.yml: not valid YAML"),
    ],
)
def test_bad_values_are_usage_errors_naming_file_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    """
    A value the flag would refuse, or of the wrong shape, is a usage error
    that says which file, which key and what was expected.
    """
    config = _write(tmp_path / "s.yml", text)
    with pytest.raises(usage.UsageError) as caught:
        _supernode("--config", str(config))
    assert expected in str(caught.value)


def test_checks_across_options_see_file_values(tmp_path: Path) -> None:
    """
    The plugin's own checks run after the file is applied, so they apply
    to values from the file too.
    """
    config = _write(tmp_path / "s.yml", "piece-size: 1K\n")
    with pytest.raises(usage.UsageError, match="--piece-size must be between"):
        _supernode("--config", str(config))


def test_repeatable_and_comma_separated_options_take_lists(tmp_path: Path) -> None:
    """
    C{proxy-rule} (repeatable) and C{node} and C{allow-registry}
    (comma-separated) take YAML lists; a repeatable option given on the
    command line replaces the file's list.
    """
    config = _write(
        tmp_path / "dfpeer.yml",
        "node: [127.0.0.1:8002, '127.0.0.2:9002']\n"
        "allow-registry:\n"
        "  - http://127.0.0.1:5000\n"
        "  - https://127.0.0.2:5001\n"
        "proxy-rule:\n"
        "  - '^http://127\\.0\\.0\\.1:8080/.*\\.iso$'\n"
        "  - 'blobs/sha256'\n",
    )
    options = _dfpeer("--config", str(config))
    assert options["nodes"] == [Node("127.0.0.1", 8002), Node("127.0.0.2", 9002)]
    assert options["allowed"] == ["http://127.0.0.1:5000", "https://127.0.0.2:5001"]
    assert options["proxy-rules"] == [
        r"^http://127\.0\.0\.1:8080/.*\.iso$",
        "blobs/sha256",
    ]

    options = _dfpeer("--config", str(config), "--proxy-rule", "x", "-n", "127.0.0.3")
    assert options["proxy-rules"] == ["x"]
    assert options["nodes"] == [Node("127.0.0.3", 8002)]
    # One value for a repeatable option needs no list.
    single = _write(tmp_path / "one.yml", "proxy-rule: '\\.tar$'\n")
    assert _dfpeer("--config", str(single))["proxy-rules"] == [r"\.tar$"]


def test_bad_item_of_a_repeatable_option(tmp_path: Path) -> None:
    """
    A bad regular expression in the list is refused as C{--proxy-rule} would
    refuse it.
    """
    config = _write(tmp_path / "p.yml", "proxy-rule: ['ok', '(']\n")
    with pytest.raises(usage.UsageError) as caught:
        _dfpeer("--config", str(config))
    assert "p.yml: proxy-rule: '(': missing )" in str(caught.value)


def test_default_file_and_missing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The system file is read when it exists and no C{--config} is given;
    C{--config=} skips it; a C{--config} that does not exist is an error,
    a missing system file is not.
    """
    system = _write(tmp_path / "supernode.yml", "peer-up-limit: 9\n")
    monkeypatch.setattr(supernode_tap.Options, "config_default", str(system))
    assert _supernode()["peer-up-limit"] == 9
    assert _supernode("--config=")["peer-up-limit"] == 5
    with pytest.raises(usage.UsageError, match=r"--config nothere\.yml: no such file"):
        _supernode("--config", "nothere.yml")
    system.unlink()
    assert _supernode()["peer-up-limit"] == 5


def test_options_added_later_get_keys(tmp_path: Path) -> None:
    """
    Keys come from the options class: a parameter, flag or handler added
    by a subclass is settable from the file with no list to update.
    """

    class Later(ConfigOptions):
        optParameters = [["low-watermark", None, 10, "", int]]
        optFlags = [["dry-run", None, ""]]

        def __init__(self) -> None:
            super().__init__()
            self["tags"] = []

        def opt_tag(self, value: str) -> None:
            self["tags"].append(value)

    config = _write(
        tmp_path / "later.yml", "low_watermark: 20\ndry-run: true\ntag: [a, b]\n"
    )
    options = Later()
    options.parseOptions(["--config", str(config)])
    assert options["low-watermark"] == 20
    assert options["dry-run"] == 1
    assert options["tags"] == ["a", "b"]
    assert options.option_names() == ["dry-run", "low-watermark", "tag"]
    _write(config, "dry-run: 'yes'\n")
    with pytest.raises(usage.UsageError, match="dry-run: expected true or false"):
        Later().parseOptions(["--config", str(config)])


# dfget -----------------------------------------------------------------------


def _dfget(args: list[str]) -> Any:
    return dfget_cli.parse_args(["-u", "http://127.0.0.1:9/f", "-o", "out", *args])


def test_dfget_reads_defaults_from_its_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    C{<home>/dfget.yml} (home from C{--home} or C{$DFGET_HOME}) gives
    C{dfget} its nodes, limits and flags; flags on the command line win, a
    repeated flag replacing the file's list.
    """
    monkeypatch.delenv("DFGET_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    _write(
        home / "dfget.yml",
        "node: [127.0.0.5:8002, 127.0.0.6]\n"
        "totallimit: 20M\n"
        "locallimit: 1M\n"
        "port: 15000\n"
        "notbs: true\n"
        "header: ['X-A: 1', 'X-B: 2']\n"
        "stall_timeout: 5s\n",
    )
    args = _dfget(["--home", str(home)])
    assert args.nodes == [Node("127.0.0.5", 8002), Node("127.0.0.6", 8002)]
    assert args.totallimit == 20 << 20
    assert args.locallimit == 1 << 20
    assert args.port == 15000
    assert args.notbs is True
    assert args.header == [("X-A", "1"), ("X-B", "2")]
    assert args.stall_timeout == 5.0
    assert args.uploadlimit == 0

    args = _dfget(["--home", str(home), "-n", "127.0.0.7", "--totallimit", "1K"])
    assert args.nodes == [Node("127.0.0.7", 8002)]
    assert args.totallimit == 1024
    assert args.locallimit == 1 << 20

    monkeypatch.setenv("DFGET_HOME", str(home))
    assert _dfget([]).port == 15000


def test_dfget_config_flag_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    C{--config} and C{$DFGET_CONFIG} name the file instead (empty: none); a
    named file that does not exist is a usage error.
    """
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    _write(home / "dfget.yml", "port: 15000\n")
    other = _write(tmp_path / "other.yml", "port: 16000\n")
    monkeypatch.setenv("DFGET_CONFIG", str(other))
    assert _dfget(["--home", str(home)]).port == 16000
    monkeypatch.delenv("DFGET_CONFIG")
    assert _dfget(["--home", str(home), "--config", str(other)]).port == 16000
    assert _dfget(["--home", str(home), "--config", ""]).port == 0
    with pytest.raises(SystemExit) as caught:
        _dfget(["--home", str(home), "--config", str(tmp_path / "none.yml")])
    assert caught.value.code == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nodes: 127.0.0.1\n", "unknown key 'nodes' (did you mean 'node'"),
        ("port: abc\n", "port: expected an integer, got 'abc'"),
        ("totallimit: fast\n", "totallimit: not a size: 'fast'"),
        ("notbs: 1\n", "notbs: expected true or false, got 1"),
        ("url: http://127.0.0.1/x\n", "unknown key 'url'"),
    ],
)
def test_dfget_bad_config_exits_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    expected: str,
) -> None:
    """
    A bad key or value in dfget's file is a usage error (exit code 2)
    naming the file and the key.
    """
    monkeypatch.chdir(tmp_path)
    config = _write(tmp_path / "dfget.yml", text)
    with pytest.raises(SystemExit) as caught:
        _dfget(["--config", str(config)])
    assert caught.value.code == 2
    assert f"{config}: {expected}" in capsys.readouterr().err


# twistd ----------------------------------------------------------------------


@pytest.mark.loopback
def test_twistd_supernode_listens_on_the_config_file_port(
    processes: Processes, work: Path
) -> None:
    """
    C{twistd supernode --config FILE} takes its ports, address and home
    from the file: the API answers on the file's port.
    """
    api_port, piece_port = free_port(), free_port()
    config = _write(
        work / "supernode.yml",
        f"port: {api_port}\n"
        f"download-port: {piece_port}\n"
        "listen-ip: 127.0.0.1\n"
        f"home: {work / 'home'}\n",
    )
    log = work / "supernode.log"
    proc = processes.popen(
        [
            *twistd_cmd(),
            "-n",
            "--pidfile=",
            "-l",
            str(log),
            "supernode",
            "--config",
            str(config),
        ],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=child_env(),
    )
    wait_for_ping(f"http://127.0.0.1:{api_port}/_ping", proc, log)
    assert (work / "home").is_dir()


def test_the_documented_examples_are_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The three complete examples in docs/config.md are accepted as they are
    written, so the documentation cannot drift from the options.
    """
    docs = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    blocks = re.findall(r"```yaml\n(.*?)```", docs.read_text(), re.DOTALL)
    examples = {b.split(":", 1)[0].rsplit("/", 1)[-1]: b for b in blocks}
    assert set(examples) == {"supernode.yml", "dfpeer.yml", "dfget.yml"}
    # Every key is in its example ("every key, with its default"), commented
    # out or not.
    written = {
        name: set(re.findall(r"^#? ?([a-z][a-z0-9-]*):", block, re.MULTILINE))
        for name, block in examples.items()
    }
    for name, options_class in (
        ("supernode.yml", supernode_tap.Options),
        ("dfpeer.yml", peer_tap.Options),
    ):
        keys = {p[0] for p in options_class.optParameters} | {
            f[0] for f in getattr(options_class, "optFlags", [])
        }
        assert keys - {"config", "help", "version"} <= written[name], name
    options = _supernode(
        "--config", str(_write(tmp_path / "s.yml", examples["supernode.yml"]))
    )
    assert options["advertise-ip"] == "10.0.0.5"
    options = _dfpeer(
        "--config", str(_write(tmp_path / "p.yml", examples["dfpeer.yml"]))
    )
    assert len(options["nodes"]) == 2
    assert len(options["proxy-rules"]) == 1
    monkeypatch.chdir(tmp_path)
    args = _dfget(["--config", str(_write(tmp_path / "d.yml", examples["dfget.yml"]))])
    assert args.totallimit == 50 << 20
    assert len(args.nodes) == 2
