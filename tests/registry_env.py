"""
Machinery for the registry-mirror end-to-end tests: a real upstream
registry (Debian's C{docker-registry}, the CNCF distribution registry) on
loopback, container images built offline in Python and pushed with
C{skopeo}, and real clients (dockerd, containerd's C{ctr}, podman, skopeo)
pulling through a given mirror URL, each reporting the digests it pulled.

The images and the registry come from the package
(L{dragonfly.devtools.oci}, L{dragonfly.devtools.registry}), which the demo
uses too; this module adds what only the tests need: skipping when a tool
is missing, tracking processes in a L{loopback.Processes}, and the daemons
(dockerd, containerd) and podman.

Every process started here is tracked by PID in a L{loopback.Processes} and
ended (SIGTERM, then SIGKILL after a bounded wait) when its test ends,
whether it passed or not.  Only loopback addresses (127.0.0.0/8) are used.

Docker Hub can never be reached from these clients: each runs with
C{HTTP(S)_PROXY} pointing at a closed loopback port, and Go (every client
here) never proxies loopback addresses, so the mirror is reached directly
while any fall-back to C{registry-1.docker.io} fails at once.  Tests should
still assert that the blobs went through the mirror (L{Registry.blob_gets}
on the upstream, or the mirror's own records).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from loopback import Processes, stop_process

from dragonfly.devtools import registry as _registry
from dragonfly.devtools.oci import (
    ACCEPT_ALL,
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MEDIA_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    REF_NAME,
    Blob,
    Image,
    ImageIndex,
    ImageLayout,
    Layer,
    canonical_json,
    digest_of,
    file_digest,
)
from dragonfly.devtools.registry import (
    COMMAND_TIMEOUT,
    NO_ROUTE_PROXY,
    PULL_TIMEOUT,
    START_TIMEOUT,
    Access,
    Registry,
    blob_bytes,
    blob_gets,
    client_env,
    containers_env,
    parse_access_log,
    registry_config,
    run,
    tail,
    write_registries_conf,
)

__all__ = [
    "ACCEPT_ALL",
    "COMMAND_TIMEOUT",
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "MEDIA_TYPES",
    "NO_ROUTE_PROXY",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_MANIFEST",
    "PULL_TIMEOUT",
    "REF_NAME",
    "START_TIMEOUT",
    "Access",
    "Blob",
    "Containerd",
    "Dockerd",
    "Image",
    "ImageIndex",
    "ImageLayout",
    "Layer",
    "Podman",
    "Pulled",
    "Registry",
    "blob_bytes",
    "blob_gets",
    "canonical_json",
    "client_env",
    "containers_env",
    "digest_of",
    "file_digest",
    "make_podman",
    "normalize_reference",
    "parse_access_log",
    "push",
    "registry_config",
    "run",
    "short_dir",
    "skopeo_inspect_raw",
    "skopeo_pull",
    "start_containerd",
    "start_dockerd",
    "start_registry",
    "tail",
    "write_hosts_dir",
    "write_registries_conf",
]


# Tools -----------------------------------------------------------------------


def require_tool(name: str) -> str:
    """
    The path of the system tool C{name}.  When it is missing the test is
    skipped (it comes from C{scripts/install-system-deps}), except in CI,
    which installs it, where a missing tool fails the test instead.
    """
    found = _registry.find_tool(name)
    if found is None:
        reason = f"{name} is not installed (run scripts/install-system-deps as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (these tests run as root)")


@contextlib.contextmanager
def short_dir(prefix: str) -> Iterator[Path]:
    """
    A short-named directory under /tmp for unix sockets (whose paths are
    limited to 107 bytes, less than pytest's temporary paths may need).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)


def unmount_under(path: Path) -> None:
    """
    Lazily unmount whatever is still mounted under C{path} (a daemon that
    had to be killed may leave its overlay or shm mounts), deepest first.
    """
    prefix = str(path.resolve())
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    points = []
    for line in mounts:
        fields = line.split()
        if len(fields) < 2:
            continue
        point = fields[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(
            ["umount", "-l", point],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )


def remove_tree(path: Path) -> None:
    unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def kill_pidfile(pidfile: Path, timeout: float = 10.0) -> None:
    """
    End the process named in C{pidfile}, if there is one.  For the
    children our daemons start (dockerd's own containerd) when the daemon
    had to be killed and could not end them itself.
    """
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return
            time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"
    except (OSError, IndexError):
        return True


# The upstream registry -------------------------------------------------------


def start_registry(
    processes: Processes,
    directory: Path,
    host: str = "127.0.0.1",
    *,
    storage: Path | None = None,
) -> Registry:
    """
    L{dragonfly.devtools.registry.start_registry}, skipped when
    C{docker-registry} is missing, its process tracked by C{processes}.
    """
    require_tool("docker-registry")
    return _registry.start_registry(
        directory, host, storage=storage, popen=processes.popen
    )


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
    L{dragonfly.devtools.registry.push}, skipped when skopeo is missing.
    """
    require_tool("skopeo")
    return _registry.push(layout, tag, registry, repository, target, timeout=timeout)


# What a client pulled -------------------------------------------------------


@dataclass
class Pulled:
    """
    What one client ended up with after a pull: the digest it recorded for
    the reference (the manifest list's or index's digest when the reference
    was one; None where the client doesn't keep it), the config digest
    (docker's image ID), the layers' compressed digests and their diff IDs,
    and every content digest the client stores (ctr, skopeo).
    """

    client: str
    reference: str
    manifest_digest: str | None
    config_digest: str | None
    layers: list[str]
    diff_ids: list[str] = field(default_factory=list)
    content: set[str] = field(default_factory=set)
    seconds: float = 0.0

    def check(self, image: Image, top: Image | ImageIndex | None = None) -> None:
        """
        Assert this pull got C{image} (the platform's image of C{top}, when
        C{top} is a list or index).
        """
        top = top or image
        assert self.layers == image.layer_digests, (self.client, self.layers, image)
        if self.diff_ids:
            assert self.diff_ids == image.diff_ids, (self.client, self.diff_ids)
        if self.config_digest is not None:
            assert self.config_digest == image.config.digest, (
                self.client,
                self.config_digest,
            )
        if self.manifest_digest is not None:
            assert self.manifest_digest == top.digest, (
                self.client,
                self.manifest_digest,
            )
        if self.content:
            missing = {image.digest, image.config.digest, *image.layer_digests}
            missing -= self.content
            assert not missing, (self.client, "did not store", missing)


# dockerd ---------------------------------------------------------------------

_storage_driver: str | None = None


@dataclass
class Dockerd:
    """
    A private dockerd: its own data root, exec root, socket and
    daemon.json (with C{registry-mirrors}); no iptables, bridge, forwarding
    or masquerading, so it touches nothing outside its directories.
    """

    proc: subprocess.Popen[Any]
    directory: Path
    run_dir: Path
    storage_driver: str
    env: dict[str, str]

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def data_root(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "dockerd.log"

    def docker(
        self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [require_tool("docker"), "-H", self.host, *args],
            timeout=timeout,
            env=self.env,
            check=check,
        )

    def pull(self, reference: str, timeout: float = PULL_TIMEOUT) -> Pulled:
        """
        C{docker pull REFERENCE}; the layers' compressed digests are read
        from the daemon's own records (v2metadata-by-diffid in its data
        root), the diff IDs and digests from C{docker image inspect}.
        """
        started = time.monotonic()
        self.docker("pull", "--quiet", reference, timeout=timeout)
        seconds = time.monotonic() - started
        return self.inspect(reference, seconds)

    def inspect(self, reference: str, seconds: float = 0.0) -> Pulled:
        info = json.loads(self.docker("image", "inspect", reference).stdout)[0]
        diff_ids = list(info["RootFS"]["Layers"])
        repo_digests = info.get("RepoDigests") or []
        manifest = repo_digests[0].split("@", 1)[1] if repo_digests else None
        return Pulled(
            "docker",
            reference,
            manifest,
            info["Id"],
            [self.layer_digest(diff_id) for diff_id in diff_ids],
            diff_ids,
            seconds=seconds,
        )

    def layer_digest(self, diff_id: str) -> str:
        path = (
            self.data_root
            / "image"
            / self.storage_driver
            / "distribution"
            / "v2metadata-by-diffid"
            / "sha256"
            / diff_id.split(":", 1)[1]
        )
        records = json.loads(path.read_text())
        digests = {record["Digest"] for record in records}
        assert len(digests) == 1, (diff_id, records)
        return digests.pop()

    def remove_image(self, reference: str) -> None:
        self.docker("image", "rm", "--force", reference, check=False)

    def stop(self) -> int:
        code = stop_process(self.proc, timeout=20.0)
        kill_pidfile(self.run_dir / "exec" / "containerd" / "containerd.pid")
        unmount_under(self.directory)
        unmount_under(self.run_dir)
        return code


def _start_dockerd_once(
    processes: Processes,
    directory: Path,
    run_dir: Path,
    mirrors: Sequence[str],
    storage_driver: str,
    daemon_config: dict[str, Any] | None,
) -> Dockerd | str:
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "registry-mirrors": list(mirrors),
        "max-concurrent-downloads": 3,
        **(daemon_config or {}),
    }
    (directory / "daemon.json").write_text(json.dumps(config, indent=2))
    env = client_env(directory)
    args = [
        require_tool("dockerd"),
        "--config-file",
        str(directory / "daemon.json"),
        "--data-root",
        str(directory / "data"),
        "--exec-root",
        str(run_dir / "exec"),
        "-H",
        f"unix://{run_dir / 'docker.sock'}",
        "--pidfile",
        str(run_dir / "docker.pid"),
        "--storage-driver",
        storage_driver,
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--ip-forward=false",
        "--ip-masq=false",
        "--userland-proxy=false",
    ]
    with open(directory / "dockerd.log", "ab") as out:
        proc = processes.popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    daemon = Dockerd(proc, directory, run_dir, storage_driver, env)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            daemon.stop()
            return f"dockerd exited with {proc.returncode}:\n" + tail(daemon.log)
        if daemon.socket.exists():
            result = daemon.docker(
                "version", "--format", "{{.Server.Version}}", check=False
            )
            if result.returncode == 0:
                return daemon
        time.sleep(0.2)
    daemon.stop()
    return f"dockerd did not answer within {START_TIMEOUT}s:\n" + tail(daemon.log)


def start_dockerd(
    processes: Processes,
    directory: Path,
    run_dir: Path,
    mirrors: Sequence[str],
    *,
    storage_driver: str | None = None,
    daemon_config: dict[str, Any] | None = None,
) -> Dockerd:
    """
    Start a private dockerd whose daemon.json has C{registry-mirrors}
    C{mirrors} (e.g. C{["http://127.0.0.2:PORT"]}).  C{run_dir} must have a
    short path (see L{short_dir}): the sockets live there.  Without a
    C{storage_driver}, overlay2 is tried first, then vfs (the first that
    works is remembered for the session).
    """
    global _storage_driver  # noqa: PLW0603
    require_root("dockerd")
    drivers = [storage_driver or _storage_driver or "overlay2"]
    if storage_driver is None and _storage_driver is None:
        drivers.append("vfs")
    failures = []
    for driver in drivers:
        started = _start_dockerd_once(
            processes, directory, run_dir, mirrors, driver, daemon_config
        )
        if isinstance(started, Dockerd):
            if storage_driver is None:
                _storage_driver = driver
            return started
        failures.append(f"--storage-driver {driver}: {started}")
        remove_tree(directory / "data")
    raise AssertionError("dockerd would not start:\n" + "\n".join(failures))


# containerd ------------------------------------------------------------------


def write_hosts_dir(
    directory: Path,
    mirror_url: str,
    *,
    registry_host: str = "docker.io",
    server: str | None = None,
) -> Path:
    """
    A C{ctr --hosts-dir} directory whose C{REGISTRY_HOST/hosts.toml} sends
    pulls (resolve and pull) of C{registry_host} to C{mirror_url}.
    """
    hosts_dir = directory / "certs.d"
    host_dir = hosts_dir / registry_host
    host_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    if server is not None:
        lines.append(f'server = "{server}"')
    lines += [
        "",
        f'[host."{mirror_url}"]',
        '  capabilities = ["pull", "resolve"]',
        "",
    ]
    (host_dir / "hosts.toml").write_text("\n".join(lines))
    return hosts_dir


@dataclass
class Containerd:
    """
    A private containerd: its own root, state, socket and config.toml (CRI
    disabled); pulls go through C{ctr --hosts-dir}.
    """

    proc: subprocess.Popen[Any]
    directory: Path
    run_dir: Path
    snapshotter: str
    env: dict[str, str]
    namespace: str = "dfly"

    @property
    def address(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.directory / "containerd.log"

    def ctr(
        self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [
                require_tool("ctr"),
                "--address",
                str(self.address),
                "--namespace",
                self.namespace,
                *args,
            ],
            timeout=timeout,
            env=self.env,
            check=check,
        )

    def pull(
        self,
        reference: str,
        hosts_dir: Path,
        *,
        platform: str = "linux/amd64",
        timeout: float = PULL_TIMEOUT,
    ) -> Pulled:
        """
        C{ctr images pull --hosts-dir HOSTS_DIR REFERENCE} for C{platform}
        (unpacked with the snapshotter); the image's layers and manifest
        are read back from containerd's content store.
        """
        started = time.monotonic()
        self.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts_dir),
            "--platform",
            platform,
            "--snapshotter",
            self.snapshotter,
            reference,
            timeout=timeout,
        )
        seconds = time.monotonic() - started
        return self.inspect(reference, platform, seconds)

    def content(self) -> set[str]:
        lines = self.ctr("content", "ls", "--quiet").stdout.split()
        return {line for line in lines if line.startswith("sha256:")}

    def read_content(self, digest: str) -> bytes:
        result = subprocess.run(
            [
                require_tool("ctr"),
                "--address",
                str(self.address),
                "--namespace",
                self.namespace,
                "content",
                "get",
                digest,
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=True,
        )
        return result.stdout

    def inspect(
        self, reference: str, platform: str = "linux/amd64", seconds: float = 0.0
    ) -> Pulled:
        images = self.ctr("images", "ls").stdout.splitlines()
        target = None
        for line in images[1:]:
            fields = line.split()
            if fields and fields[0] == normalize_reference(reference):
                target = fields[2]
        assert target is not None, (reference, images)
        content = self.content()
        manifest = json.loads(self.read_content(target))
        if "manifests" in manifest:
            os_name, arch = platform.split("/", 1)
            chosen = [
                m
                for m in manifest["manifests"]
                if m.get("platform", {}).get("os") == os_name
                and m.get("platform", {}).get("architecture") == arch
            ]
            assert len(chosen) == 1, manifest
            manifest = json.loads(self.read_content(chosen[0]["digest"]))
        layers = [layer["digest"] for layer in manifest["layers"]]
        for digest in [*layers, manifest["config"]["digest"]]:
            assert digest in content, (digest, "not in containerd's content store")
        return Pulled(
            "ctr",
            reference,
            target,
            manifest["config"]["digest"],
            layers,
            content=content,
            seconds=seconds,
        )

    def remove_image(self, reference: str) -> None:
        self.ctr("images", "rm", "--sync", normalize_reference(reference), check=False)

    def stop(self) -> int:
        code = stop_process(self.proc, timeout=20.0)
        unmount_under(self.directory)
        unmount_under(self.run_dir)
        return code


def _usable_snapshotter(daemon: Containerd) -> str:
    for line in daemon.ctr("plugins", "ls").stdout.splitlines():
        fields = line.split()
        if fields[:2] == ["io.containerd.snapshotter.v1", "overlayfs"]:
            return "overlayfs" if fields[-1] == "ok" else "native"
    return "native"


def normalize_reference(reference: str) -> str:
    """
    The fully qualified form of a Docker Hub style reference, as containerd
    names images (C{library/x:t} and C{x:t} become C{docker.io/library/x:t}).
    """
    first = reference.split("/", 1)[0]
    if "/" not in reference or (
        "." not in first and ":" not in first and first != "localhost"
    ):
        if "/" not in reference:
            reference = f"library/{reference}"
        reference = f"docker.io/{reference}"
    name = reference.rsplit("/", 1)[-1]
    if ":" not in name and "@" not in name:
        reference += ":latest"
    return reference


def start_containerd(
    processes: Processes,
    directory: Path,
    run_dir: Path,
    *,
    snapshotter: str | None = None,
) -> Containerd:
    """
    Start a private containerd (C{run_dir}: short, for its sockets).
    Without a C{snapshotter}, overlayfs is used when containerd says it
    works here, else native.
    """
    require_root("containerd")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{directory / "root"}"\n'
        f'state = "{run_dir / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{run_dir / "containerd.sock"}"\n'
        "[ttrpc]\n"
        f'  address = "{run_dir / "containerd.sock.ttrpc"}"\n'
        "[debug]\n"
        f'  address = ""\n'
        "[metrics]\n"
        '  address = ""\n'
    )
    env = client_env(directory)
    with open(directory / "containerd.log", "ab") as out:
        proc = processes.popen(
            [require_tool("containerd"), "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    daemon = Containerd(proc, directory, run_dir, snapshotter or "overlayfs", env)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"containerd exited with {proc.returncode}:\n" + tail(daemon.log)
            )
        if (
            daemon.address.exists()
            and daemon.ctr("version", check=False).returncode == 0
        ):
            if snapshotter is None:
                daemon.snapshotter = _usable_snapshotter(daemon)
            return daemon
        time.sleep(0.2)
    daemon.stop()
    raise AssertionError("containerd did not answer:\n" + tail(daemon.log))


# podman and skopeo (no daemons) ----------------------------------------------


@dataclass
class Podman:
    """
    Podman with its own storage (C{--root}, C{--runroot}), registries.conf
    and containers.conf; there is no daemon.
    """

    directory: Path
    run_dir: Path
    registries_conf: Path
    storage_driver: str
    env: dict[str, str]

    @property
    def root(self) -> Path:
        return self.directory / "storage"

    def podman(
        self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [
                require_tool("podman"),
                "--root",
                str(self.root),
                "--runroot",
                str(self.run_dir / "podman"),
                "--storage-driver",
                self.storage_driver,
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                *args,
            ],
            timeout=timeout,
            env=self.env,
            check=check,
        )

    def pull(self, reference: str, timeout: float = PULL_TIMEOUT) -> Pulled:
        """
        C{podman pull REFERENCE} (plain HTTP to the mirror per
        registries.conf); the layers' compressed digests are read from the
        storage's own layer records.
        """
        started = time.monotonic()
        self.podman("pull", "--quiet", reference, timeout=timeout)
        seconds = time.monotonic() - started
        return self.inspect(reference, seconds)

    def inspect(self, reference: str, seconds: float = 0.0) -> Pulled:
        info = json.loads(self.podman("image", "inspect", reference).stdout)[0]
        diff_ids = list(info["RootFS"]["Layers"])
        records = json.loads(
            (self.root / f"{self.storage_driver}-layers" / "layers.json").read_text()
        )
        by_diff_id = {
            r.get("diff-digest"): r.get("compressed-diff-digest") for r in records
        }
        return Pulled(
            "podman",
            reference,
            info.get("Digest"),
            "sha256:" + info["Id"],
            [by_diff_id[diff_id] for diff_id in diff_ids],
            diff_ids,
            seconds=seconds,
        )

    def remove_image(self, reference: str) -> None:
        self.podman("image", "rm", "--force", reference, check=False)

    def stop(self) -> None:
        self.podman("system", "reset", "--force", check=False, timeout=60)
        unmount_under(self.directory)
        unmount_under(self.run_dir)


def make_podman(
    directory: Path, run_dir: Path, mirror: str, *, storage_driver: str = "vfs"
) -> Podman:
    """
    A podman environment pulling C{docker.io} names through C{mirror}
    (C{HOST:PORT}, plain HTTP).
    """
    require_root("podman")
    require_tool("podman")
    directory.mkdir(parents=True, exist_ok=True)
    conf = write_registries_conf(directory / "registries.conf", mirror)
    return Podman(
        directory, run_dir, conf, storage_driver, containers_env(directory, conf)
    )


def skopeo_pull(
    reference: str,
    directory: Path,
    mirror: str,
    *,
    architecture: str = "amd64",
    timeout: float = PULL_TIMEOUT,
) -> Pulled:
    """
    C{skopeo copy docker://REFERENCE dir:DIRECTORY/image} through C{mirror}
    (L{dragonfly.devtools.registry.skopeo_pull}: every blob's sha256 is
    checked against its name), as a L{Pulled}.
    """
    require_tool("skopeo")
    pulled = _registry.skopeo_pull(
        reference, directory, mirror, architecture=architecture, timeout=timeout
    )
    return Pulled(
        "skopeo",
        reference,
        None,
        pulled.config_digest,
        pulled.layers,
        content=pulled.content,
        seconds=pulled.seconds,
    )


def skopeo_inspect_raw(reference: str, directory: Path, mirror: str) -> bytes:
    """
    C{skopeo inspect --raw docker://REFERENCE} through C{mirror}: the
    manifest bytes as served.
    """
    require_tool("skopeo")
    return _registry.skopeo_inspect_raw(reference, directory, mirror)
