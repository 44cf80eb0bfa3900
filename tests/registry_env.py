"""
Machinery for the registry-mirror end-to-end tests: a real upstream
registry (Debian's C{docker-registry}, the CNCF distribution registry) on
loopback, container images built offline in Python and pushed with
C{skopeo}, and real clients (dockerd, containerd's C{ctr}, podman, skopeo)
pulling through a given mirror URL, each reporting the digests it pulled.

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
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from loopback import MIB, Processes, child_env, free_port, stop_process

START_TIMEOUT = 30.0
PULL_TIMEOUT = 180.0
COMMAND_TIMEOUT = 60.0

# Any request that is not for loopback goes to this closed port and fails at
# once (no DNS, no waiting): see L{client_env}.
NO_ROUTE_PROXY = "http://127.0.0.1:9"

# Media types -----------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

MEDIA_TYPES = {
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LIST),
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, OCI_INDEX),
}

# Every manifest type a client may ask for, for fetching manifests by hand.
ACCEPT_ALL = ", ".join((DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX))

REF_NAME = "org.opencontainers.image.ref.name"


# Tools -----------------------------------------------------------------------


def require_tool(name: str) -> str:
    """
    The path of the system tool C{name}.  When it is missing the test is
    skipped (it comes from C{scripts/install-system-deps}), except in CI,
    which installs it, where a missing tool fails the test instead.
    """
    # Debian's packages first: a docker CLI of another version may sit in
    # /usr/local/bin.
    found = shutil.which(name, path="/usr/bin:/usr/sbin:/bin:/sbin") or shutil.which(
        name
    )
    if found is None:
        reason = f"{name} is not installed (run scripts/install-system-deps as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (these tests run as root)")


def client_env(directory: Path | None = None) -> dict[str, str]:
    """
    The environment for client tools and daemons: proxies that make every
    non-loopback request fail at once, and C{TMPDIR} inside the test's
    directory.
    """
    env = child_env()
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
) -> subprocess.CompletedProcess[str]:
    """
    Run a command to completion (bounded by C{timeout}; on timeout it is
    killed by C{subprocess.run}).  With C{check}, a non-zero exit fails with
    the command's output.
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
        raise AssertionError(
            f"{' '.join(args)} exited with {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


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


# Digests and blobs -----------------------------------------------------------


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    """
    A content-addressed blob of an image layout.
    """

    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            **extra,
        }


@dataclass(frozen=True)
class Layer(Blob):
    """
    A gzip'd tar layer: C{digest} is of the compressed blob, C{diff_id} of
    the tar inside.
    """

    diff_id: str = ""


@dataclass(frozen=True)
class Image:
    """
    One image: its manifest, config and layers, for one platform.
    """

    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]
    architecture: str
    os: str
    format: str

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class ImageIndex:
    """
    A Docker manifest list or an OCI image index over L{Image}s.
    """

    manifest: Blob
    images: tuple[Image, ...]
    format: str

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def for_platform(
        self, architecture: str = "amd64", os_name: str = "linux"
    ) -> Image:
        for image in self.images:
            if (image.architecture, image.os) == (architecture, os_name):
                return image
        raise KeyError((architecture, os_name))


class _HashingWriter(io.RawIOBase):
    """
    Passes writes on to C{target} while hashing and counting them.
    """

    def __init__(self, target: Any) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += len(view)
        self.target.write(view)
        return len(view)


class _RandomReader(io.RawIOBase):
    """
    C{size} pseudo-random bytes: from C{seed} (the same bytes every time) or
    from C{os.urandom}.
    """

    def __init__(self, size: int, seed: int | str | None) -> None:
        self.left = size
        self.rng = None if seed is None else random.Random(str(seed))

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        n = min(n, 4 * MIB)
        self.left -= n
        return os.urandom(n) if self.rng is None else self.rng.randbytes(n)


class ImageLayout:
    """
    An OCI image layout directory (C{oci-layout}, C{index.json},
    C{blobs/sha256/}) built offline.

    Manifests are written as given (Docker schema2 media types as well as
    OCI ones); L{push} copies them with C{skopeo copy --all
    --preserve-digests} from a C{dir:} view of the layout (skopeo 1.9's
    C{oci:} transport only reads OCI-typed manifests), so the registry ends
    up with exactly these bytes and digests (L{push} checks it).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.refs: dict[str, Blob] = {}
        self._write_index()
        self.count = 0

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.split(":", 1)[1]

    def add_blob(self, data: bytes, media_type: str) -> Blob:
        digest = digest_of(data)
        self.blob_path(digest).write_bytes(data)
        return Blob(digest, len(data), media_type)

    def add_json(self, value: Any, media_type: str) -> Blob:
        return self.add_blob(canonical_json(value), media_type)

    def make_layer(
        self,
        size: int,
        *,
        seed: int | str | None = None,
        media_type: str = DOCKER_LAYER,
        compresslevel: int = 0,
    ) -> Layer:
        """
        A gzip'd tar layer holding one file of C{size} random bytes (from
        C{seed}, to make the same layer again, or fresh ones).  The
        default gzip level 0 (stored blocks) is valid gzip and costs
        nothing: random bytes don't compress anyway.
        """
        self.count += 1
        tmp = self.path / f"layer-{self.count}.tmp"
        name = f"dfly/{seed if seed is not None else os.urandom(8).hex()}.bin"
        with open(tmp, "wb") as out:
            compressed = _HashingWriter(out)
            with gzip.GzipFile(
                filename="",
                mode="wb",
                fileobj=compressed,
                compresslevel=compresslevel,
                mtime=0,
            ) as gz:
                uncompressed = _HashingWriter(gz)
                with tarfile.open(
                    fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT
                ) as tar:
                    directory = tarfile.TarInfo("dfly")
                    directory.type = tarfile.DIRTYPE
                    directory.mode = 0o755
                    tar.addfile(directory)
                    info = tarfile.TarInfo(name)
                    info.size = size
                    info.mode = 0o644
                    tar.addfile(info, _RandomReader(size, seed))
        digest = "sha256:" + compressed.hash.hexdigest()
        tmp.rename(self.blob_path(digest))
        return Layer(
            digest,
            compressed.size,
            media_type,
            diff_id="sha256:" + uncompressed.hash.hexdigest(),
        )

    def make_image(
        self,
        layer_sizes: Sequence[int] = (),
        *,
        format: str = "docker",
        architecture: str = "amd64",
        os_name: str = "linux",
        seeds: Sequence[int | str | None] | None = None,
        layers: Sequence[Layer] = (),
        label: str | None = None,
    ) -> Image:
        """
        An image of C{layers} (already made, e.g. shared with another image)
        followed by new layers of C{layer_sizes} bytes (random, or from
        C{seeds}); C{format} is C{docker} (schema2) or C{oci}.
        """
        manifest_type, config_type, layer_type, _ = MEDIA_TYPES[format]
        if seeds is None:
            seeds = [None] * len(layer_sizes)
        assert len(seeds) == len(layer_sizes)
        all_layers = [
            Layer(lr.digest, lr.size, layer_type, lr.diff_id) for lr in layers
        ]
        all_layers += [
            self.make_layer(size, seed=seed, media_type=layer_type)
            for size, seed in zip(layer_sizes, seeds, strict=True)
        ]
        created = "2024-01-01T00:00:00Z"
        config = self.add_json(
            {
                "architecture": architecture,
                "os": os_name,
                "created": created,
                "config": {
                    "Cmd": ["/dfly/none"],
                    "Labels": {"dragonfly.test": label or os_urandom_hex()},
                },
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [layer.diff_id for layer in all_layers],
                },
                "history": [
                    {"created": created, "created_by": f"dragonfly test layer {i}"}
                    for i in range(len(all_layers))
                ],
            },
            config_type,
        )
        manifest = self.add_json(
            {
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": config.descriptor(),
                "layers": [layer.descriptor() for layer in all_layers],
            },
            manifest_type,
        )
        return Image(manifest, config, tuple(all_layers), architecture, os_name, format)

    def make_index(
        self, images: Sequence[Image], *, format: str = "docker"
    ) -> ImageIndex:
        """
        A manifest list (C{docker}) or an OCI index (C{oci}) of C{images}.
        """
        list_type = MEDIA_TYPES[format][3]
        manifest = self.add_json(
            {
                "schemaVersion": 2,
                "mediaType": list_type,
                "manifests": [
                    image.manifest.descriptor(
                        platform={"architecture": image.architecture, "os": image.os}
                    )
                    for image in images
                ],
            },
            list_type,
        )
        return ImageIndex(manifest, tuple(images), format)

    def tag(self, name: str, target: Image | ImageIndex) -> None:
        """
        Name C{target} C{name} in C{index.json}.
        """
        self.refs[name] = target.manifest
        self._write_index()

    def dir_view(self, target: Image | ImageIndex) -> Path:
        """
        A C{dir:} transport directory of C{target} (its manifest, the
        manifests of a list's images, configs and layers), hard links into
        this layout.  skopeo 1.9 reads only OCI-typed manifests from an OCI
        layout, while C{dir:} takes any, byte for byte.
        """
        view = self.path / "dir" / target.digest.split(":", 1)[1]
        if view.exists():
            return view
        tmp = view.with_name(view.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "version").write_text("Directory Transport Version: 1.1\n")
        shutil.copyfile(self.blob_path(target.digest), tmp / "manifest.json")
        images = target.images if isinstance(target, ImageIndex) else (target,)
        for image in images:
            if image is not target:
                hex_digest = image.digest.split(":", 1)[1]
                os.link(
                    self.blob_path(image.digest), tmp / f"{hex_digest}.manifest.json"
                )
            for blob in (image.config, *image.layers):
                link = tmp / blob.digest.split(":", 1)[1]
                if not link.exists():
                    os.link(self.blob_path(blob.digest), link)
        tmp.rename(view)
        return view

    def _write_index(self) -> None:
        index = {
            "schemaVersion": 2,
            "manifests": [
                blob.descriptor(annotations={REF_NAME: name})
                for name, blob in sorted(self.refs.items())
            ],
        }
        (self.path / "index.json").write_bytes(canonical_json(index))


def os_urandom_hex() -> str:
    return os.urandom(8).hex()


# The upstream registry -------------------------------------------------------

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


def blob_bytes(entries: Sequence[Access]) -> dict[str, int]:
    """
    Bytes of each blob sent by successful GETs (200 and 206).
    """
    sent: Counter[str] = Counter()
    for entry in entries:
        if entry.method == "GET" and entry.status in (200, 206) and entry.blob:
            sent[entry.blob] += entry.size
    return dict(sent)


def blob_gets(entries: Sequence[Access]) -> Counter[str]:
    """
    How many successful GETs each blob had.
    """
    return Counter(
        entry.blob
        for entry in entries
        if entry.method == "GET" and entry.status in (200, 206) and entry.blob
    )


@dataclass
class Registry:
    """
    A running C{docker-registry serve}: plain HTTP on C{host:port}, no
    auth, storage under C{root}; its access log (one Apache combined line
    per request, with the bytes sent) is its stdout, in C{access_log}.
    """

    proc: subprocess.Popen[Any]
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
        Wait (bounded) until the access log has not grown for C{quiet}
        seconds: a line is written once its response is complete, which
        may be a moment after the client has what it asked for.
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


def registry_config(directory: Path, host: str, port: int, storage: Path) -> str:
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
    processes: Processes,
    directory: Path,
    host: str = "127.0.0.1",
    *,
    storage: Path | None = None,
) -> Registry:
    """
    Start C{docker-registry serve} on a free port of C{host} (loopback),
    waited for until C{/v2/} answers.  Its storage is C{directory/storage},
    or C{storage} (e.g. another registry's L{Registry.storage}, to serve the
    same images on another address, with an access log of its own).
    """
    binary = require_tool("docker-registry")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    config = directory / "config.yml"
    config.write_text(
        registry_config(directory, host, port, storage or directory / "storage")
    )
    with (
        open(directory / "access.log", "wb") as out,
        open(directory / "registry.log", "wb") as err,
    ):
        proc = processes.popen(
            [binary, "serve", str(config)], stdout=out, stderr=err, cwd=directory
        )
    registry = Registry(proc, directory, host, port, storage or directory / "storage")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(
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
            stop_process(proc)
            raise AssertionError(
                f"docker-registry did not answer on {registry.url}:\n"
                + tail(registry.error_log)
            )
        time.sleep(0.1)


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
    C{repository:tag} with C{skopeo copy --all --preserve-digests}, and check
    that the registry now serves exactly that manifest.  Returns the
    reference C{HOST:PORT/REPOSITORY:TAG}.
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
    assert (digest, content_type) == (target.digest, target.manifest.media_type), (
        "the registry does not serve the manifest that was built",
        digest,
        content_type,
        target.manifest,
    )
    return destination


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
    The environment for podman and skopeo: our registries.conf and no other
    (C{CONTAINERS_REGISTRIES_CONF}; the drop-in directory is left empty).
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
    (C{HOST:PORT}, plain HTTP, from registries.conf), picking
    C{architecture} from a list.  The manifest is kept as it was served,
    and every blob's sha256 is checked against its name.
    """
    skopeo = require_tool("skopeo")
    directory.mkdir(parents=True, exist_ok=True)
    conf = write_registries_conf(directory / "registries.conf", mirror)
    env = containers_env(directory, conf)
    target = directory / "image"
    remove_tree(target)
    started = time.monotonic()
    run(
        [
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
        ],
        timeout=timeout,
        env=env,
    )
    seconds = time.monotonic() - started
    manifest_bytes = (target / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    content = {digest_of(manifest_bytes)}
    for blob in target.iterdir():
        if re.fullmatch(r"[0-9a-f]{64}", blob.name):
            digest = file_digest(blob)
            assert digest == "sha256:" + blob.name, (blob, digest)
            content.add(digest)
    layers = [layer["digest"] for layer in manifest["layers"]]
    return Pulled(
        "skopeo",
        reference,
        None,
        manifest["config"]["digest"],
        layers,
        content=content,
        seconds=seconds,
    )


def skopeo_inspect_raw(reference: str, directory: Path, mirror: str) -> bytes:
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
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout
