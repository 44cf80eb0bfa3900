"""
A real registry on loopback and skopeo as its client: Debian's
C{docker-registry} (the CNCF distribution registry) started with a generated
config and its access log on, images from L{dragonfly.devtools.oci} pushed
to it with C{skopeo copy}, and pulls through a registry mirror with
C{skopeo --registries-conf FILE copy docker://... dir:OUT}.

Docker Hub can never be reached from the clients started here: they run with
C{HTTP(S)_PROXY} pointing at a closed loopback port (L{client_env}), and Go
(skopeo, like every container client) never proxies loopback addresses, so
a mirror on 127.0.0.0/8 is reached directly while any fall-back to
C{registry-1.docker.io} fails at once.

Every process started here is waited for with a bound, and one that does not
come up is ended by its PID before the error is raised; a running
L{Registry} is ended with L{Registry.stop}.  The caller decides how processes
are started (C{popen}), so that a test suite can track them.
"""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dragonfly.devtools.oci import (
    ACCEPT_ALL,
    Image,
    ImageIndex,
    ImageLayout,
    digest_of,
    file_digest,
)
from dragonfly.devtools.processes import free_port, stop_process

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PULL_TIMEOUT = 180.0
COMMAND_TIMEOUT = 60.0

# Any request that is not for loopback goes to this closed port and fails at
# once (no DNS, no waiting): see L{client_env}.
NO_ROUTE_PROXY = "http://127.0.0.1:9"

Popen = Callable[..., "subprocess.Popen[Any]"]


class ToolMissing(RuntimeError):
    """
    A system tool (C{docker-registry}, C{skopeo}) is not installed.
    """


class CommandFailed(RuntimeError):
    """
    A command exited with a non-zero status.
    """


class RegistryError(RuntimeError):
    """
    The registry would not start, or does not serve what was pushed.
    """


class DigestMismatch(RuntimeError):
    """
    A pulled blob's bytes do not match its digest.
    """


# Tools and processes ---------------------------------------------------------


def find_tool(name: str) -> str | None:
    """
    The path of the system tool C{name}, or None.  Debian's packages come
    first: a docker CLI of another version may sit in /usr/local/bin.
    """
    return shutil.which(name, path="/usr/bin:/usr/sbin:/bin:/sbin") or shutil.which(
        name
    )


def require_tool(name: str) -> str:
    """
    The path of the system tool C{name}; L{ToolMissing} when it is not
    installed (C{scripts/install-system-deps} installs it).
    """
    found = find_tool(name)
    if found is None:
        raise ToolMissing(
            f"{name} is not installed (run scripts/install-system-deps as root)"
        )
    return found


def client_env(directory: Path | None = None) -> dict[str, str]:
    """
    The environment for client tools and daemons: proxies that make every
    non-loopback request fail at once, and C{TMPDIR} inside C{directory}.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DFGET_HOME", None)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = NO_ROUTE_PROXY
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(name, None)
    if directory is not None:
        tmp = directory / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
    return env


def run(
    args: Sequence[str],
    *,
    timeout: float = COMMAND_TIMEOUT,
    env: dict[str, str] | None = None,
    check: bool = True,
    cwd: Path | None = None,
) -> "subprocess.CompletedProcess[str]":
    """
    Run a command to completion, bounded by C{timeout} (on timeout, and on
    any error while waiting, C{subprocess.run} kills it).  With C{check}, a
    non-zero exit raises L{CommandFailed} with the command's output.
    """
    result = subprocess.run(
        list(args),
        env=env if env is not None else client_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise CommandFailed(
            f"{' '.join(args)} exited with {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def tail(path: Path, lines: int = 40) -> str:
    """
    The last C{lines} lines of a log, for error messages.
    """
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# The access log --------------------------------------------------------------

_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) '
    r'(?P<uri>\S+) [^"]*" (?P<status>\d{3}) (?P<size>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)
_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$")


@dataclass(frozen=True)
class Access:
    """
    One line of the registry's access log (Apache combined format).
    """

    remote: str
    method: str
    path: str
    query: str
    status: int
    size: int
    agent: str

    @property
    def blob(self) -> str | None:
        match = _BLOB_PATH.match(self.path)
        return match["digest"] if match else None

    @property
    def manifest(self) -> str | None:
        match = _MANIFEST_PATH.match(self.path)
        return match["reference"] if match else None

    @property
    def repository(self) -> str | None:
        match = _BLOB_PATH.match(self.path) or _MANIFEST_PATH.match(self.path)
        return match["name"] if match else None


def parse_access_log(text: str) -> list[Access]:
    """
    The requests of an access log; lines of any other kind are skipped.
    """
    entries = []
    for line in text.splitlines():
        match = _ACCESS_LINE.match(line)
        if match is None:
            continue
        path, _, query = match["uri"].partition("?")
        entries.append(
            Access(
                match["remote"],
                match["method"],
                path,
                query,
                int(match["status"]),
                0 if match["size"] == "-" else int(match["size"]),
                match["agent"] or "",
            )
        )
    return entries


def _blob_sent(entry: Access) -> str | None:
    if entry.method == "GET" and entry.status in (200, 206):
        return entry.blob
    return None


def blob_bytes(entries: Sequence[Access]) -> dict[str, int]:
    """
    Bytes of each blob sent by successful GETs (200 and 206).
    """
    sent: Counter[str] = Counter()
    for entry in entries:
        if digest := _blob_sent(entry):
            sent[digest] += entry.size
    return dict(sent)


def blob_gets(entries: Sequence[Access]) -> Counter[str]:
    """
    How many successful GETs each blob had.
    """
    return Counter(digest for entry in entries if (digest := _blob_sent(entry)))


# The registry ----------------------------------------------------------------


@dataclass
class Registry:
    """
    A running C{docker-registry serve}: plain HTTP on C{host:port}, no
    auth, storage under C{storage}; its access log (one Apache combined line
    per request, with the bytes sent) is its stdout, in C{access_log}.
    """

    proc: "subprocess.Popen[Any]"
    directory: Path
    host: str
    port: int
    storage: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def error_log(self) -> Path:
        return self.directory / "registry.log"

    def accesses(self) -> list[Access]:
        try:
            return parse_access_log(self.access_log.read_text(errors="replace"))
        except FileNotFoundError:
            return []

    def mark(self) -> int:
        """
        The number of access-log entries so far: pass it to L{since}.
        """
        return len(self.accesses())

    def since(self, mark: int) -> list[Access]:
        return self.accesses()[mark:]

    def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """
        Wait (at most C{timeout}) until the access log has not grown for
        C{quiet} seconds: a line is written once its response is complete,
        which may be a moment after the client has what it asked for.
        """
        deadline = time.monotonic() + timeout
        last = -1
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            size = self.access_log.stat().st_size if self.access_log.exists() else 0
            if size != last:
                last, stable_since = size, time.monotonic()
            elif time.monotonic() - stable_since >= quiet:
                return
            time.sleep(0.05)

    def blob_bytes(self, mark: int = 0) -> dict[str, int]:
        return blob_bytes(self.since(mark))

    def blob_gets(self, mark: int = 0) -> Counter[str]:
        return blob_gets(self.since(mark))

    def manifest(
        self, name: str, reference: str, accept: str = ACCEPT_ALL
    ) -> tuple[str, str, bytes]:
        """
        GET a manifest: its C{Docker-Content-Digest}, content type and bytes.
        """
        request = urllib.request.Request(
            f"{self.url}/v2/{name}/manifests/{reference}", headers={"Accept": accept}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return (
                response.headers["Docker-Content-Digest"],
                response.headers["Content-Type"],
                response.read(),
            )

    def stop(self) -> int:
        return stop_process(self.proc)


def registry_config(host: str, port: int, storage: Path) -> str:
    """
    The registry's config.yml: filesystem storage, access log on, no
    redirects, plain HTTP on C{host:port}.
    """
    return (
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "  accesslog:\n"
        "    disabled: false\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {storage}\n"
        "  delete:\n"
        "    enabled: true\n"
        "  redirect:\n"
        "    disable: true\n"
        "http:\n"
        f"  addr: {host}:{port}\n"
        "  headers:\n"
        "    X-Content-Type-Options: [nosniff]\n"
    )


def start_registry(
    directory: Path,
    host: str = "127.0.0.1",
    *,
    storage: Path | None = None,
    popen: Popen = subprocess.Popen,
) -> Registry:
    """
    Start C{docker-registry serve} on a free port of C{host} (loopback) with
    C{popen}, and wait (at most L{START_TIMEOUT}) until C{/v2/} answers.
    Its storage is C{directory/storage}, or C{storage} (e.g. another
    registry's L{Registry.storage}, to serve the same images on another
    address with an access log of its own).  Raises L{ToolMissing} or
    L{RegistryError}; a registry that did not come up has been stopped.
    """
    binary = require_tool("docker-registry")
    directory.mkdir(parents=True, exist_ok=True)
    storage = storage or directory / "storage"
    port = free_port(host)
    config = directory / "config.yml"
    config.write_text(registry_config(host, port, storage))
    with (
        (directory / "access.log").open("wb") as out,
        (directory / "registry.log").open("wb") as err,
    ):
        proc = popen(
            [binary, "serve", str(config)],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=directory,
        )
    registry = Registry(proc, directory, host, port, storage)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                raise RegistryError(
                    f"docker-registry exited with {proc.returncode}:\n"
                    + tail(registry.error_log)
                )
            try:
                with urllib.request.urlopen(f"{registry.url}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return registry
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"docker-registry did not answer on {registry.url}:\n"
                    + tail(registry.error_log)
                )
            time.sleep(0.1)
    except BaseException:
        stop_process(proc)
        raise


def push(
    layout: ImageLayout,
    tag: str,
    registry: Registry,
    repository: str,
    target: Image | ImageIndex,
    *,
    timeout: float = PULL_TIMEOUT,
) -> str:
    """
    Push C{target} (tagged C{tag} in C{layout}) to C{registry} as
    C{repository:tag} with C{skopeo copy --all --preserve-digests} from a
    C{dir:} view of the layout, and check that the registry now serves
    exactly that manifest (L{RegistryError} if not).  Returns the reference
    C{HOST:PORT/REPOSITORY:TAG}.
    """
    skopeo = require_tool("skopeo")
    layout.tag(tag, target)
    source = f"dir:{layout.dir_view(target)}"
    destination = f"{registry.address}/{repository}:{tag}"
    run(
        [
            skopeo,
            "--insecure-policy",
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            source,
            f"docker://{destination}",
        ],
        timeout=timeout,
        env=client_env(layout.path),
    )
    digest, content_type, _ = registry.manifest(repository, tag)
    if (digest, content_type) != (target.digest, target.manifest.media_type):
        raise RegistryError(
            f"the registry serves {digest} ({content_type}) as {repository}:{tag}, "
            f"not the {target.digest} ({target.manifest.media_type}) built"
        )
    return destination


# skopeo through a mirror -----------------------------------------------------


def write_registries_conf(
    path: Path, mirror: str, *, prefix: str = "docker.io", insecure: bool = True
) -> Path:
    """
    A containers-registries.conf(5) mirroring C{prefix} to C{mirror}
    (C{HOST:PORT}, plain HTTP when C{insecure}), with no unqualified-search
    registries and no mirror-by-digest-only restriction.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "unqualified-search-registries = []\n"
        'short-name-mode = "disabled"\n'
        "\n"
        "[[registry]]\n"
        f'prefix = "{prefix}"\n'
        f'location = "{prefix}"\n'
        "\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror}"\n'
        f"insecure = {'true' if insecure else 'false'}\n"
    )
    return path


def containers_env(directory: Path, registries_conf: Path) -> dict[str, str]:
    """
    The environment for podman and skopeo: L{client_env}, our
    registries.conf and no other (C{CONTAINERS_REGISTRIES_CONF}), and a
    containers.conf of our own in C{directory}.
    """
    env = client_env(directory)
    env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)
    conf = directory / "containers.conf"
    if not conf.exists():
        conf.write_text(
            "[engine]\n"
            'events_logger = "file"\n'
            f'events_logfile_path = "{directory / "events.log"}"\n'
            'cgroup_manager = "cgroupfs"\n'
        )
    env["CONTAINERS_CONF"] = str(conf)
    return env


@dataclass(frozen=True)
class SkopeoPull:
    """
    How to run one C{skopeo copy docker://REFERENCE dir:TARGET} through a
    mirror: its command line and environment (start it with your own
    C{popen}, or L{skopeo_pull}), and where the image lands.
    """

    args: list[str]
    env: dict[str, str]
    target: Path


def skopeo_pull_command(
    reference: str,
    directory: Path,
    mirror: str,
    *,
    architecture: str = "amd64",
) -> SkopeoPull:
    """
    The C{skopeo copy} of C{reference} (a Docker Hub name) into
    C{directory/image} through C{mirror} (C{HOST:PORT}, plain HTTP, from a
    registries.conf written in C{directory}), picking C{architecture} from
    a list.  An earlier C{directory/image} is removed.
    """
    skopeo = require_tool("skopeo")
    directory.mkdir(parents=True, exist_ok=True)
    conf = write_registries_conf(directory / "registries.conf", mirror)
    target = directory / "image"
    shutil.rmtree(target, ignore_errors=True)
    args = [
        skopeo,
        "--insecure-policy",
        "--registries-conf",
        str(conf),
        "--override-arch",
        architecture,
        "--override-os",
        "linux",
        "copy",
        f"docker://{reference}",
        f"dir:{target}",
    ]
    return SkopeoPull(args, containers_env(directory, conf), target)


@dataclass
class PulledDir:
    """
    An image skopeo wrote to a C{dir:} directory: the manifest as it was
    served, the config and layer digests it names, and the digests of every
    blob there, each checked against its file's sha256.
    """

    manifest: bytes
    config_digest: str
    layers: list[str]
    content: set[str] = field(default_factory=set)
    seconds: float = 0.0


def read_pulled_dir(target: Path) -> PulledDir:
    """
    Read and check a C{dir:} directory: every blob's sha256 must match its
    name (L{DigestMismatch} if not).
    """
    manifest_bytes = (target / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    content = {digest_of(manifest_bytes)}
    for blob in target.iterdir():
        if re.fullmatch(r"[0-9a-f]{64}", blob.name):
            digest = file_digest(blob)
            if digest != "sha256:" + blob.name:
                raise DigestMismatch(f"{blob} has digest {digest}")
            content.add(digest)
    return PulledDir(
        manifest_bytes,
        manifest["config"]["digest"],
        [layer["digest"] for layer in manifest["layers"]],
        content,
    )


def skopeo_pull(
    reference: str,
    directory: Path,
    mirror: str,
    *,
    architecture: str = "amd64",
    timeout: float = PULL_TIMEOUT,
) -> PulledDir:
    """
    Pull C{reference} through C{mirror} with L{skopeo_pull_command},
    bounded by C{timeout}, and check what arrived (L{read_pulled_dir}).
    """
    command = skopeo_pull_command(
        reference, directory, mirror, architecture=architecture
    )
    started = time.monotonic()
    run(command.args, timeout=timeout, env=command.env)
    pulled = read_pulled_dir(command.target)
    pulled.seconds = time.monotonic() - started
    return pulled


def skopeo_inspect_raw(
    reference: str, directory: Path, mirror: str, *, timeout: float = COMMAND_TIMEOUT
) -> bytes:
    """
    C{skopeo inspect --raw docker://REFERENCE} through C{mirror}: the
    manifest bytes as served.
    """
    skopeo = require_tool("skopeo")
    directory.mkdir(parents=True, exist_ok=True)
    conf = write_registries_conf(directory / "registries.conf", mirror)
    result = subprocess.run(
        [
            skopeo,
            "--insecure-policy",
            "--registries-conf",
            str(conf),
            "inspect",
            "--raw",
            f"docker://{reference}",
        ],
        env=containers_env(directory, conf),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise CommandFailed(result.stderr.decode(errors="replace"))
    return result.stdout
