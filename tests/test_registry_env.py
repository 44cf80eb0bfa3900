"""
The registry-mirror test machinery (L{registry_env}) checked on its own,
with no Dragonfly in the path: images built offline and pushed to a real
C{docker-registry} on loopback, then pulled by dockerd, containerd (ctr),
podman and skopeo with that registry as their Docker Hub mirror (it answers
the Hub-style names C{library/x} the mirror URL receives), each pull's
digests checked and its blobs seen in the registry's access log.

Docker Hub itself is unreachable (every client runs with a proxy on a closed
loopback port, which Go skips for loopback only): L{test_no_fallback} shows
each client failing at once when its mirror is down.
"""

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from loopback import MIB, Processes, free_port, http_get
from registry_env import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    NO_ROUTE_PROXY,
    OCI_INDEX,
    OCI_MANIFEST,
    Containerd,
    Dockerd,
    Image,
    ImageIndex,
    ImageLayout,
    Podman,
    Pulled,
    Registry,
    blob_bytes,
    blob_gets,
    make_podman,
    parse_access_log,
    push,
    short_dir,
    skopeo_inspect_raw,
    skopeo_pull,
    start_containerd,
    start_dockerd,
    start_registry,
    write_hosts_dir,
)

pytestmark = pytest.mark.registry

IMAGES = ("schema2", "list", "oci")


@dataclass
class Upstream:
    registry: Registry
    layout: ImageLayout
    # name -> (what the tag points at, the linux/amd64 image a pull gets)
    images: dict[str, tuple[Image | ImageIndex, Image]]

    def ref(self, name: str) -> str:
        """The Docker Hub style name the clients pull through the mirror."""
        return f"library/dfly-{name}:v1"

    def hub_ref(self, name: str) -> str:
        return f"docker.io/{self.ref(name)}"


@pytest.fixture(scope="module")
def module_processes() -> Iterator[Processes]:
    tracker = Processes()
    try:
        yield tracker
    finally:
        tracker.stop_all()


@pytest.fixture(scope="module")
def upstream(
    module_processes: Processes, tmp_path_factory: pytest.TempPathFactory
) -> Upstream:
    """
    The registry with three images, each of its own layers: a schema2
    image, a Docker manifest list and an OCI index (linux/amd64 and
    linux/arm64 each).
    """
    work = tmp_path_factory.mktemp("upstream")
    registry = start_registry(module_processes, work / "registry")
    layout = ImageLayout(work / "layout")
    schema2 = layout.make_image([6 * MIB, 1 * MIB + 17])
    docker_amd64 = layout.make_image([3 * MIB, 2 * MIB])
    docker_arm64 = layout.make_image([1 * MIB], architecture="arm64")
    docker_list = layout.make_index([docker_amd64, docker_arm64])
    oci_amd64 = layout.make_image([4 * MIB, 1 * MIB], format="oci")
    oci_arm64 = layout.make_image([1 * MIB], format="oci", architecture="arm64")
    oci_index = layout.make_index([oci_amd64, oci_arm64], format="oci")
    images: dict[str, tuple[Image | ImageIndex, Image]] = {
        "schema2": (schema2, schema2),
        "list": (docker_list, docker_amd64),
        "oci": (oci_index, oci_amd64),
    }
    up = Upstream(registry, layout, images)
    for name, (top, _) in images.items():
        push(layout, "v1", registry, up.ref(name).split(":")[0], top)
    return up


def check_through_registry(
    registry: Registry, mark: int, image: Image, agent: str
) -> None:
    """
    The registry's log since C{mark} shows each of C{image}'s layers sent
    whole, once, to a client whose user agent has C{agent}.
    """
    registry.settle()
    entries = [e for e in registry.since(mark) if agent in e.agent]
    gets = blob_gets(entries)
    sent = blob_bytes(entries)
    for layer in image.layers:
        assert gets[layer.digest] == 1, (layer, gets)
        assert sent[layer.digest] == layer.size, (layer, sent)


# The machinery itself ----------------------------------------------------------


def test_layers_from_seeds_are_the_same(tmp_path: Path) -> None:
    """
    Seeded layers come out byte for byte the same in another layout (to
    build images sharing layers); unseeded ones differ.
    """
    one, two = ImageLayout(tmp_path / "one"), ImageLayout(tmp_path / "two")
    assert one.make_layer(MIB, seed="a") == two.make_layer(MIB, seed="a")
    assert one.make_layer(MIB, seed="a") != one.make_layer(MIB, seed="b")
    assert one.make_layer(MIB) != one.make_layer(MIB)
    base = one.make_layer(2 * MIB, seed="base")
    image = one.make_image([MIB], layers=[base], format="oci")
    assert image.layer_digests[0] == base.digest
    assert image.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert image.layers[1].size > MIB
    config = json.loads(one.blob_path(image.config.digest).read_bytes())
    assert config["rootfs"]["diff_ids"] == image.diff_ids


def test_access_log_parsing() -> None:
    text = (
        '127.0.0.1 - - [03/Dec/2026:17:36:19 +0000] "GET /v2/ HTTP/1.1" 200 2 "" '
        '"docker/20.10.24"\n'
        '127.0.0.1 - - [03/Dec/2026:17:36:19 +0000] "GET /v2/library/x/blobs/sha256:'
        + "a"
        * 64
        + '?ns=docker.io HTTP/1.1" 200 1054868 "" "containerd/1.6.20~ds1"\n'
        '127.0.0.2 - - [03/Dec/2026:17:36:19 +0000] "GET /v2/library/x/blobs/sha256:'
        + "a"
        * 64
        + ' HTTP/1.1" 206 100 "" "Go-http-client/1.1"\n'
        '127.0.0.1 - - [03/Dec/2026:17:36:19 +0000] "HEAD /v2/library/x/blobs/sha256:'
        + "b"
        * 64
        + ' HTTP/1.1" 200 591 "" "skopeo/1.9.3"\n'
        '127.0.0.1 - - [03/Dec/2026:17:36:19 +0000] "HEAD /v2/a/b/manifests/v1 '
        'HTTP/1.1" 404 19 "" "x"\n'
        'time="2026-12-03T17:33:31Z" level=info msg="not an access line"\n'
    )
    entries = parse_access_log(text)
    assert len(entries) == 5
    assert entries[1].query == "ns=docker.io"
    assert entries[1].repository == "library/x"
    assert entries[4].manifest == "v1"
    assert entries[4].repository == "a/b"
    assert blob_bytes(entries) == {"sha256:" + "a" * 64: 1054868 + 100}
    assert blob_gets(entries) == {"sha256:" + "a" * 64: 2}


def test_registry_serves_the_pushed_manifests(upstream: Upstream) -> None:
    """
    skopeo pushed the manifests unchanged (types and digests), the list and
    the index name their platforms' images, and a blob GET is logged with
    its size.
    """
    expected = {"schema2": DOCKER_MANIFEST, "list": DOCKER_LIST, "oci": OCI_INDEX}
    for name, (top, image) in upstream.images.items():
        repository = upstream.ref(name).split(":")[0]
        digest, content_type, body = upstream.registry.manifest(repository, "v1")
        assert (digest, content_type) == (top.digest, expected[name])
        assert body == upstream.layout.blob_path(top.digest).read_bytes()
        if isinstance(top, ImageIndex):
            platforms = {
                (m["platform"]["os"], m["platform"]["architecture"]): m["digest"]
                for m in json.loads(body)["manifests"]
            }
            assert platforms == {
                ("linux", "amd64"): image.digest,
                ("linux", "arm64"): top.for_platform("arm64").digest,
            }
            digest, content_type, _ = upstream.registry.manifest(
                repository, image.digest
            )
            assert (digest, content_type) == (
                image.digest,
                OCI_MANIFEST if name == "oci" else DOCKER_MANIFEST,
            )
    mark = upstream.registry.mark()
    _, image = upstream.images["schema2"]
    layer = image.layers[1]
    with open(upstream.layout.blob_path(layer.digest), "rb") as f:
        expected_bytes = f.read()
    status, _, body = http_get(
        f"{upstream.registry.url}/v2/library/dfly-schema2/blobs/{layer.digest}"
    )
    assert (status, body == expected_bytes) == (200, True)
    upstream.registry.settle()
    assert upstream.registry.blob_bytes(mark) == {layer.digest: layer.size}


# Clients -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerd(
    module_processes: Processes,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Dockerd]:
    with short_dir("dfdock") as run_dir:
        daemon = start_dockerd(
            module_processes,
            tmp_path_factory.mktemp("dockerd"),
            run_dir,
            [upstream.registry.url],
        )
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture(scope="module")
def containerd(
    module_processes: Processes, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Containerd]:
    with short_dir("dfctd") as run_dir:
        daemon = start_containerd(
            module_processes, tmp_path_factory.mktemp("containerd"), run_dir
        )
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture(scope="module")
def podman(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Podman]:
    with short_dir("dfpod") as run_dir:
        env = make_podman(
            tmp_path_factory.mktemp("podman"), run_dir, upstream.registry.address
        )
        try:
            yield env
        finally:
            env.stop()


@pytest.mark.parametrize("name", IMAGES)
def test_docker_pull(upstream: Upstream, dockerd: Dockerd, name: str) -> None:
    """
    C{docker pull library/dfly-NAME:v1} goes to the registry-mirrors URL
    and gets the linux/amd64 image, its layers checked against the
    daemon's own records.
    """
    top, image = upstream.images[name]
    mark = upstream.registry.mark()
    pulled = dockerd.pull(upstream.ref(name))
    try:
        pulled.check(image, top)
        check_through_registry(upstream.registry, mark, image, "docker/")
        assert not any(e.query for e in upstream.registry.since(mark)), (
            "docker adds no query to mirror requests"
        )
    finally:
        dockerd.remove_image(upstream.ref(name))


@pytest.mark.parametrize("name", IMAGES)
def test_ctr_pull(upstream: Upstream, containerd: Containerd, name: str) -> None:
    """
    C{ctr images pull --hosts-dir} with docker.io/hosts.toml naming the
    registry as mirror: the content store ends up with the image's blobs.
    """
    top, image = upstream.images[name]
    hosts_dir = write_hosts_dir(containerd.directory, upstream.registry.url)
    mark = upstream.registry.mark()
    pulled = containerd.pull(upstream.hub_ref(name), hosts_dir)
    try:
        pulled.check(image, top)
        check_through_registry(upstream.registry, mark, image, "containerd/")
        queries = {e.query for e in upstream.registry.since(mark)}
        assert queries == {"ns=docker.io"}, queries
    finally:
        containerd.remove_image(upstream.hub_ref(name))


@pytest.mark.parametrize("name", IMAGES)
def test_podman_pull(upstream: Upstream, podman: Podman, name: str) -> None:
    """
    C{podman pull docker.io/library/dfly-NAME:v1} with a registries.conf
    mirror (insecure, so plain HTTP) for docker.io.
    """
    top, image = upstream.images[name]
    mark = upstream.registry.mark()
    pulled = podman.pull(upstream.hub_ref(name))
    try:
        pulled.check(image, top)
        check_through_registry(upstream.registry, mark, image, "containers/")
    finally:
        podman.remove_image(upstream.hub_ref(name))


@pytest.mark.parametrize("name", IMAGES)
def test_skopeo_pull(upstream: Upstream, tmp_path: Path, name: str) -> None:
    """
    C{skopeo copy docker://docker.io/library/dfly-NAME:v1 dir:...} through
    the mirror; every blob's sha256 checked; C{skopeo inspect --raw} gives
    the manifest as pushed.
    """
    top, image = upstream.images[name]
    mark = upstream.registry.mark()
    pulled = skopeo_pull(upstream.hub_ref(name), tmp_path, upstream.registry.address)
    pulled.check(image, top)
    check_through_registry(upstream.registry, mark, image, "skopeo/")
    raw = skopeo_inspect_raw(
        upstream.hub_ref(name), tmp_path, upstream.registry.address
    )
    assert raw == upstream.layout.blob_path(top.digest).read_bytes()


def test_two_dockerds_at_once(
    module_processes: Processes, upstream: Upstream, tmp_path: Path
) -> None:
    """
    Two "hosts": a registry on 127.0.0.2 and one on 127.0.0.3 (the same
    storage, an access log each) as the mirrors of one dockerd each, both
    pulling the same image at the same time.
    """
    layout = upstream.layout
    image = layout.make_image([12 * MIB, 5 * MIB])
    push(layout, "v1", upstream.registry, "library/dfly-two", image)
    hosts = []
    for ip in ("127.0.0.2", "127.0.0.3"):
        registry = start_registry(
            module_processes,
            tmp_path / f"registry-{ip}",
            ip,
            storage=upstream.registry.storage,
        )
        hosts.append(registry)
    spans: dict[str, tuple[float, float]] = {}

    def pull(daemon: Dockerd) -> Pulled:
        started = time.monotonic()
        pulled = daemon.pull("library/dfly-two:v1")
        spans[daemon.host] = (started, time.monotonic())
        return pulled

    daemons: list[Dockerd] = []
    with short_dir("dfd2") as run2, short_dir("dfd3") as run3:
        try:
            for registry, run_dir in zip(hosts, (run2, run3), strict=True):
                directory = tmp_path / f"dockerd-{registry.host}"
                daemons.append(
                    start_dockerd(module_processes, directory, run_dir, [registry.url])
                )
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(pull, daemons))
            for pulled in results:
                pulled.check(image)
            starts, ends = zip(*spans.values(), strict=True)
            assert max(starts) < min(ends), ("the pulls did not overlap", spans)
            for registry in hosts:
                check_through_registry(registry, 0, image, "docker/")
        finally:
            for daemon in daemons:
                daemon.stop()
            for registry in hosts:
                registry.stop()


def test_no_fallback(
    module_processes: Processes, upstream: Upstream, tmp_path: Path
) -> None:
    """
    With the mirror down, every client falls back to Docker Hub, which it
    cannot reach: the proxy it is given refuses at once.  So a pull that
    succeeded came through the mirror.
    """
    dead = f"127.0.0.1:{free_port()}"
    ref = upstream.ref("schema2")
    mark = upstream.registry.mark()
    failures = {}
    with short_dir("dfdx") as docker_run, short_dir("dfcx") as ctr_run:
        daemon = start_dockerd(
            module_processes, tmp_path / "dockerd", docker_run, [f"http://{dead}"]
        )
        try:
            failures["docker"] = daemon.docker("pull", ref, check=False, timeout=60)
        finally:
            daemon.stop()
        ctr = start_containerd(module_processes, tmp_path / "containerd", ctr_run)
        try:
            hosts_dir = write_hosts_dir(tmp_path, f"http://{dead}")
            failures["ctr"] = ctr.ctr(
                "images",
                "pull",
                "--hosts-dir",
                str(hosts_dir),
                f"docker.io/{ref}",
                check=False,
                timeout=60,
            )
        finally:
            ctr.stop()
    with short_dir("dfpx") as podman_run:
        env = make_podman(tmp_path / "podman", podman_run, dead)
        failures["podman"] = env.podman("pull", f"docker.io/{ref}", check=False)
    proxy = NO_ROUTE_PROXY.removeprefix("http://")
    for client, result in failures.items():
        output = result.stdout + result.stderr
        assert result.returncode != 0, (client, output)
        assert "registry-1.docker.io" in output, (client, output)
        assert f"proxyconnect tcp: dial tcp {proxy}" in output, (client, output)
    assert upstream.registry.since(mark) == []
